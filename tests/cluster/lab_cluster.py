"""The cluster of the cluster tests: HAProxy, three qpgevent hosts, Redis with Sentinel.

Built in network namespaces (``qpgevent.testing.netlab``): ``client`` and ``client2``
send mail, ``lb`` runs HAProxy (PROXY v2 to the hosts, an HTTP health check on each
host's ``/health``), ``h1``..``h3`` run the real ``qpgevent`` command (one worker each:
three hosts share this machine's two cores), ``redis`` runs a primary, a replica and
three Sentinels. The test process itself sits in ``client`` while it talks to the lab,
so no lab address is ever dialled from the host's namespace.
"""

from __future__ import annotations

import collections
import smtplib
import socket
import subprocess
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gevent
import gevent.pool

from qpgevent.testing import ServerProcess, wait_until, write_ini
from qpgevent.testing.netlab import NetLab
from qpgevent.testing.redis_sentinel import LoopbackSentinels

HOSTS = {"client": ("198.18.0.2", "2001:db8::2"), "client2": ("198.18.0.3", "2001:db8::3"),
         "client3": ("198.18.0.4", "2001:db8::4"),
         "lb": ("198.18.0.10", "2001:db8::10"), "redis": ("198.18.0.30", "2001:db8::30"),
         "h1": ("198.18.0.21", "2001:db8::21"), "h2": ("198.18.0.22", "2001:db8::22"),
         "h3": ("198.18.0.23", "2001:db8::23")}
MX_HOSTS = ("h1", "h2", "h3")
LB = "198.18.0.10"
REDIS_PORTS = (6379, 6380, 26379, 26380, 26381)
ADMIN_PORT = 8025
TOKEN = "cluster-test-token"
#: The cluster-wide per-address limits of the ``limit`` plugin (through Redis): sessions at
#: once, and new sessions per minute.
CONCURRENCY = 4
RATE = 12
#: The load clients' address is exempt from the limit (it opens many sessions at once).
LOAD_CLIENT = HOSTS["client"][0]


def host_plugins(maildir: Path) -> str:
    return textwrap.dedent(f"""\
        [[limit]]
          concurrency = {CONCURRENCY}
          rate_conn = {RATE}/60
          exempt = {LOAD_CLIENT}
        [[greylisting]]
          black_timeout = 0
          grey_timeout = 1h
        [[rcpt_ok]]
          domains = example.test
        [[queue/maildir]]
          path = {maildir}
        """)


HAPROXY = """\
global
    stats socket {folder}/admin.sock mode 600 level admin
    log stderr format short local0 notice
defaults
    mode tcp
    log global
    timeout connect 2s
    timeout client 1m
    timeout server 1m
    retries 2
    option redispatch
frontend smtp
    bind {lb}:25
    default_backend mx
backend mx
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
    default-server send-proxy-v2 check port {admin} inter 300ms fastinter 200ms fall 2 rise 2
{servers}
"""


@dataclass
class Host:
    name: str
    folder: Path
    ini: Path
    lab: NetLab
    process: ServerProcess | None = None

    @property
    def maildir(self) -> Path:
        return self.folder / "Maildir"

    def start(self) -> None:
        self.process = ServerProcess(self.ini, prefix=self.lab.command(self.name), ready_timeout=60)

    def messages(self) -> list[bytes]:
        return [path.read_bytes() for path in (self.maildir / "new").glob("*")] if (self.maildir / "new").is_dir() else []


@dataclass
class Cluster:
    lab: NetLab
    folder: Path
    sentinels: LoopbackSentinels
    hosts: dict[str, Host]
    haproxy: subprocess.Popen | None = None

    def server_states(self) -> dict[str, str]:
        """HAProxy's view of each host (UP, DOWN, ...) from its stats socket (a unix socket)."""
        with socket.socket(socket.AF_UNIX) as stats:
            stats.connect(str(self.folder / "admin.sock"))
            stats.sendall(b"show stat\n")
            data = b"".join(iter(lambda: stats.recv(65536), b""))
        rows = [line.split(",") for line in data.decode().splitlines()]
        return {row[1]: row[17] for row in rows if len(row) > 17 and row[0] == "mx" and row[1] in self.hosts}

    def wait_states(self, wanted: dict[str, str], timeout: float = 30) -> None:
        wait_until(lambda: all(self.server_states().get(h) == s for h, s in wanted.items()), timeout,
                   f"HAProxy seeing {wanted} (now {self._states_or_error()})", 0.05)

    def _states_or_error(self) -> object:
        try:
            return self.server_states()
        except OSError as error:
            return error

    def copies(self) -> collections.Counter[str]:
        """Message id -> how many copies the three Maildirs hold, all hosts together."""
        counted: collections.Counter[str] = collections.Counter()
        for host in self.hosts.values():
            for message in host.messages():
                for line in message.split(b"\r\n"):
                    if line.startswith(b"X-Load-Id: "):
                        counted[line[11:].decode()] += 1
        return counted

    def worker_restarts(self) -> list[str]:
        return [line for host in self.hosts.values() if host.process
                for line in host.process.log().splitlines() if "killed by signal" in line or "exited with" in line]


def build(folder: Path) -> Cluster:
    lab = NetLab(HOSTS, tag="cl")
    try:
        with lab.inside("client"):
            sentinels = LoopbackSentinels(host=HOSTS["redis"][0], ports=REDIS_PORTS,
                                          prefix=tuple(lab.command("redis")))
        hosts = {}
        for name in MX_HOSTS:
            address = HOSTS[name][0]
            host_folder = folder / name
            host_folder.mkdir()
            ini = write_ini(host_folder, host_plugins(host_folder / "Maildir"), me=f"{name}.example.test",
                            listen=f"{address}:25", workers=1, admin_listen=f"{address}:{ADMIN_PORT}",
                            admin_token=TOKEN, proxy_trusted=LB, store_backend="redis",
                            store_url="redis://127.0.0.1/0", store_sentinels=sentinels.addresses,
                            store_fail="temp", store_retry=0.2, store_timeout=0.5, drain_delay=2,
                            shutdown_timeout=20, spool_dir=str(host_folder / "spool"))
            hosts[name] = Host(name, host_folder, ini, lab)
        cluster = Cluster(lab, folder, sentinels, hosts)
        for host in hosts.values():
            host.start()
        servers = "\n".join(f"    server {name} {HOSTS[name][0]}:25" for name in MX_HOSTS)
        config = folder / "haproxy.cfg"
        config.write_text(HAPROXY.format(folder=folder, lb=LB, admin=ADMIN_PORT, servers=servers))
        with open(folder / "haproxy.log", "wb") as log:
            cluster.haproxy = subprocess.Popen(lab.command("lb", "haproxy", "-db", "-f", str(config)),
                                               stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: (folder / "admin.sock").exists(), 20, "HAProxy's stats socket")
        cluster.wait_states({name: "UP" for name in MX_HOSTS})
        return cluster
    except BaseException:
        lab.close()
        raise


def tear_down(cluster: Cluster) -> None:
    try:
        if cluster.haproxy is not None and cluster.haproxy.poll() is None:
            cluster.haproxy.terminate()
            cluster.haproxy.wait(10)
        for host in cluster.hosts.values():
            if host.process is not None and host.process.process.poll() is None:
                host.process.kill()
        with cluster.lab.inside("client"):
            cluster.sentinels.close()
    finally:
        cluster.lab.close()


# -- the load -------------------------------------------------------------------------------

@dataclass
class Load:
    """Messages sent through HAProxy, each retried like an MTA would (4xx, lost connection).

    A message is "accepted" once a 250 answered its end of data. An attempt that lost its
    connection after the end of data was sent is "ambiguous" (RFC 1047: the server may have
    kept it): only such a message may be stored twice.
    """
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    accepted: set[str] = field(default_factory=set)
    ambiguous: set[str] = field(default_factory=set)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    refused_sessions: int = 0
    given_up: set[str] = field(default_factory=set)

    def send(self, number: int, retries: int = 30, source: str = LOAD_CLIENT) -> None:
        load_id = f"{self.tag}-{number}"
        message = (f"From: <a@client.test>\r\nSubject: cluster load {load_id}\r\nX-Load-Id: {load_id}\r\n\r\n"
                   + "load\r\n" * 40).encode()
        for _ in range(retries):
            stage = "connect"
            try:
                with smtplib.SMTP(LB, 25, local_hostname="load.client.test", timeout=30,
                                  source_address=(source, 0)) as client:
                    stage = "session"
                    client.ehlo()
                    code, text = client.mail("a@client.test")
                    if code == 250:
                        code, text = client.rcpt("bob@example.test")
                    if code == 250:
                        stage = "data"
                        code, text = client.data(message)
                    if code == 250:
                        self.accepted.add(load_id)
                        return
                    self.failures[f"{code} {text[:9].decode(errors='replace')}"] += 1
            except (OSError, smtplib.SMTPException) as error:
                if stage == "connect" or isinstance(error, smtplib.SMTPConnectError):
                    self.refused_sessions += 1
                if stage == "data":
                    self.ambiguous.add(load_id)
                self.failures[f"{stage}: {type(error).__name__}"] += 1
            gevent.sleep(0.1)  # an MTA's retry, shortened
        self.given_up.add(load_id)

    def run(self, count: int, concurrency: int = 20) -> gevent.Greenlet:
        """Start sending ``count`` messages, ``concurrency`` at once; join the greenlet to wait."""
        def drive() -> None:
            pool = gevent.pool.Pool(concurrency)
            for number in range(count):
                pool.spawn(self.send, number)
            pool.join()
        return gevent.spawn(drive)

    def check(self, cluster: Cluster) -> None:
        """Every accepted message is stored; only an ambiguous one may be stored twice."""
        copies = cluster.copies()
        mine = {load_id: n for load_id, n in copies.items() if load_id.startswith(self.tag + "-")}
        missing = sorted(self.accepted - set(mine))
        assert not missing, f"accepted but in no Maildir: {missing[:10]}"
        doubled = sorted(i for i, n in mine.items() if n > 1 and i not in self.ambiguous)
        assert not doubled, f"stored twice without an ambiguous attempt: {doubled[:10]}"
        assert all(n <= 2 for n in mine.values())
        assert not self.given_up, f"gave up on {sorted(self.given_up)[:10]}: {self.failures}"

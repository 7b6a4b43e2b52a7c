"""A small "internet" for the outbound tests: network namespaces on one bridge, NSD, Postfix MXs.

``NetLab`` makes one namespace per host (``qn-<pid>-<name>``, as
/work/shared/recipes/netns-hosts.md describes), each with an address in 198.18.0.0/24 and
2001:db8::/64, all on a bridge in a switch namespace; nothing is created in the host's
namespace, and nothing in the test process dials a lab address from it: sockets are made
inside a host (``NetLab.socket``), daemons run there (``NetLab.command``).

``LabDns`` is NSD serving the test zones on port 53 of one host; ``LabPostfix`` is the
project's private Postfix (``qpgevent.testing_mta.Postfix``) listening on port 25 of one
host. ``lab_smtp`` is smtplib with its socket made in a host.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import gevent

from qpgevent.testing import wait_until
from qpgevent.testing_mta import Postfix, private_folder

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def sweep() -> None:
    """Remove the labs of test runs that died without cleaning up."""
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    for run in {n.split("-")[1] for n in names if n.startswith("qn-") and n.split("-")[1].isdigit()}:
        if not os.path.exists(f"/proc/{run}"):
            for name in [n for n in names if n.startswith(f"qn-{run}-")]:
                _delete_namespace(name)


def _delete_namespace(name: str) -> None:
    for signum in (signal.SIGTERM, signal.SIGKILL):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 2
        while pids and time.monotonic() < deadline:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            time.sleep(0.05)  # polling other processes' exit
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


class NetLab:
    def __init__(self, hosts: dict[str, tuple[str, str]]) -> None:
        self.run = os.getpid()
        self.hosts = hosts
        self.switch = f"qn-{self.run}-sw"
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, (name, (v4, v6)) in enumerate(hosts.items(), 1):
                ns = self.ns(name)
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
                _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return f"qn-{self.run}-{host}"

    def command(self, host: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def socket(self, host: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket made inside ``host`` (only this thread visits the namespace, briefly)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the lab")
            try:
                return socket.socket(family, kind)
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(target)

    def connect(self, host: str, address: str, port: int, timeout: float = 5.0) -> socket.socket:
        sock = self.socket(host, socket.AF_INET6 if ":" in address else socket.AF_INET)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def greeting(self, host: str, address: str, port: int) -> bytes | None:
        try:
            with self.connect(host, address, port) as sock:
                line = sock.makefile("rb").readline(512)
                sock.sendall(b"QUIT\r\n")
                return line
        except OSError:
            return None

    def close(self) -> None:
        for name in sorted(os.listdir("/run/netns") if os.path.isdir("/run/netns") else []):
            if name.startswith(f"qn-{self.run}-"):
                _delete_namespace(name)


def lab_smtp(lab: NetLab, host: str, address: str, port: int = 25) -> smtplib.SMTP:
    """smtplib, its connection made from inside ``host``."""

    class LabSMTP(smtplib.SMTP):
        def _get_socket(self, to_host, to_port, timeout):  # noqa: ANN001
            return lab.connect(host, to_host, to_port, timeout)

    return LabSMTP(address, port, local_hostname="client.sender.test", timeout=30)


class LabDns:
    """NSD on ``address``:53 in ``host``; zones as for qpgevent.testing_dns.LoopbackDns."""

    def __init__(self, lab: NetLab, host: str, address: str, zones: dict[str, dict[str, list[tuple[str, str]]]]) -> None:
        self.lab, self.host, self.address, self.zones = lab, host, address, zones
        self.dir = Path(private_folder("qpg-labdns-"))
        conf = ["server:", f"    ip-address: {address}@53", "    do-ip6: no", '    username: ""', '    chroot: ""',
                f'    zonesdir: "{self.dir}"', '    database: ""', f'    pidfile: "{self.dir}/nsd.pid"',
                f'    xfrdfile: "{self.dir}/xfrd.state"', f'    zonelistfile: "{self.dir}/zone.list"',
                f'    logfile: "{self.dir}/nsd.log"', "    server-count: 1", "    rrl-ratelimit: 0",
                "remote-control:", "    control-enable: no"]
        for zone, owners in zones.items():
            lines = [f"$ORIGIN {zone}.", "$TTL 5", f"@ IN SOA ns.{zone}. h.{zone}. 1 3600 600 86400 5",
                     f"@ IN NS ns.{zone}."]
            lines += [f"{owner} IN {rtype} {rdata}" for owner, records in owners.items() for rtype, rdata in records]
            (self.dir / f"{zone}.zone").write_text("\n".join(lines) + "\n")
            conf += ["zone:", f"    name: {zone}", f"    zonefile: {zone}.zone"]
        (self.dir / "nsd.conf").write_text("\n".join(conf) + "\n")
        self._out = open(self.dir / "nsd.out", "wb")
        self.process = subprocess.Popen(lab.command(host, "nsd", "-d", "-c", str(self.dir / "nsd.conf")),
                                        stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            wait_until(self._ready, 20, f"nsd in {host}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.process.poll() is None, (self.dir / "nsd.out").read_text()
        for zone in self.zones:
            try:
                sock = self.lab.connect(self.host, self.address, 53, timeout=1)
            except OSError:
                return False
            with sock:
                sock.setblocking(False)
                response = dns.query.tcp(dns.message.make_query(zone + ".", "SOA"), self.address, timeout=1,
                                         sock=sock)
            if response.rcode() != dns.rcode.NOERROR or not response.answer:
                return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._out.close()
        gevent.get_hub().threadpool.apply(shutil.rmtree, (self.dir, True))


class LabPostfix(Postfix):
    """The project's private Postfix, on ``address``:25 inside lab host ``host``."""

    def __init__(self, lab: NetLab, host: str, address: str, mailboxes: list[str], interfaces: str = "",
                 **kwargs) -> None:  # noqa: ANN003
        main = {"inet_interfaces": interfaces or address, "mynetworks": "198.18.0.0/24", "myhostname": f"{host}.lab.test",
                **kwargs.pop("main", {})}
        super().__init__(mailboxes, main=main, **kwargs)
        self.lab, self.host, self.address = lab, host, address
        master = self.conf / "master.cf"
        master.write_text(master.read_text().replace(f"127.0.0.1:{self.port} inet", "smtp inet", 1))
        minute_ago = time.time() - 60
        os.utime(master, (minute_ago, minute_ago))

    def command(self, *args: str) -> list[str]:
        # Inside the host: outside it, Postfix refuses a config whose inet_interfaces
        # are not local addresses (even for "postfix stop").
        return self.lab.command(self.host, *super().command(*args))

    def answers(self) -> bool:
        line = self.lab.greeting(self.host, self.address, 25)
        return bool(line and line.startswith(b"220 "))

    def cleanup(self) -> None:
        self.stop()
        gevent.get_hub().threadpool.apply(shutil.rmtree, (self.root, True))

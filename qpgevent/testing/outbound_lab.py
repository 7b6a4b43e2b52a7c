"""A small "internet" for tests and benchmarks: network namespaces on one bridge, DNS, Postfix MXs.

The hosts are ``qpgevent.testing.netlab``'s ``NetLab`` (one network namespace each, on a
bridge; nothing in the test process dials a lab address from the host's namespace: sockets
are made inside a host, ``NetLab.socket``, daemons run there, ``NetLab.command``).

``LabDns`` is a validating unbound in front of NSD serving the test zones on port 53 of
one host (some zones signed); ``LabPostfix`` is the project's private Postfix
(``qpgevent.testing_mta.Postfix``) listening on port 25 of one host; ``PolicyServer``
serves MTA-STS policies over HTTPS. ``lab_smtp`` is smtplib with its socket made in a host.
Needs root (namespaces). Runtime code never imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import dns.exception
import dns.flags
import dns.rcode
import gevent

from qpgevent.testing import wait_until
from qpgevent.testing.mta import Postfix, private_folder
from qpgevent.testing.netlab import NetLab, sweep

__all__ = ["LabDns", "LabPostfix", "NetLab", "PolicyServer", "lab_smtp", "sweep"]


def lab_smtp(lab: NetLab, host: str, address: str, port: int = 25) -> smtplib.SMTP:
    """smtplib, its connection made from inside ``host``."""

    class LabSMTP(smtplib.SMTP):
        def _get_socket(self, to_host, to_port, timeout):  # noqa: ANN001
            return lab.connect(host, to_host, to_port, timeout)

    return LabSMTP(address, port, local_hostname="client.sender.test", timeout=30)


class LabDns:
    """The test zones as a validating resolver sees them, on ``address``:53 in ``host``.

    NSD serves the zones on the host's own loopback (127.0.0.1:5300); unbound answers on
    ``address``:53, stubbed to NSD, refusing every other name (it never asks the real
    root). The zones in ``signed`` are signed at start (ldns-signzone, ECDSA P-256), and
    unbound trusts their keys: answers from them carry AD; the rest are insecure.

    ``ttl`` is every record's TTL (and the zones' negative TTL), ``negative_ttl`` how long
    unbound keeps a negative answer: short by default, so that a test's records never
    linger; a benchmark asks for real-world ones (minutes), which callers' caches honour.
    """

    NSD_PORT = 5300

    def __init__(self, lab: NetLab, host: str, address: str, zones: dict[str, dict[str, list[tuple[str, str]]]],
                 signed: tuple[str, ...] = (), ttl: int = 5, negative_ttl: int = 1) -> None:
        self.lab, self.host, self.address, self.zones, self.signed = lab, host, address, zones, signed
        self.ttl = ttl
        self.dir = Path(private_folder("qpg-labdns-"))
        self.processes: list[subprocess.Popen[bytes]] = []
        nsd = ["server:", f"    ip-address: 127.0.0.1@{self.NSD_PORT}", "    do-ip6: no", '    username: ""',
               '    chroot: ""', f'    zonesdir: "{self.dir}"', '    database: ""', f'    pidfile: "{self.dir}/nsd.pid"',
               f'    xfrdfile: "{self.dir}/xfrd.state"', f'    zonelistfile: "{self.dir}/zone.list"',
               f'    logfile: "{self.dir}/nsd.log"', "    server-count: 1", "    rrl-ratelimit: 0",
               "remote-control:", "    control-enable: no"]
        unbound = ["server:", f"    interface: {address}", "    port: 53", "    access-control: 198.18.0.0/15 allow",
                   '    username: ""', '    chroot: ""', f'    directory: "{self.dir}"', f'    pidfile: "{self.dir}/unbound.pid"',
                   "    use-syslog: no", '    logfile: ""', "    num-threads: 1", "    do-not-query-localhost: no",
                   '    module-config: "validator iterator"', '    local-zone: "test." nodefault',
                   '    local-zone: "." refuse', f"    cache-max-ttl: {ttl}", f"    cache-max-negative-ttl: {negative_ttl}"]
        stubs = []
        self.keys: dict[str, tuple[str, str]] = {}
        for zone in zones:
            zonefile = self._write_zone(zone)
            if zone in signed:
                unbound.append(f'    trust-anchor-file: "{self.dir}/{self.anchors[zone]}.ds"')
            nsd += ["zone:", f"    name: {zone}", f"    zonefile: {zonefile}"]
            unbound.append(f'    local-zone: "{zone}." transparent')
            stubs += ["stub-zone:", f'    name: "{zone}"', f"    stub-addr: 127.0.0.1@{self.NSD_PORT}"]
        (self.dir / "nsd.conf").write_text("\n".join(nsd) + "\n")
        (self.dir / "unbound.conf").write_text("\n".join(unbound + stubs) + "\n")
        self._out = open(self.dir / "daemons.out", "wb")
        try:
            for argv in (["nsd", "-d", "-c", str(self.dir / "nsd.conf")],
                         ["unbound", "-d", "-c", str(self.dir / "unbound.conf")]):
                self.processes.append(subprocess.Popen(lab.command(host, *argv), stdin=subprocess.DEVNULL,
                                                       stdout=self._out, stderr=subprocess.STDOUT,
                                                       start_new_session=True))
            wait_until(self._ready, 20, f"nsd and unbound in {host}")
        except BaseException:
            self.stop()
            raise

    anchors: dict[str, str] = {}

    def _write_zone(self, zone: str, serial: int = 1) -> str:
        """Write (and sign, with the zone's keys) ``zone``; its file name for NSD."""
        ttl = self.ttl
        lines = [f"$ORIGIN {zone}.", f"$TTL {ttl}", f"@ IN SOA ns.{zone}. h.{zone}. {serial} 3600 600 86400 {ttl}",
                 f"@ IN NS ns.{zone}."]
        lines += [f"{owner} IN {rtype} {rdata}" for owner, records in self.zones[zone].items()
                  for rtype, rdata in records]
        (self.dir / f"{zone}.zone").write_text("\n".join(lines) + "\n")
        return self._sign(zone) if zone in self.signed else f"{zone}.zone"

    def _sign(self, zone: str) -> str:
        run = lambda *argv: subprocess.run(argv, cwd=self.dir, check=True, capture_output=True,  # noqa: E731
                                           text=True).stdout.strip()
        if zone not in self.keys:
            self.keys[zone] = (run("ldns-keygen", "-a", "ECDSAP256SHA256", zone),
                               run("ldns-keygen", "-a", "ECDSAP256SHA256", "-k", zone))
            self.anchors = {**self.anchors, zone: self.keys[zone][1]}
        run("ldns-signzone", "-n", "-f", f"{zone}.zone.signed", f"{zone}.zone", *self.keys[zone])
        return f"{zone}.zone.signed"

    def set_records(self, zone: str, owner: str, records: list[tuple[str, str]]) -> None:
        """Replace ``owner``'s records in ``zone`` (signed again with the same keys) and reload NSD;
        unbound sees the change once its cache (at most 5 s) lets go of the old answer."""
        self.zones[zone][owner] = records
        self.serial = getattr(self, "serial", 1) + 1
        self._write_zone(zone, self.serial)
        os.kill(self.processes[0].pid, signal.SIGHUP)  # nsd -d: SIGHUP reloads the zone files

    def query(self, name: str, rtype: str) -> dns.message.Message:
        """Ask unbound from inside the lab (AD asked for)."""
        with self.lab.connect(self.host, self.address, 53, timeout=2) as sock:
            sock.setblocking(False)
            query = dns.message.make_query(name, rtype)
            query.flags |= dns.flags.AD
            return dns.query.tcp(query, self.address, timeout=2, sock=sock)

    def _ready(self) -> bool:
        for process in self.processes:
            assert process.poll() is None, (self.dir / "daemons.out").read_text()
        for zone in self.zones:
            try:
                response = self.query(zone + ".", "SOA")
            except (OSError, dns.exception.DNSException):
                return False
            if response.rcode() != dns.rcode.NOERROR or not response.answer:
                return False
            if zone in self.signed and not response.flags & dns.flags.AD:
                return False
        return True

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(10)
        self._out.close()
        gevent.get_hub().threadpool.apply(shutil.rmtree, (self.dir, True))


class PolicyServer:
    """An HTTPS server in ``host`` serving MTA-STS policies: {domain: policy text}."""

    def __init__(self, lab: NetLab, host: str, address: str, chain: Path, key: Path, policies: dict[str, str]) -> None:
        self.lab, self.host, self.address = lab, host, address
        self.dir = Path(private_folder("qpg-sts-"))
        (self.dir / "policies.json").write_text(json.dumps(policies))
        self._out = open(self.dir / "server.out", "wb")
        self.process = subprocess.Popen(
            lab.command(host, sys.executable, "-m", "qpgevent.testing.sts_server", address,
                        str(chain), str(key), str(self.dir / "policies.json")),
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT)
        wait_until(lambda: b"ready" in (self.dir / "server.out").read_bytes() or self.process.poll() is not None,
                   20, "the MTA-STS policy server")
        assert self.process.poll() is None, (self.dir / "server.out").read_text()

    def log(self) -> str:
        return (self.dir / "server.out").read_text()

    def posted(self) -> list[tuple[str, str, str, bytes]]:
        """What was POSTed so far: (Host, path, Content-Type, body), in order."""
        posts = []
        for path in sorted(self.dir.glob("posted-*.bin"), key=lambda p: int(p.name.split("-")[1])):
            target, content_type, body = path.read_bytes().split(b"\n", 2)
            posts.append((path.stem.split("-", 2)[2], target.decode(), content_type.decode(), body))
        return posts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self._out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


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

"""Real nameservers on loopback for tests: NSD with zones from Python dicts, a slow front, a dead one.

``LoopbackDns`` writes NSD zone files and an ``nsd.conf`` into a temp dir, starts ``nsd -d``
on 127.0.0.1 at a free port, and returns once every zone answers its SOA query. Zones are
plain dicts, owner name -> list of ``(type, rdata)`` or ``(type, rdata, ttl)`` in zone-file
syntax; each zone gets an SOA and an NS record of its own::

    LoopbackDns({
        "example.test": {"@": [("MX", "10 mail.example.test."), ("TXT", '"v=spf1 -all"')],
                         "mail": [("A", "192.0.2.25"), ("AAAA", "2001:db8::25")]},
        **ptr_zone_for("127.0.0.0/8", {"127.0.0.1": "localhost.example.test."}),
        **blocklist_zone("zen.test", {"127.0.0.2": ("127.0.0.2", "Listed: test entry")}),
    })

Names are written as they go on the wire: an IDN zone is given in its A-label form
(``xn--bcher-kva.test``), so a test states the encoding it expects.

``SlowDnsFront`` forwards UDP and TCP queries to a real server, each ``delay`` seconds late,
and counts them (with ``delay=0`` it is a query counter). ``DeadDns`` binds a port and never
answers. Both run as greenlets in the test process. Runtime code never imports this module.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.reversename
import gevent
from gevent.server import DatagramServer, StreamServer

__all__ = ["LoopbackDns", "SlowDnsFront", "DeadDns", "ptr_zone_for", "blocklist_zone",
           "blocklist_owner", "free_port"]

HOST = "127.0.0.1"
Record = tuple[str, str] | tuple[str, str, int]
Zones = dict[str, dict[str, list[Record]]]


def free_port(attempts: int = 50) -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (DNS needs the same number for both)."""
    for _ in range(attempts):
        udp, tcp = _bind_pair(0)
        if udp is None:
            continue
        port = udp.getsockname()[1]
        udp.close()
        tcp.close()
        return port
    raise RuntimeError(f"no port free for UDP and TCP after {attempts} attempts")


def _bind_pair(port: int) -> tuple[Any, Any]:
    """A UDP socket and a listening TCP socket on the same port, or (None, None) if taken."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        tcp.bind((HOST, udp.getsockname()[1]))
        tcp.listen(128)
    except OSError:
        udp.close()
        tcp.close()
        return None, None
    return udp, tcp


def ptr_zone_for(network: str, names: dict[str, str | list[str]]) -> Zones:
    """A reverse zone (in-addr.arpa or ip6.arpa) for ``network`` with PTR records ip -> name(s).

    IPv4 networks must end on an octet (/8, /16, /24), IPv6 ones on a nibble (/4 steps).
    Returns ``{zone: records}``, to be merged into the zones given to LoopbackDns.
    """
    net = ipaddress.ip_network(network)
    step = 8 if net.version == 4 else 4
    if net.prefixlen % step:
        raise ValueError(f"{network}: a reverse zone needs a prefix on a {step}-bit boundary")
    labels = (32 if net.version == 4 else 128) // step - net.prefixlen // step
    full = dns.reversename.from_address(str(net.network_address))
    zone = dns.name.Name(full.labels[labels:])
    records: dict[str, list[Record]] = {}
    for ip, targets in names.items():
        if ipaddress.ip_address(ip) not in net:
            raise ValueError(f"{ip} is not in {network}")
        owner = dns.reversename.from_address(ip).relativize(zone).to_text()
        for target in [targets] if isinstance(targets, str) else targets:
            records.setdefault(owner, []).append(("PTR", target))
    return {zone.to_text(omit_final_dot=True): records}


def blocklist_owner(ip: str) -> str:
    """The owner name of ``ip`` in a DNS blocklist zone (RFC 5782 2.1 and 2.4), relative."""
    origin = dns.name.from_text("zone.invalid.")
    return dns.reversename.from_address(ip, origin, origin).relativize(origin).to_text()


def blocklist_zone(zone: str, listed: dict[str, tuple[str, str | None]]) -> Zones:
    """A DNSBL zone: ip -> (A value such as "127.0.0.2", TXT reason or None)."""
    records: dict[str, list[Record]] = {}
    for ip, (value, reason) in listed.items():
        entry = records.setdefault(blocklist_owner(ip), [])
        entry.append(("A", value))
        if reason is not None:
            entry.append(("TXT", _quoted(reason)))
    return {zone: records}


def _quoted(text: str) -> str:
    # A TXT string holds at most 255 octets: longer text becomes several strings.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    chunks = [escaped[i:i + 200] for i in range(0, len(escaped), 200)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


class LoopbackDns:
    """NSD serving ``zones`` on 127.0.0.1:``port``; a context manager; ``stop()`` ends it.

    ``ttl`` is every record's default TTL; ``negative_ttl`` is the SOA minimum (RFC 2308 5),
    what a resolver caches NXDOMAIN and no-data answers for. ``servfail_zones`` are
    configured without a zone file: NSD answers SERVFAIL for every name in them.
    """

    def __init__(self, zones: Zones, ttl: int = 300, negative_ttl: int = 300,
                 servfail_zones: tuple[str, ...] = (), ready_timeout: float = 10.0) -> None:
        nsd = shutil.which("nsd") or shutil.which("nsd", path="/usr/sbin:/usr/local/sbin")
        if nsd is None:
            raise RuntimeError("nsd is not installed (Debian: apt-get install nsd)")
        self.zones = zones
        self.servfail_zones = tuple(servfail_zones)
        self.dir = Path(tempfile.mkdtemp(prefix="qpg-nsd-"))
        self.process: subprocess.Popen[bytes] | None = None
        try:
            self._write_zones(ttl, negative_ttl)
        except Exception:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        # Another process may take the port between free_port() and nsd's bind: try again.
        for attempt in range(3):
            self.port = free_port()
            self._write_conf()
            self._log = open(self.dir / "nsd.out", "wb")
            self.process = subprocess.Popen(
                [nsd, "-d", "-c", str(self.dir / "nsd.conf")], stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
            if self._wait_ready(ready_timeout):
                return
            self.stop(keep_dir=True)
        log = self.log()
        shutil.rmtree(self.dir, ignore_errors=True)
        raise RuntimeError(f"nsd did not answer on 127.0.0.1:{self.port}:\n{log[-2000:]}")

    def _write_zones(self, ttl: int, negative_ttl: int) -> None:
        checkzone = shutil.which("nsd-checkzone") or shutil.which("nsd-checkzone", path="/usr/sbin")
        for zone, owners in self.zones.items():
            if not zone.isascii():
                raise ValueError(f"zone {zone!r}: write names in A-label form (xn--...)")
            lines = [f"$ORIGIN {zone}.", f"$TTL {ttl}",
                     f"@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 {negative_ttl}",
                     f"@ IN NS ns.{zone}."]
            for owner, records in owners.items():
                if not owner.isascii():
                    raise ValueError(f"{owner!r} in {zone}: write names in A-label form (xn--...)")
                for record in records:
                    rtype, rdata = record[0], record[1]
                    record_ttl = f"{record[2]} " if len(record) == 3 else ""
                    lines.append(f"{owner} {record_ttl}IN {rtype} {rdata}")
            path = self.dir / f"{zone}.zone"
            path.write_text("\n".join(lines) + "\n", encoding="ascii")
            if checkzone:
                # nsd itself would start and just leave the broken zone out.
                check = subprocess.run([checkzone, zone, str(path)], capture_output=True, text=True)
                if check.returncode:
                    raise ValueError(f"zone {zone}: {(check.stderr or check.stdout).strip()}")

    def _write_conf(self) -> None:
        d = self.dir
        conf = [
            "server:",
            f"    ip-address: {HOST}@{self.port}",
            "    do-ip6: no",
            '    username: ""',
            '    chroot: ""',
            f'    zonesdir: "{d}"',
            '    database: ""',
            f'    pidfile: "{d}/nsd.pid"',
            f'    xfrdfile: "{d}/xfrd.state"',
            f'    zonelistfile: "{d}/zone.list"',
            f'    logfile: "{d}/nsd.log"',
            "    server-count: 1",
            # Response rate limiting is on by default (200/s per /24): a concurrency test
            # would see truncated and dropped answers.
            "    rrl-ratelimit: 0",
            "    rrl-whitelist-ratelimit: 0",
            "remote-control:",
            "    control-enable: no",
        ]
        for zone in self.zones:
            conf += ["zone:", f"    name: {zone}", f"    zonefile: {zone}.zone"]
        for zone in self.servfail_zones:
            conf += ["zone:", f"    name: {zone}", f"    zonefile: {zone}.missing.zone"]
        (d / "nsd.conf").write_text("\n".join(conf) + "\n", encoding="ascii")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pending = list(self.zones)
        while pending and time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                # TCP: refused at once while nsd is not listening yet, where UDP would wait.
                query = dns.message.make_query(pending[0] + ".", "SOA")
                response = dns.query.tcp(query, HOST, timeout=1.0, port=self.port)
            except (OSError, dns.exception.DNSException):
                gevent.sleep(0.02)  # polling interval for a process starting up
                continue
            if response.rcode() == dns.rcode.NOERROR and response.answer:
                pending.pop(0)
            else:
                gevent.sleep(0.02)
        return not pending

    def log(self) -> str:
        parts = []
        for name in ("nsd.out", "nsd.log"):
            path = self.dir / name
            if path.exists():
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
        return "\n".join(parts)

    def stop(self, keep_dir: bool = False) -> None:
        """Stop NSD (SIGTERM to its process group, SIGKILL after 10 s); remove the temp dir."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
            except ProcessLookupError:
                process.wait(10)
        if process is not None:
            self._log.close()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LoopbackDns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SlowDnsFront:
    """Forwards each UDP and TCP query to 127.0.0.1:``upstream_port`` ``delay`` seconds late.

    Greenlets in this process. ``queries`` counts the queries received; ``delay`` may be
    changed at any time. ``arrivals`` has, for each UDP query in the order they came, how
    many answers had been sent when it came: two look-ups that ran at once both came
    before the first answer. Each query goes upstream on its own socket, so concurrent
    clients with colliding query IDs cannot be mixed up.
    """

    def __init__(self, upstream_port: int, delay: float = 1.0, upstream_timeout: float = 10.0) -> None:
        self.upstream = (HOST, upstream_port)
        self.delay = delay
        self.upstream_timeout = upstream_timeout
        self.queries = 0
        self.answered = 0
        self.arrivals: list[int] = []
        udp, tcp = _bind_listeners()
        # Room for a burst of hundreds of queries arriving before the first is read.
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port = udp.getsockname()[1]
        self._udp = DatagramServer(udp, self._on_datagram)
        self._tcp = StreamServer(tcp, self._on_stream)
        self._udp.start()
        self._tcp.start()

    def _on_datagram(self, query: bytes, client: Any) -> None:
        self.queries += 1
        self.arrivals.append(self.answered)
        gevent.sleep(self.delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as upstream:
            upstream.settimeout(self.upstream_timeout)
            upstream.sendto(query, self.upstream)
            try:
                answer = upstream.recv(65535)
            except OSError:
                return  # upstream gone: the client sees a timeout, as it would in real life
        self._udp.sendto(answer, client)
        self.answered += 1

    def _on_stream(self, sock: socket.socket, client: Any) -> None:
        sock.settimeout(self.upstream_timeout)
        upstream: socket.socket | None = None
        try:
            while True:
                query = _read_framed(sock)
                if query is None:
                    return
                self.queries += 1
                gevent.sleep(self.delay)
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, self.upstream_timeout)
                upstream.sendall(struct.pack("!H", len(query)) + query)
                answer = _read_framed(upstream)
                if answer is None:
                    return
                sock.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()

    def stop(self) -> None:
        self._udp.stop(0)
        self._tcp.stop(0)

    def __enter__(self) -> SlowDnsFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DeadDns:
    """A nameserver that never answers: a bound UDP port nobody reads, a TCP port nobody accepts."""

    def __init__(self) -> None:
        self._udp, self._tcp = _bind_listeners()
        self.port = self._udp.getsockname()[1]

    def stop(self) -> None:
        self._udp.close()
        self._tcp.close()

    def __enter__(self) -> DeadDns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _bind_listeners(attempts: int = 50) -> tuple[socket.socket, socket.socket]:
    for _ in range(attempts):
        udp, tcp = _bind_pair(0)
        if udp is not None:
            return udp, tcp
    raise RuntimeError(f"no port free for UDP and TCP after {attempts} attempts")


def _read_framed(sock: socket.socket) -> bytes | None:
    """One DNS-over-TCP message (2-octet length prefix, RFC 1035 4.2.2); None at EOF."""
    header = _read_exactly(sock, 2)
    if header is None:
        return None
    return _read_exactly(sock, struct.unpack("!H", header)[0])


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)

"""PROXY protocol v1 and v2: through a real HAProxy, and every refusal over a raw socket.

The layout makes the client's address something only the header can tell: the client
connects to HAProxy from 127.0.0.9, HAProxy connects to the in-process server from
127.0.0.1 (the one trusted proxy address), with ``send-proxy`` on one frontend and
``send-proxy-v2`` on the other. Raw-socket tests talk to the server directly: from
127.0.0.1 as the trusted proxy, and from 127.0.0.5 as a client that is not one. The
``peers`` test plugin writes down each connection's addresses at ``connect``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import pytest

from qpgevent.config import load
from qpgevent.core.errors import ConfigError
from qpgevent.core.proxy import V2_SIGNATURE
from qpgevent.testing import DEFAULT_PLUGINS, maildir_messages, wait_until, write_ini

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")
PLUGINS = "[[peers]]\n" + DEFAULT_PLUGINS
PROXY_IP = "127.0.0.1"  #: HAProxy's side towards the server, and the trusted address
CLIENT_IP = "127.0.0.9"  #: the client's side towards HAProxy
STRANGER_IP = "127.0.0.5"  #: not a trusted proxy
SENDER, RECIPIENT = "a@client.test", "bob@example.test"
HELLO = b"EHLO client.test\r\n"

class HAProxy:
    """``haproxy -db`` in its own process group, one frontend per PROXY version.

    Its frontends listen on sockets we bind and hand over (``bind fd@N``), so their
    ports are known without a race. Ready means its stats socket answers: a probe on a
    frontend would make HAProxy open a backend connection, which the server counts as
    a client (see ``shared/recipes/haproxy-proxy-protocol.md``).
    """

    SEND = {"v1": "send-proxy", "v2": "send-proxy-v2"}

    def __init__(self, workdir: Path, backend: tuple[str, int], timeout: float = 10.0) -> None:
        # A Unix socket path has to fit in 108 octets; pytest's tmp_path may not.
        self.rundir = tempfile.mkdtemp(prefix="haproxy-")
        self.admin = os.path.join(self.rundir, "admin.sock")
        listeners = {}
        for version in self.SEND:
            listener = socket.socket()
            listener.bind((PROXY_IP, 0))
            listener.listen(64)
            listeners[version] = listener
        self.ports = {version: listener.getsockname()[1] for version, listener in listeners.items()}
        sections = "".join(f"""
frontend fe_{version}
    bind fd@{listener.fileno()}
    default_backend be_{version}
backend be_{version}
    server smtp {backend[0]}:{backend[1]} {self.SEND[version]} source {PROXY_IP}
""" for version, listener in listeners.items())
        config = workdir / "haproxy.cfg"
        config.write_text(f"""global
    maxconn 1000
    stats socket {self.admin} mode 600 level admin
    log stderr format short local0 info
defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 1m
    timeout server 1m
{sections}""")
        fds = [listener.fileno() for listener in listeners.values()]
        self.log_path = workdir / "haproxy.log"
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], pass_fds=fds,
                                            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                            start_new_session=True)
        for listener in listeners.values():
            listener.close()  # HAProxy holds them now
        deadline = time.monotonic() + timeout
        while "Name: HAProxy" not in self.ask("show info"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"HAProxy not ready:\n{self.log_path.read_text()}")
            gevent.sleep(0.02)

    def ask(self, command: str) -> str:
        try:
            with socket.socket(socket.AF_UNIX) as admin:
                admin.settimeout(2)
                admin.connect(self.admin)
                admin.sendall(command.encode() + b"\n")
                return b"".join(iter(lambda: admin.recv(65536), b"")).decode()
        except OSError:
            return ""

    def smtp(self, version: str, source: str = CLIENT_IP) -> smtplib.SMTP:
        return smtplib.SMTP(PROXY_IP, self.ports[version], local_hostname="client.test",
                            source_address=(source, 0), timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        shutil.rmtree(self.rundir, ignore_errors=True)


@pytest.fixture
def haproxy(tmp_path):
    """``haproxy(server)``: HAProxy in front of ``server``, stopped after the test."""
    started: list[HAProxy] = []

    if shutil.which("haproxy") is None:  # a missing tool fails, as with swaks: no silent skip
        pytest.fail("HAProxy is not installed: run tools/install-test-deps (Debian package haproxy)")

    def start(server) -> HAProxy:
        started.append(HAProxy(tmp_path, (server.host, server.port)))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def start(make_server):
    """``start(plugins, **settings)``: the real server, 127.0.0.1 trusted, ``peers`` cleared."""

    def run(plugins: str = PLUGINS, **settings):
        settings.setdefault("proxy_trusted", PROXY_IP)
        server = make_server(plugins, plugin_dirs=PLUGIN_DIR, **settings)
        peers().clear()
        return server

    return run


def peers() -> list[dict]:
    return sys.modules["qpgevent_plugins.peers"].PEERS


@pytest.fixture
def server_log():
    """Records of the ``qpgevent`` loggers during the test."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger, handler = logging.getLogger("qpgevent"), Keep(logging.DEBUG)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def v1(source: str = "192.0.2.7", dest: str = "198.51.100.25", sport: int = 40000, dport: int = 25) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {dest} {sport} {dport}\r\n".encode()


def v2(command: int = 0x1, family: int = 0x11, addresses: bytes | None = None, version: int = 2) -> bytes:
    if addresses is None:
        addresses = socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.25") + struct.pack("!HH", 40000, 25)
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(addresses)) + addresses


def connect(server, source: str = PROXY_IP) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=5, source_address=(source, 0))


def read_to_eof(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def read_reply(reader) -> bytes:
    """One whole reply, multi-line ones included."""
    lines = b""
    while True:
        line = reader.readline()
        assert line, f"connection closed after {lines!r}"
        lines += line
        if line[3:4] != b"-":
            return lines


# -- through HAProxy -----------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_mail_through_haproxy_is_from_the_client(start, haproxy, version):
    server = start()
    proxy = haproxy(server)
    body = f"Subject: through HAProxy {version}\r\n\r\nhello\r\n".encode()
    with proxy.smtp(version) as client:
        client_port = client.sock.getsockname()[1]
        code, text = client.ehlo()
        assert code == 250 and text.startswith(f"mx.example.test Hi there [{CLIENT_IP}]".encode())
        assert client.sendmail(SENDER, [RECIPIENT], body) == {}
    [message] = maildir_messages(server.maildir).values()
    received = message.split(b"\r\n")[1]
    assert received == f"Received: from client.test (unknown [{CLIENT_IP}])".encode()
    assert message.endswith(body)
    [peer] = peers()
    # The client's address and port, and the frontend it reached, all from the header.
    assert peer == {"remote_ip": CLIENT_IP, "remote_port": client_port, "local_ip": PROXY_IP,
                    "local_port": proxy.ports[version], "proxy_ip": PROXY_IP,
                    "proxy_port": peer["proxy_port"]}
    assert peer["proxy_port"] > 0


def test_hosts_allow_counts_clients_behind_the_proxy_not_the_proxy(start, haproxy):
    server = start("[[hosts_allow]]\n  max_conn_ip = 2\n" + PLUGINS)
    proxy = haproxy(server)
    # Four sessions from the proxy's one address: two per client, within the limit.
    clients = [proxy.smtp(version, source) for source in (CLIENT_IP, "127.0.0.10") for version in ("v1", "v2")]
    try:
        assert [client.noop()[0] for client in clients] == [250] * 4
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            proxy.smtp("v1", CLIENT_IP)
        assert refused.value.smtp_code == 421
        assert refused.value.smtp_error == f"4.7.0 too many connections from {CLIENT_IP}, try again later".encode()
    finally:
        for client in clients:
            client.quit()
    # The refused one never reached connect.
    assert sorted(peer["remote_ip"] for peer in peers()) == sorted([CLIENT_IP, "127.0.0.10"] * 2)


# -- a trusted proxy, over a raw socket ------------------------------------------------

@pytest.mark.parametrize("header, ip", [
    (v1(), "192.0.2.7"),
    (v1("2001:db8::7", "2001:db8::25"), "2001:db8::7"),
    (v1("::ffff:192.0.2.7", "::ffff:198.51.100.25"), "192.0.2.7"),  # one client, one address
    (v2(), "192.0.2.7"),
    (v2(family=0x21, addresses=socket.inet_pton(socket.AF_INET6, "2001:db8::7")
        + socket.inet_pton(socket.AF_INET6, "2001:db8::25") + struct.pack("!HH", 40000, 25)), "2001:db8::7"),
    (v2(addresses=socket.inet_aton("192.0.2.7") + socket.inet_aton("198.51.100.25")
        + struct.pack("!HH", 40000, 25) + b"\x04\x00\x03abc"), "192.0.2.7"),  # a TLV, ignored
], ids=["v1", "v1-tcp6", "v1-mapped", "v2", "v2-tcp6", "v2-tlv"])
def test_header_and_pipelined_commands_in_one_segment(start, header, ip):
    server = start()
    with connect(server) as sock:
        # Talking before the greeting is rude, but the bytes after the header are SMTP's.
        sock.sendall(header + HELLO + b"QUIT\r\n")
        replies = read_to_eof(sock).split(b"\r\n")
    assert replies[0].startswith(b"220 mx.example.test ESMTP")
    assert replies[1] == f"250-mx.example.test Hi there [{ip}]".encode()
    assert replies[-2].startswith(b"221 2.0.0 ") and replies[-1] == b""
    [peer] = peers()
    assert (peer["remote_ip"], peer["remote_port"], peer["local_port"], peer["proxy_ip"]) == (ip, 40000, 25, PROXY_IP)


@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
def test_header_in_pieces(start, header):
    server = start()
    with connect(server) as sock, sock.makefile("rb") as reader:
        for piece in (header[:3], header[3:14], header[14:-1], header[-1:]):
            sock.sendall(piece)
            gevent.sleep(0.05)
        assert read_reply(reader).startswith(b"220 ")
        sock.sendall(HELLO)
        assert read_reply(reader).startswith(b"250-mx.example.test Hi there [192.0.2.7]")
    assert peers()[0]["local_ip"] == "198.51.100.25"


def test_the_header_is_not_early_talk_but_the_bytes_after_it_are(start):
    """The header is taken off the socket to the octet; earlytalker judges what is left."""
    server = start("[[earlytalker]]\n  wait = 0.3\n" + PLUGINS)
    with connect(server) as sock:
        sock.sendall(v1())
        assert sock.recv(100).startswith(b"220 mx.example.test ")
    with connect(server) as sock:
        sock.sendall(v1() + HELLO)
        assert read_to_eof(sock) == (b"554 5.7.1 Connecting host started transmitting before SMTP greeting"
                                     b"\r\n")


@pytest.mark.parametrize("header", [v2(command=0x0, family=0x0, addresses=b""), b"PROXY UNKNOWN\r\n",
                                    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"],
                         ids=["v2-local", "v1-unknown", "v1-unknown-addresses"])
def test_health_checks_keep_the_proxy_address(start, header):
    server = start()
    with connect(server) as sock:
        sock.sendall(header + HELLO + b"QUIT\r\n")
        replies = read_to_eof(sock).split(b"\r\n")
        port = sock.getsockname()[1]
    assert replies[1] == f"250-mx.example.test Hi there [{PROXY_IP}]".encode()
    assert peers() == [{"remote_ip": PROXY_IP, "remote_port": port, "local_ip": server.host,
                        "local_port": server.port, "proxy_ip": PROXY_IP, "proxy_port": port}]


@pytest.mark.parametrize("header, reason", [
    (b"PROXY TCP4 192.0.2.7 198.51.100.25 40000\r\n", "malformed PROXY v1 line"),
    (b"PROXY TCP4 192.0.2.700 198.51.100.25 40000 25\r\n", "bad address '192.0.2.700' in PROXY v1 line"),
    (b"PROXY TCP4 " + b"1" * 120, "PROXY v1 line too long"),
    (v2(version=1), "unsupported PROXY version"),
    (v2(family=0x31, addresses=b"\0" * 216), "unsupported PROXY v2 address family"),  # AF_UNIX
    (v2(addresses=b"\x7f\0\0\x01"), "PROXY v2 address block too short"),
    (HELLO, "no PROXY header"),  # a client on the proxy's address: it must come through the proxy
], ids=["v1-short", "v1-address", "v1-long", "v2-version", "v2-unix", "v2-short", "smtp"])
def test_a_bad_header_from_a_trusted_proxy_gets_421(start, server_log, header, reason):
    server = start()
    with connect(server) as sock:
        sock.sendall(header)
        assert read_to_eof(sock) == b"421 4.7.0 mx.example.test Bad PROXY header, closing connection\r\n"
    assert peers() == []  # no session: no hook ran
    [warning] = [r.getMessage() for r in server_log if r.levelno == logging.WARNING]
    assert warning.endswith(f": bad PROXY header: {reason}; closing with 421")
    assert f"proxy {PROXY_IP}:" in warning


def test_a_trusted_proxy_that_says_nothing_gets_421_after_the_timeout(start, server_log):
    server = start(proxy_timeout=0.3)
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(b"PROXY TCP4 192.0")  # a start is not enough
        assert read_to_eof(sock) == b"421 4.7.0 mx.example.test No PROXY header in time, closing connection\r\n"
    assert 0.3 <= time.monotonic() - started < 2
    assert any(r.getMessage().endswith("no PROXY header within 0.3s; closing with 421") for r in server_log)
    assert peers() == []


def test_stopping_while_a_proxy_header_is_awaited(start):
    server = start(proxy_timeout=30)
    with connect(server) as sock:
        wait_until(lambda: server.server.sessions, 5, "the server to take the connection")
        stopper = gevent.spawn(server.stop, 0.1)
        assert read_to_eof(sock) == b"421 4.3.2 Service shutting down, try again later\r\n"
        stopper.join(5)
        assert stopper.successful()


# -- not a trusted proxy -----------------------------------------------------------------

@pytest.mark.parametrize("header", [v1(), v2()], ids=["v1", "v2"])
@pytest.mark.parametrize("trusted, source", [(PROXY_IP, STRANGER_IP), ("", PROXY_IP)],
                         ids=["unlisted", "proxy-off"])
def test_a_header_from_an_untrusted_address_gets_421(start, server_log, header, trusted, source):
    server = start(proxy_trusted=trusted)
    with connect(server, source) as sock:
        sock.sendall(header + HELLO)
        replies = read_to_eof(sock).split(b"\r\n")
    assert replies[0].startswith(b"220 mx.example.test ")
    assert replies[1:] == [f"421 4.7.0 mx.example.test PROXY header not accepted from {source}, "
                           "closing connection".encode(), b""]
    [peer] = peers()
    assert (peer["remote_ip"], peer["proxy_ip"]) == (source, None)  # the header changed nothing
    assert any(f"PROXY header from {source}, which is not in [proxy] trusted" in r.getMessage()
               for r in server_log if r.levelno == logging.WARNING)


def test_an_untrusted_client_is_served_as_before(start):
    server = start()
    with smtplib.SMTP(server.host, server.port, source_address=(STRANGER_IP, 0), timeout=5) as client:
        assert client.ehlo()[1].startswith(f"mx.example.test Hi there [{STRANGER_IP}]".encode())
        assert client.sendmail(SENDER, [RECIPIENT], b"Subject: direct\r\n\r\nhi\r\n") == {}
    assert peers()[0]["proxy_ip"] is None


# -- the setting -------------------------------------------------------------------------

def test_trusted_takes_addresses_and_networks(tmp_path):
    ini = write_ini(tmp_path, proxy_trusted="192.0.2.10, 10.0.0.0/8, 2001:db8::/32", proxy_timeout=2.5)
    settings = load(str(ini))
    assert [str(n) for n in settings.proxy_trusted] == ["192.0.2.10/32", "10.0.0.0/8", "2001:db8::/32"]
    assert settings.proxy_timeout == 2.5
    assert load(str(write_ini(tmp_path))).proxy_trusted == ()  # default: PROXY off


def test_a_bad_trusted_entry_is_one_line_naming_file_line_and_key(tmp_path):
    ini = write_ini(tmp_path, proxy_trusted="10.0.0.0/8, haproxy.example")
    line = ini.read_text().splitlines().index("  trusted = 10.0.0.0/8, haproxy.example") + 1
    with pytest.raises(ConfigError) as error:
        load(str(ini))
    assert str(error.value) == f"{ini}:{line}: [proxy] trusted: 'haproxy.example' is not an address or network"


def test_the_readme_example_is_a_valid_config(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    [example] = [block for block in re.findall(r"```ini\n(.*?)```", readme, re.DOTALL) if "[proxy]" in block]
    ini = tmp_path / "qpsmtpd.ini"
    ini.write_text(example, encoding="utf-8")
    settings = load(str(ini))
    assert [str(n) for n in settings.proxy_trusted] == ["10.0.0.5/32", "10.0.1.0/24"]
    assert settings.proxy_timeout == 5

"""Real content scanners on loopback for tests: SpamAssassin's spamd, ClamAV's clamd, a hung one.

``LoopbackSpamd`` runs Debian's ``spamd`` on 127.0.0.1 at a free port with a private site
config (no DNS, no network tests, no Bayes), and returns once it answers PING.
``LoopbackClamd`` runs ``clamd`` with a private signature database holding one body
signature for the EICAR test string (no freshclam, no downloads); it reports it as
``QPGEVENT.Test.EICAR.UNOFFICIAL``. ``HungScanner`` accepts connections and never answers
(a scanner stuck on a lock); ``dead_port()`` is a port nobody listens on.
All are context managers. Runtime code never imports this module. How the daemons are
set up and why: ``shared/recipes/spamd.md`` and ``clamd.md``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from typing import Any, Callable

import gevent
import gevent.event
from gevent.server import StreamServer

__all__ = ["LoopbackSpamd", "LoopbackClamd", "HungScanner", "dead_port", "free_tcp_port",
           "GTUBE", "EICAR", "EICAR_NAME", "spamc", "clamd_instream"]

HOST = "127.0.0.1"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "QPGEVENT.Test.EICAR.UNOFFICIAL"

SPAMD_LOCAL_CF = """use_bayes 0
bayes_auto_learn 0
skip_rbl_checks 1
dns_available no
use_razor2 0
use_pyzor 0
required_score 5.0
"""


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def dead_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    return free_tcp_port()


def spamc(port: int, message: bytes, command: str = "CHECK", timeout: float = 30) -> tuple[str, dict[str, str], bytes]:
    """One SPAMC/1.5 request -> (status line, headers, body). For readiness checks and tests."""
    request = f"{command} SPAMC/1.5\r\nContent-length: {len(message)}\r\nUser: nobody\r\n\r\n".encode()
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(request + message)
        sock.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines if ": " in line), body


def clamd_instream(port: int, data: bytes, timeout: float = 30) -> str:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(b"zINSTREAM\0" + struct.pack("!L", len(data)) + data + struct.pack("!L", 0))
        return b"".join(iter(lambda: sock.recv(4096), b"")).rstrip(b"\0").decode()


class _Daemon:
    """A child process in its own process group, stopped with SIGTERM (then SIGKILL)."""

    name = "daemon"

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.workdir = ""
        self.port = 0
        self.ready_after = 0.0

    def _start(self, argv: list[str], ready: Callable[[], bool], timeout: float) -> None:
        log = open(os.path.join(self.workdir, f"{self.name}.out"), "wb")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        start_new_session=True)
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:  # bounded: the daemon answers or we give up
            if self.process.poll() is not None:
                break
            try:
                if ready():
                    self.ready_after = time.monotonic() - started
                    return
            except OSError:
                pass
            gevent.sleep(0.05)  # polling a child's readiness, not synchronising on time
        output = self.log()
        self.stop()
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{output}")

    def log(self) -> str:
        path = os.path.join(self.workdir, f"{self.name}.out")
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()[-4000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LoopbackSpamd(_Daemon):
    """spamd on 127.0.0.1:<free port>; local tests only (required_score 5.0, GTUBE scores 1000)."""

    name = "spamd"

    def __init__(self, timeout: float = 60.0, children: int = 2) -> None:
        super().__init__()
        # The children run as nobody and read the site config then: a world-readable
        # directory of our own (pytest's tmp_path is 0700), writable as their home.
        self.workdir = tempfile.mkdtemp(prefix="qpg-spamd-")
        os.chmod(self.workdir, 0o755)
        if os.getuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.workdir, nobody.pw_uid, nobody.pw_gid)
        site = os.path.join(self.workdir, "site")
        os.makedirs(site)
        for pre in glob.glob("/etc/spamassassin/*.pre"):
            shutil.copy(pre, site)
        with open(os.path.join(site, "local.cf"), "w", encoding="ascii") as handle:
            handle.write(SPAMD_LOCAL_CF)
        self.port = free_tcp_port()
        argv = ["spamd", f"--listen={HOST}:{self.port}", f"--allowed-ips={HOST}",
                f"--pidfile={self.workdir}/spamd.pid", "--syslog=stderr", "--local", "--nouser-config",
                "--username=nobody", f"--helper-home-dir={self.workdir}", f"--siteconfigpath={site}",
                f"--max-children={children}", f"--min-children={min(children, 2)}"]
        self._start(argv, lambda: spamc(self.port, b"", "PING", timeout=2)[0].endswith("PONG"), timeout)


class LoopbackClamd(_Daemon):
    """clamd on 127.0.0.1:<free port> with one test signature: EICAR, named ``EICAR_NAME``."""

    name = "clamd"

    def __init__(self, timeout: float = 60.0, stream_max: str = "100M", threads: int = 4) -> None:
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="qpg-clamd-")
        db, tmp = os.path.join(self.workdir, "db"), os.path.join(self.workdir, "tmp")
        os.makedirs(db)
        os.makedirs(tmp)
        with open(os.path.join(db, "qpgevent-test.ndb"), "w", encoding="ascii") as handle:
            handle.write("QPGEVENT.Test.EICAR:0:*:%s\n" % EICAR.hex())  # Name:Target:Offset:HexBody
        self.port = free_tcp_port()
        conf = os.path.join(self.workdir, "clamd.conf")
        with open(conf, "w", encoding="ascii") as handle:
            handle.write(f"Foreground yes\nDatabaseDirectory {db}\nTemporaryDirectory {tmp}\n"
                         f"TCPSocket {self.port}\nTCPAddr {HOST}\nPidFile {self.workdir}/clamd.pid\n"
                         f"LogFile {self.workdir}/clamd.log\nMaxThreads {threads}\n"
                         f"StreamMaxLength {stream_max}\nBytecode no\n")
        self._start(["clamd", f"--config-file={conf}"], self._pong, timeout)

    def _pong(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=1) as sock:
            sock.sendall(b"zPING\0")
            return sock.recv(10) == b"PONG\0"


class HungScanner:
    """Accepts connections, reads what it is sent, never answers: a scanner stuck on a lock."""

    def __init__(self) -> None:
        self.connections = 0
        self._sockets: list[Any] = []
        self._closed = gevent.event.Event()
        self.server = StreamServer((HOST, 0), self._handle)
        self.server.start()
        self.port = self.server.server_port

    def _handle(self, sock: Any, address: Any) -> None:
        self.connections += 1
        self._sockets.append(sock)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            return  # closed under us by close(), or reset by the client: the end either way
        self._closed.wait()  # the client finished sending (SHUT_WR): still never answer

    def close(self) -> None:
        self._closed.set()
        self.server.stop(timeout=0)
        for sock in self._sockets:
            sock.close()

    def __enter__(self) -> HungScanner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

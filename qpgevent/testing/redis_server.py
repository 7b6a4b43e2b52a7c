"""A real Redis server on loopback for tests and benchmarks: ``LoopbackRedis``.

Starts ``redis-server`` (Debian package ``redis-server``) on 127.0.0.1 at a free port,
in the foreground, without persistence (``--save ''``, ``--appendonly no``), its data
folder a temporary one; ready once it answers PING. ``stop`` and ``start`` again keep
the port, which is how a test takes Redis away from a running server and gives it
back. ``flush`` empties every database between tests. Runtime code never imports this.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["LoopbackRedis", "redis_ping", "free_tcp_port"]

HOST = "127.0.0.1"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64) == b"+PONG\r\n"
    except OSError:
        return False


def _command(port: int, *words: str) -> bytes:
    with socket.create_connection((HOST, port), timeout=5) as connection:
        parts = [f"*{len(words)}\r\n".encode()] + [f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words]
        connection.sendall(b"".join(parts))
        return connection.recv(4096)


class LoopbackRedis:
    def __init__(self, binary: str = "redis-server", ready_timeout: float = 10.0) -> None:
        self.binary = shutil.which(binary) or binary
        self.ready_timeout = ready_timeout
        self.folder = Path(tempfile.mkdtemp(prefix="qpg-redis-"))
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port once it has one); return once it answers PING."""
        attempts = 1 if self.port else 5  # a fresh port may be taken between probe and bind
        for _ in range(attempts):
            port = self.port or free_tcp_port()
            with open(self.folder / "redis.log", "ab") as log_file:
                self.process = subprocess.Popen(
                    [self.binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                     "--dir", str(self.folder), "--daemonize", "no", "--logfile", "", "--databases", "4"],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + self.ready_timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if redis_ping(port):
                    self.port = port
                    return
                time.sleep(0.02)
            self._reap()
        raise RuntimeError(f"redis-server did not start:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM and wait: the port is closed when this returns."""
        self._reap()

    def _reap(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def flush(self) -> None:
        reply = _command(self.port, "FLUSHALL")
        if reply != b"+OK\r\n":
            raise RuntimeError(f"FLUSHALL: {reply!r}")

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        self._reap()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LoopbackRedis:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

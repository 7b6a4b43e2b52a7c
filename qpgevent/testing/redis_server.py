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


def redis_ping(port: int, timeout: float = 1.0, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(64) == b"+PONG\r\n"
    except OSError:
        return False


def _command(port: int, *words: str, host: str = HOST) -> bytes:
    with socket.create_connection((host, port), timeout=5) as connection:
        parts = [f"*{len(words)}\r\n".encode()] + [f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words]
        connection.sendall(b"".join(parts))
        return connection.recv(4096)


class LoopbackRedis:
    def __init__(self, binary: str = "redis-server", ready_timeout: float = 10.0,
                 extra_args: tuple[str, ...] = (), host: str = HOST, port: int = 0,
                 prefix: tuple[str, ...] = ()) -> None:
        self.binary = shutil.which(binary) or binary
        self.ready_timeout = ready_timeout
        #: More redis-server arguments (a replica's ``--replicaof``, for one).
        self.extra_args = extra_args
        #: Where it listens; ``prefix`` runs it elsewhere (``ip netns exec NS``: a lab host).
        self.host, self.prefix = host, prefix
        self.folder = Path(tempfile.mkdtemp(prefix="qpg-redis-"))
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        """Start (again, on the same port once it has one); return once it answers PING."""
        attempts = 1 if self.port else 5  # a fresh port may be taken between probe and bind
        for _ in range(attempts):
            port = self.port or free_tcp_port()
            with open(self.folder / "redis.log", "ab") as log_file:
                self.process = subprocess.Popen(
                    [*self.prefix, self.binary, "--port", str(port), "--bind", self.host,
                     # Protected mode refuses every client but loopback ones when there is no
                     # password: a lab host's clients come from other addresses.
                     "--protected-mode", "no" if self.prefix else "yes", "--save", "", "--appendonly", "no",
                     "--dir", str(self.folder), "--daemonize", "no", "--logfile", "", "--databases", "4",
                     # Any server may become the primary: never wait 5 s before a first sync.
                     "--repl-diskless-sync-delay", "0", *self.extra_args],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + self.ready_timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if redis_ping(port, host=self.host):
                    self.port = port
                    return
                time.sleep(0.02)
            self._reap()
        raise RuntimeError(f"redis-server did not start:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM and wait: the port is closed when this returns."""
        self._reap()

    def crash(self) -> None:
        """SIGKILL: a crash, not a shutdown (no goodbye to replicas or clients)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

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
        reply = _command(self.port, "FLUSHALL", host=self.host)
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

"""Redis with Sentinel on loopback for tests: a primary, a replica and three Sentinels.

``LoopbackSentinels`` starts a primary and a replica (``LoopbackRedis``, each in its own
folder: a replica writes the RDB it receives), waits until the replica is in sync, then
starts three Sentinels (``redis-server CONF --sentinel``, quorum 2, each with a freshly
written config file of its own: Sentinel rewrites it, and two copies of one file would
share an ID). Ready once every Sentinel knows the primary, the replica and the two other
Sentinels, the only sign that a failover can be voted. ``down_after`` is 1000 ms: lower
values make the Sentinels flag the new primary down right after a failover (measured:
see shared/recipes/redis-sentinel.md). ``crash_primary`` kills the primary (SIGKILL),
``wait_for_failover`` returns the new primary's port once the Sentinels agree on it.
Runtime code never imports this.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from .redis_server import HOST, LoopbackRedis, free_tcp_port

__all__ = ["LoopbackSentinels"]

MASTER_NAME = "mymaster"


def _sentinel_config(host: str, port: int, folder: Path, primary_port: int, down_after: int) -> str:
    return "\n".join([
        f"port {port}", f"bind {host}", "daemonize no", f"dir {folder}",
        f"sentinel monitor {MASTER_NAME} {host} {primary_port} 2",
        f"sentinel down-after-milliseconds {MASTER_NAME} {down_after}",
        f"sentinel failover-timeout {MASTER_NAME} 10000",
        f"sentinel parallel-syncs {MASTER_NAME} 1", ""])


def _info(host: str, port: int) -> dict[str, Any]:
    with redis.Redis(host, port, socket_timeout=1, socket_connect_timeout=1) as client:
        return dict(client.info("replication"))


class LoopbackSentinels:
    def __init__(self, ready_timeout: float = 30.0, down_after: int = 1000, host: str = HOST,
                 ports: tuple[int, ...] = (), prefix: tuple[str, ...] = ()) -> None:
        """``host``, ``ports`` (primary, replica, three Sentinels) and ``prefix`` place the group
        elsewhere than on free loopback ports: ``prefix`` is ``ip netns exec NS`` for a lab host."""
        self.ready_timeout = ready_timeout
        self.host, self.prefix = host, prefix
        ports = ports or (0, 0, 0, 0, 0)
        self.folder = Path(tempfile.mkdtemp(prefix="qpg-sentinel-"))
        self.sentinels: list[tuple[int, subprocess.Popen[bytes]]] = []
        self.primary = LoopbackRedis(host=host, port=ports[0], prefix=prefix)
        self.replica: LoopbackRedis | None = None
        try:
            self.replica = LoopbackRedis(extra_args=("--replicaof", host, str(self.primary.port)),
                                         host=host, port=ports[1], prefix=prefix)
            replica = self.replica
            self._wait(lambda: _info(host, replica.port).get("master_link_status") == "up",
                       "the replica's first sync")
            for port in ports[2:]:
                self._start_sentinel(down_after, port)
            self._wait(self._group_ready, "the Sentinels to know each other and the replica")
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of each Sentinel: what ``[store] sentinels`` takes."""
        return [f"{self.host}:{port}" for port, _ in self.sentinels]

    @property
    def master_name(self) -> str:
        return MASTER_NAME

    def _start_sentinel(self, down_after: int, port: int = 0) -> None:
        port = port or free_tcp_port()
        folder = self.folder / f"s{port}"
        folder.mkdir()
        config = folder / "sentinel.conf"
        config.write_text(_sentinel_config(self.host, port, folder, self.primary.port, down_after))
        with open(folder / "log", "ab") as log_file:
            process = subprocess.Popen([*self.prefix, shutil.which("redis-server") or "redis-server", str(config),
                                        "--sentinel"],
                                       stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
        self.sentinels.append((port, process))

    def master_view(self, port: int) -> dict[str, Any]:
        """``SENTINEL MASTER mymaster`` as one Sentinel sees it ({} if it cannot answer)."""
        try:
            with redis.Redis(self.host, port, socket_timeout=1, socket_connect_timeout=1) as client:
                return dict(client.sentinel_master(MASTER_NAME))
        except redis.RedisError:
            return {}

    def _group_ready(self) -> bool:
        for port, _ in self.sentinels:
            view = self.master_view(port)
            if (view.get("port") != self.primary.port or view.get("flags") != "master"
                    or view.get("num-slaves", 0) < 1 or view.get("num-other-sentinels") != 2):
                return False
        return True

    def primary_port(self) -> int | None:
        """The primary's port the Sentinels agree on, or None while they do not."""
        ports = {self.master_view(port).get("port") for port, _ in self.sentinels}
        return ports.pop() if len(ports) == 1 and None not in ports else None

    def crash_primary(self) -> None:
        self.primary.crash()

    def wait_for_failover(self, timeout: float = 30.0) -> int:
        """The new primary's port, once every Sentinel names the replica and it says it is a master."""
        assert self.replica is not None
        replica = self.replica
        self._wait(lambda: self.primary_port() == replica.port and _info(self.host, replica.port).get("role") == "master",
                   "the failover", timeout)
        return replica.port

    def _wait(self, ready: Any, what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (OSError, redis.RedisError):
                pass
            time.sleep(0.05)
        logs = "\n".join((self.folder / f"s{port}" / "log").read_text(errors="replace")[-2000:]
                         for port, _ in self.sentinels)
        raise RuntimeError(f"timed out waiting for {what}\n{logs}")

    def close(self) -> None:
        for _, process in self.sentinels:
            if process.poll() is None:
                process.terminate()
        for _, process in self.sentinels:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.sentinels = []
        for server in (self.replica, self.primary):
            if server is not None:
                server.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LoopbackSentinels:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

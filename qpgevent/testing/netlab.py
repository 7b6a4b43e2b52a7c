"""A small network of hosts on one machine: network namespaces on a bridge, for tests.

``NetLab({"client": ("198.18.0.2", "2001:db8::2"), ...})`` makes a switch namespace with
a bridge and one namespace per host, named ``qn-<pid>-<tag><host>`` (the pid of the test
process, so ``sweep`` can remove the labs of runs that died), each with ``eth0`` on the
bridge and its two addresses (IPv6 without duplicate address detection, usable at once).
Nothing is created in the host's own namespace.

A lab address dialled from the host's namespace does not fail: it follows the default
route off the machine. So nothing here dials from there: daemons run inside a host
(``NetLab.command(host, *argv)``: ``ip netns exec``), sockets are made inside a host
(``NetLab.socket``, ``connect``), and the test process itself moves
into a host for the time a test talks to the lab (``with lab.inside("client"):``; every
greenlet's sockets are then made in that host, as the process has one thread).
Addresses: 198.18.0.0/24 and 2001:db8::/64 only (benchmarking and documentation ranges).
Runtime code never imports this.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

__all__ = ["NetLab", "sweep"]

CLONE_NEWNET = 0x40000000
PREFIX = "qn"
Socket = socket.socket  # NetLab.socket hides the module's name inside the class
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    return [int(pid) for pid in done.stdout.split()]


def _delete(namespace: str) -> None:
    """Kill what runs inside (a deleted namespace lives on while a process is in it), then delete."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 2
        while (pids := _pids(namespace)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            time.sleep(0.05)  # other processes' exit: nothing to wait on but /proc
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
    shutil.rmtree(f"/etc/netns/{namespace}", ignore_errors=True)


def _namespaces() -> list[str]:
    return sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []


def sweep() -> None:
    """Remove the labs whose test process is gone (a run killed before its teardown)."""
    for name in _namespaces():
        parts = name.split("-")
        if len(parts) >= 3 and parts[0] == PREFIX and parts[1].isdigit() and not os.path.exists(f"/proc/{parts[1]}"):
            _delete(name)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class NetLab:
    def __init__(self, hosts: dict[str, tuple[str, str]], tag: str = "") -> None:
        sweep()
        self.hosts = dict(hosts)
        self.base = f"{PREFIX}-{os.getpid()}-{tag}"
        self.switch = f"{self.base}sw"
        self._made: list[str] = []
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return f"{self.base}{host}"

    def address(self, host: str, family: int = 4) -> str:
        return self.hosts[host][0 if family == 4 else 1]

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")  # down in a new namespace

    def _make(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")  # STP off: ports forward at once
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for number, (host, (v4, v6)) in enumerate(self.hosts.items(), 1):
            namespace = self.ns(host)
            self._add_namespace(namespace)
            _ip("-n", self.switch, "link", "add", f"p{number}", "type", "veth", "peer", "name", "eth0",
                "netns", namespace)
            _ip("-n", self.switch, "link", "set", f"p{number}", "master", "br0", "up")
            _ip("-n", namespace, "addr", "add", f"{v4}/24", "dev", "eth0")
            _ip("-n", namespace, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            _ip("-n", namespace, "link", "set", "eth0", "up")

    def command(self, host: str, *argv: str) -> list[str]:
        """``argv`` run inside ``host`` (``ip`` execs it: a Popen's pid is the command's own);
        with no ``argv``, the prefix that runs a command there."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def socket(self, host: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> Socket:
        """A socket made inside ``host``: it stays there, whatever namespace uses it after."""
        with self.inside(host):
            return socket.socket(family, kind)

    def connect(self, host: str, address: str, port: int, timeout: float = 5.0) -> Socket:
        """A TCP connection from ``host`` to ``address``:``port``."""
        sock = self.socket(host, socket.AF_INET6 if ":" in address else socket.AF_INET)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def greeting(self, host: str, address: str, port: int) -> bytes | None:
        """The first line an SMTP server at ``address``:``port`` says to ``host``; None when it
        cannot be reached (a readiness check)."""
        try:
            with self.connect(host, address, port) as sock:
                line = sock.makefile("rb").readline(512)
                sock.sendall(b"QUIT\r\n")
                return line
        except OSError:
            return None

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """This process's network namespace is ``host``'s for the block (one thread: all greenlets)."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(f"/run/netns/{self.ns(host)}")
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the host's namespace failed")
        finally:
            os.close(own)

    def link(self, host: str, up: bool) -> None:
        """Plug ``host`` out of the switch (``up=False``: a host gone from the network) or back in."""
        _ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    def close(self) -> None:
        for namespace in reversed(self._made):
            _delete(namespace)
        self._made = []

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

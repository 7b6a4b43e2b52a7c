"""What content-scanner plugins share: reaching the scanner, bounding the scan, failing as configured.

A scanner (spamd, clamd) is reached at ``host:port``, ``[ipv6]:port`` or a unix socket
path. One scan — connect, stream the message, read the answer — runs under
``scan_timeout`` seconds in all; a scanner that refuses, hangs or answers nonsense is
"unavailable", and the plugin's ``on_error`` option decides:

  defer   (default) 451 4.7.1 "<scanner> unavailable, try again later": the client keeps
          the message and retries; nothing unscanned gets in
  accept  the message goes on, with a header saying it was not scanned and why

Either way the failure is logged with the reason. Keep ``scan_timeout`` below the
plugin's ``timeout`` so the configured mode, not the hook runner's generic 451, decides.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent

from ..plugin import DECLINED, DENYSOFT

__all__ = ["CONFIGSPEC", "ScannerError", "check_address", "connect", "unavailable", "read_all", "scan_deadline"]

CONFIGSPEC = [
    'on_error = option("defer", "accept", default="defer")',
    "scan_timeout = float(min=0.01, default=20)",
]


class ScannerError(Exception):
    """The scanner cannot give an answer now (refused, timed out, broken reply)."""


def check_address(address: str) -> str:
    """``address`` if it names a scanner (for a plugin's setup); ValueError otherwise."""
    if address.startswith("/"):
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port, [ipv6]:port or /path/to/socket")
    return address


def connect(address: str, timeout: float) -> socket.socket:
    """A connected socket to ``host:port``, ``[v6]:port`` or a unix socket path."""
    try:
        if address.startswith("/"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            return sock
        host, _, port = address.rpartition(":")
        return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as error:
        raise ScannerError(f"cannot connect to {address}: {error}") from None


def read_all(sock: socket.socket, limit: int) -> bytes:
    """Everything the scanner says until it closes, at most ``limit`` octets."""
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise ScannerError(f"answer longer than {limit} octets")


class scan_deadline:
    """``with scan_deadline(seconds, "spamd"):`` the whole scan, or ScannerError."""

    def __init__(self, seconds: float, scanner: str) -> None:
        self.seconds, self.scanner = seconds, scanner
        self.timer = gevent.Timeout(seconds)

    def __enter__(self) -> None:
        self.timer.start()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        self.timer.close()
        if error is self.timer or isinstance(error, socket.timeout):
            raise ScannerError(f"{self.scanner} did not answer within {self.seconds}s") from None
        if isinstance(error, OSError):
            raise ScannerError(f"{self.scanner}: {error}") from None
        return False


def unavailable(plugin: Any, session: Any, scanner: str, error: Exception,
                header: str) -> Any:
    """The verdict for a scan that could not be made, as ``on_error`` says; logged."""
    if plugin.config["on_error"] == "accept":
        plugin.log.warning("%s unavailable, message accepted unscanned: %s", scanner, error)
        session.transaction.headers.add(header, f"not scanned ({scanner} unavailable: {error})")
        return DECLINED
    plugin.log.warning("%s unavailable, message deferred: %s", scanner, error)
    return DENYSOFT, f"{scanner} unavailable, try again later"

"""The listening side: sockets, one greenlet per connection, the connection limit, stop.

Builds a gevent ``StreamServer`` per listen address. Each accepted socket gets a
``Connection`` and a ``Session`` in its own greenlet. Beyond ``max_connections`` a
client gets ``421 4.3.2`` and is closed at once, never left hanging in the backlog.
``stop`` stops accepting, gives sessions in flight up to ``shutdown_timeout`` to end,
then closes the rest with 421.
"""

from __future__ import annotations

import collections
import errno
import logging
import socket
from typing import Any

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from .config import Listen, Settings
from .connection import Connection
from .hooks import HookRunner
from .plugin import Plugin
from .reply import Canned
from .session import Session

log = logging.getLogger("qpgevent.server")
BACKLOG = 1024


def normalize_ip(ip: str) -> str:
    """``::ffff:192.0.2.1`` is 192.0.2.1: one client, one address, whatever the listener."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((listen.host, listen.port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def close_gracefully(sock: socket.socket, linger: float = 1.0) -> None:
    """Close so that our last reply survives: send FIN, drain briefly, then close.

    Closing a socket that still holds unread input (a client that pipelined past our
    421, or talked before the greeting) makes the kernel send RST, which can destroy the
    reply still in flight. So we stop writing, read and drop what comes for at most
    ``linger`` seconds or until the client closes, and only then close.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(linger)
        for _ in range(16):  # at most 1 MiB of leftovers
            if not sock.recv(1 << 16):
                break
    except OSError:
        log.debug("connection already gone at close")
    finally:
        sock.close()


class SmtpServer:
    def __init__(self, settings: Settings, plugins: list[Plugin]) -> None:
        self.settings = settings
        self.runner = HookRunner(plugins, settings.plugin_timeout)
        self.servers: list[StreamServer] = []
        self.sessions: set[gevent.Greenlet] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()
        # Room above the limit so that refusals are answered rather than left queued.
        self._pool = Pool(settings.max_connections + max(16, settings.max_connections // 8))

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [server.socket.getsockname()[:2] for server in self.servers]

    def start(self) -> None:
        """Bind every listen address; an unavailable IPv6 address is skipped with a warning."""
        for listen in self.settings.listen:
            try:
                sock = bind(listen)
            except OSError as error:
                optional = ":" in listen.host and error.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
                if optional and len(self.settings.listen) > 1:
                    log.warning("not listening on %s: %s", listen, error.strerror)
                    continue
                self.stop(0)
                raise
            server = StreamServer(sock, self.handle, spawn=self._pool)
            server.start()
            self.servers.append(server)
            host, port = sock.getsockname()[:2]
            log.info("listening on %s", Listen(host, port))

    def handle(self, sock: socket.socket, address: Any) -> None:
        if len(self.sessions) >= self.settings.max_connections:
            log.warning("refused %s: %d sessions already", address[0], len(self.sessions))
            self._refuse(sock)
            return
        local = sock.getsockname()
        connection = Connection(normalize_ip(address[0]), address[1], normalize_ip(local[0]), local[1])
        greenlet = gevent.getcurrent()
        self.sessions.add(greenlet)
        self._per_ip[connection.remote_ip] += 1
        session = Session(sock, connection, self.runner, self.settings, self._per_ip.__getitem__)
        try:
            session.run()
        except gevent.GreenletExit:
            pass  # stopped by the server; the session has said 421
        finally:
            self.sessions.discard(greenlet)
            self._per_ip[connection.remote_ip] -= 1
            if self._per_ip[connection.remote_ip] <= 0:
                del self._per_ip[connection.remote_ip]
            close_gracefully(sock)
            self.runner.notify("post_connection", session)

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(5)
            sock.sendall(Canned.TOO_MANY_CONNECTIONS.to_bytes())
        except OSError:
            log.debug("client gone before its 421")
        close_gracefully(sock)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting; let sessions finish for ``timeout`` seconds; close the rest with 421."""
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        for server in self.servers:
            server.close()
        if self.sessions:
            log.info("stopping: waiting up to %ss for %d session(s)", timeout, len(self.sessions))
            gevent.wait(list(self.sessions), timeout=timeout)
        if self.sessions:
            log.info("stopping: closing %d session(s) still open", len(self.sessions))
            gevent.killall(list(self.sessions), block=True, timeout=5)
        self.servers = []

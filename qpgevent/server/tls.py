"""TLS for sessions: the server's SSL contexts, chosen by SNI, reloaded when files change.

``TlsContexts`` holds one ``ssl.SSLContext`` per certificate of ``[tls]``: the default
one, and one per ``sni`` name. The default context's ``sni_callback`` switches the
handshake to the context of the name the client asked for (RFC 6066 3). Before each
handshake ``context()`` looks at the certificate files, at most every ``reload_check``
seconds, and builds new contexts when one changed (mtime, size or inode: a renewal tool
that writes a new file and renames it over the old one changes the inode), so operators
renew certificates without a restart. A file that fails to load is logged and the
previous contexts stay. ``handshake`` wraps an accepted socket, within a timeout.

Under ``gevent.monkey`` the ``ssl`` module is gevent's: handshakes yield to other
sessions instead of blocking the process. Its sockets are ``_TlsSocket``: gevent's, with a
``sendall`` that hands OpenSSL each batch of replies at once.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import socket
import ssl
import time
from typing import Any

import gevent.ssl

from ..config import Settings
from ..core.errors import ConfigError

log = logging.getLogger("qpgevent.tls")


class HandshakeFailed(Exception):
    """The TLS handshake did not complete (timeout, protocol error, client gone)."""


class TlsContexts:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._files = [(settings.tls_certificate, settings.tls_key)]
        self._files += [(cert, key) for _, cert, key in settings.tls_sni]
        self._checked = time.monotonic()
        self._stamps = self._stat()
        try:
            self._default, self._by_name = self._build()
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"{settings.path}: [tls]: cannot load the certificates: {error}") from None

    def context(self) -> ssl.SSLContext:
        """The default context, rebuilt first if a certificate file changed."""
        now = time.monotonic()
        if now - self._checked >= self.settings.tls_reload_check:
            self._checked = now
            stamps = self._stat()
            if stamps != self._stamps:
                try:
                    self._default, self._by_name = self._build()
                except (OSError, ssl.SSLError) as error:
                    log.error("TLS certificates changed but did not load (keeping the old ones): %s", error)
                else:
                    log.info("TLS certificates reloaded")
                self._stamps = stamps  # a broken file is not retried until it changes again
        return self._default

    def handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        """Wrap ``sock`` server side and complete the handshake, or raise HandshakeFailed."""
        _no_delay(sock)
        tls_sock = self.context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls_sock.settimeout(self.settings.tls_handshake_timeout)
        try:
            tls_sock.do_handshake()
        except TimeoutError:
            tls_sock.close()
            raise HandshakeFailed(f"no handshake within {self.settings.tls_handshake_timeout:g}s") from None
        except (ssl.SSLError, OSError) as error:
            tls_sock.close()
            raise HandshakeFailed(getattr(error, "reason", None) or str(error) or type(error).__name__) from None
        return tls_sock

    def _stat(self) -> list[tuple[int, int, int] | None]:
        stamps: list[tuple[int, int, int] | None] = []
        for cert, key in self._files:
            for name in (cert, key):
                if not name:
                    continue
                try:
                    st = os.stat(name)
                    stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
                except OSError:
                    stamps.append(None)
        return stamps

    def _build(self) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext]]:
        settings = self.settings
        by_name = {name: self._new_context(cert, key) for name, cert, key in settings.tls_sni}
        default = self._new_context(settings.tls_certificate, settings.tls_key)
        if by_name:
            default.sni_callback = _chooser(by_name)
        return default, by_name

    def _new_context(self, cert: str, key: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = getattr(ssl.TLSVersion, self.settings.tls_min_version.replace(".", "_"))
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
        context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
        context.load_cert_chain(cert, key or None)
        if isinstance(context, gevent.ssl.SSLContext):  # always, but under monkey-patching
            context.sslsocket_class = _TlsSocket
        return context


class _TlsSocket(gevent.ssl.SSLSocket):
    """gevent's TLS socket, whose ``sendall`` is one ``send``.

    gevent's ``sendall`` asks the kernel for SO_SNDBUF and cuts the data into chunks on every
    call, then sends each chunk: a tenth of a worker's time in a TLS session (py-spy,
    docs/benchmarks.md). OpenSSL as CPython sets it up (no partial writes) takes all of the
    data in one write; when the socket is full it wants the very same data again, which
    ``send`` gives it, waiting for the socket (under the socket's timeout, or the driver's).
    """

    def sendall(self, data: Any, flags: int = 0) -> None:
        if flags or self._sslobj is None:
            super().sendall(data, flags)
            return
        sent = self.send(data)
        if sent < len(data):  # only with partial writes, which CPython does not turn on
            super().sendall(memoryview(data)[sent:])


def _no_delay(sock: socket.socket) -> None:
    """Send each write at once (TCP_NODELAY). A TLS 1.3 server writes twice in a row, its session
    tickets after the handshake and then the reply to EHLO; with Nagle's algorithm the reply
    waits for the client's ACK of the tickets, which the client delays (40 ms on Linux) as it
    has nothing to send: every STARTTLS session would idle that long. The driver writes each
    batch of replies at once, so no small writes are split by this."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:  # not TCP (a UNIX socket in tests): nothing to do
        pass


def _chooser(by_name: dict[str, ssl.SSLContext]) -> Any:
    def choose(tls_sock: Any, name: str | None, _context: Any) -> None:
        if not name:
            return None
        name = name.lower().rstrip(".")
        chosen = by_name.get(name)
        if chosen is None:
            # "*.example.org" matches exactly one label (RFC 6125 6.4.3).
            head, _, tail = name.partition(".")
            chosen = next((ctx for pattern, ctx in by_name.items()
                           if pattern.startswith("*.") and fnmatch.fnmatchcase(name, pattern) and
                           pattern[2:] == tail and head), None)
        if chosen is not None:
            tls_sock.context = chosen
        return None
    return choose


def describe(tls_sock: ssl.SSLSocket) -> dict[str, Any]:
    """What the logs and notes keep of a TLS session: version, cipher, the SNI name."""
    cipher = tls_sock.cipher()
    return {"tls_version": tls_sock.version(), "tls_cipher": cipher[0] if cipher else None,
            "tls_sni": getattr(tls_sock, "server_hostname", None)}

"""A blocking milter client over gevent sockets: one connection to one filter.

The protocol itself (packets, flags, reply parsing) is ``qpgevent.milter_protocol``; this
module only moves its bytes. Under gevent "blocking" means the calling greenlet waits, the
worker does not. Every wait is bounded: connecting and negotiating by ``connect_timeout``,
each exchange by the deadline the caller gives. Anything that goes wrong — refused, closed,
timed out, garbage — is a ``MilterUnavailable`` and the connection is closed; the caller
decides what that means for the mail.

Why not a library from PyPI: ``pymilter`` binds libmilter, which is the filter side only;
``purepythonmilter`` (0.0.1) and ``kilter.protocol`` are asyncio/filter-side frameworks;
``miltertest`` is an MTA-side test tool but GPL-3 (qpgevent is MIT) with blocking reads and
no incremental decoder. The MTA side of the protocol is small, so it is written here in
the house style (sans-I/O codec + thin client).

Addresses are written as in Postfix's ``smtpd_milters``: ``inet:HOST:PORT``,
``inet:[v6addr]:PORT``, sendmail's ``inet:PORT@HOST``, ``inet6:PORT@HOST``, and
``unix:/path`` (or ``local:/path``).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import gevent

from ..core.milter_protocol import (Command, Decoder, Kind, Negotiated, ProtocolError, Reply, decode_negotiation, encode, encode_optneg)

__all__ = ["MilterUnavailable", "MilterConnection", "deadline", "parse_address"]

#: Replies that end a step (everything else at end of message is a modification).
FINAL = frozenset({Kind.CONTINUE, Kind.ACCEPT, Kind.REJECT, Kind.TEMPFAIL, Kind.DISCARD, Kind.REPLYCODE,
                   Kind.SKIP})


class MilterUnavailable(Exception):
    """The filter cannot be asked now: refused, timed out, closed, or answered garbage."""


def deadline(seconds: float) -> gevent.Timeout:
    """A ``with`` block that raises ``MilterUnavailable`` after ``seconds``."""
    return gevent.Timeout(seconds, MilterUnavailable(f"no answer within {seconds}s"))


def parse_address(address: str) -> tuple[int, object]:
    """``inet:HOST:PORT`` / ``inet:PORT@HOST`` / ``inet6:...`` / ``unix:/path`` -> (family, sockaddr)."""
    scheme, sep, rest = address.partition(":")
    if not sep:
        raise ValueError(f"{address!r}: write inet:HOST:PORT or unix:/path")
    if scheme in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"{address!r}: a unix socket needs an absolute path")
        return socket.AF_UNIX, rest
    if scheme not in ("inet", "inet6"):
        raise ValueError(f"{address!r}: unknown scheme {scheme!r} (inet, inet6, unix)")
    if "@" in rest:
        port, _, host = rest.partition("@")
    else:
        host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: a host and a port 1-65535 expected")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


class MilterConnection:
    """A negotiated connection to one filter. Not shared between greenlets."""

    def __init__(self, address: str, connect_timeout: float) -> None:
        family, sockaddr = parse_address(address)
        self.address = address
        self._decoder = Decoder()
        self._pending: list[Reply] = []
        self.sock: socket.socket | None = socket.socket(family, socket.SOCK_STREAM)
        try:
            with gevent.Timeout(connect_timeout, MilterUnavailable(f"no answer within {connect_timeout}s")):
                self.sock.connect(sockaddr)
                if family != socket.AF_UNIX:
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._send(encode_optneg())
                reply = self._read()
                if reply.kind is not Kind.OPTNEG:
                    raise MilterUnavailable(f"answered {reply.kind.name} to option negotiation")
                self.negotiated: Negotiated = decode_negotiation(reply)
        except (OSError, ProtocolError) as error:
            self.close()
            raise MilterUnavailable(str(error) or type(error).__name__) from None
        except BaseException:  # MilterUnavailable, or the hook's own timeout: no socket left open
            self.close()
            raise

    @property
    def closed(self) -> bool:
        return self.sock is None

    def send(self, data: bytes) -> None:
        """Send packets that have no reply (macros, ABORT, QUIT, unanswered steps)."""
        self._guard(self._send, data)

    def ask(self, data: bytes) -> Reply:
        """Send one command and return its final reply (PROGRESS is waited through)."""
        return self._guard(self._ask, data)

    def replies(self, data: bytes) -> Iterator[Reply]:
        """Send end of message; yield each modification, then the final reply."""
        self._guard(self._send, data)
        while True:
            reply = self._guard(self._read)
            if reply.kind is Kind.PROGRESS:
                continue
            yield reply
            if reply.kind in FINAL:
                return

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def quit(self) -> None:
        """Say goodbye (SMFIC_QUIT) and close; a filter already gone is no error."""
        if self.sock is not None:
            try:
                self.sock.sendall(encode(Command.QUIT))
            except OSError:
                pass
            self.close()

    # -- internals -----------------------------------------------------------
    def _guard(self, call, *args):  # type: ignore[no-untyped-def]
        if self.sock is None:
            raise MilterUnavailable("connection already closed")
        try:
            return call(*args)
        except (OSError, ProtocolError) as error:
            self.close()
            raise MilterUnavailable(str(error) or type(error).__name__) from None
        except BaseException:  # a timeout mid-exchange: the stream is out of step, drop it
            self.close()
            raise

    def _ask(self, data: bytes) -> Reply:
        self._send(data)
        while True:
            reply = self._read()
            if reply.kind is Kind.PROGRESS:
                continue
            if reply.kind not in FINAL:
                raise ProtocolError(f"{reply.kind.name} is not an answer to a command")
            return reply

    def _send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)
        self._quickack()

    def _read(self) -> Reply:
        assert self.sock is not None
        while not self._pending:
            data = self.sock.recv(65536)
            if not data:
                raise ProtocolError("the filter closed the connection")
            self._quickack()
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def _quickack(self) -> None:
        # libmilter sends a modification and the final reply as two packets; without an
        # immediate ACK the second waits for our delayed ACK (40 ms a message on Linux).
        # TCP_QUICKACK does not stick, so it is set again after every send and receive.
        quickack = getattr(socket, "TCP_QUICKACK", None)
        if quickack is not None and self.sock is not None and self.sock.family != socket.AF_UNIX:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            except OSError:
                pass

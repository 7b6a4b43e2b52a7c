"""The per-session protocol trace: what the client said and what we answered, line by line.

Opt-in (``[logging] trace``, or ``trace_clients`` for some networks only), for an operator
who must see a dialogue as it went: each client line is logged as ``C: ...`` and each
line we wrote as ``S: ...``, at debug level on the ``qpgevent.trace`` logger, with the
session's ids (``conn=``, ``txn=``) like any session line. What must never reach a log
does not: an AUTH command shows its mechanism only (``redact``), a line answering our 334
is ``C: <AUTH response>``, and a message is ``C: <message data, N octets>``, never its
text. TLS is noted when its handshake is done (or failed).

The conversation holds a ``Trace`` only for a traced session (else None), and asks for it
with one test per line: a session that is not traced formats nothing.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

from ..core.protocol import AuthResponse, Command, MessageData, MessageEnd, Rejected
from .session import SessionLogger, redact

log = logging.getLogger("qpgevent.trace")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def wanted(everyone: bool, networks: Sequence[Network], ip: str) -> bool:
    """Whether a session with the client ``ip`` is traced: all are, or ``ip`` is in ``networks``."""
    if everyone:
        return True
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in networks)


def trace_for(session: Any) -> Trace | None:
    """The trace of ``session`` if its client is to be traced (and the trace logger keeps debug lines)."""
    settings = session.settings
    if not (settings.log_trace or settings.log_trace_clients) or not log.isEnabledFor(logging.DEBUG):
        return None
    if not wanted(settings.log_trace, settings.log_trace_clients, session.connection.remote_ip):
        return None
    return Trace(session)


class Trace:
    """One session's trace: ``client`` for each event of its input, ``server`` for what we wrote."""

    def __init__(self, session: Any) -> None:
        self.log = SessionLogger(log, session)

    def client(self, event: object) -> None:
        if isinstance(event, MessageData):
            return  # the message is told once, at its end, by its size
        if isinstance(event, MessageEnd):
            self.log.debug("C: <message data, %d octets>", event.size)
        elif isinstance(event, AuthResponse):
            self.log.debug("C: <AUTH response>")
        elif isinstance(event, (Command, Rejected)) and event.line:
            self.log.debug("C: %s", redact(event.line))
        else:  # refused unread (too long, not UTF-8), or a refused answer to our 334
            self.log.debug("C: <line not shown>")

    def server(self, out: bytes) -> None:
        for line in out.decode("utf-8", "replace").split("\r\n"):
            if line:
                self.log.debug("S: %s", line)

    def closed(self) -> None:
        self.log.debug("C: <connection closed>")

    def note(self, text: str) -> None:
        self.log.debug("-- %s", text)

"""What the conversation needs from outside the engine: handed in, never imported.

The engine sits below the back ends and the server in the layers, so the conversation
cannot reach for the resolver, the shared store or the metrics itself. The server (and
the dry run, the harness) hands it a ``Surroundings`` built from them
(``qpgevent.server.surroundings``); a conversation made without one still runs
(tests of the engine alone): it looks nothing up, counts nothing, limits no AUTH
failures, and lets an authenticated user send only as itself.

Slotted and shared: thousands of idle sessions each hold one (docs/benchmarks.md, "idle").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..connection import Connection
from ..core.address import Address


class Counters(Protocol):
    """Where the conversation counts what happens (``qpgevent.backends.metrics`` is one)."""

    def transaction_started(self) -> None: ...

    def recipient(self, accepted: bool) -> None: ...

    def rejected(self, hook: str, plugin: str | None, reason: str) -> None: ...

    def message_queued(self, plugin: str | None) -> None: ...


class FailureLimits(Protocol):
    """Failed AUTH attempts, per address and user (``backends.auth.FailureLimiter``)."""

    def blocked(self, ip: str, user: str | None = None) -> bool: ...

    def failed(self, ip: str, user: str | None) -> int: ...


class Senders(Protocol):
    """Which envelope senders an authenticated user may use (``backends.auth.SenderMap``)."""

    def allows(self, user: str, sender: Address) -> bool: ...


class NoCounters:
    def transaction_started(self) -> None:
        pass

    def recipient(self, accepted: bool) -> None:
        pass

    def rejected(self, hook: str, plugin: str | None, reason: str) -> None:
        pass

    def message_queued(self, plugin: str | None) -> None:
        pass


class NoLimits:
    def blocked(self, ip: str, user: str | None = None) -> bool:
        return False

    def failed(self, ip: str, user: str | None) -> int:
        return 1


class OwnAddressOnly:
    def allows(self, user: str, sender: Address) -> bool:
        return sender.is_null or sender.address.lower() == user.lower()


def _no_lookup(connection: Connection, logger: logging.LoggerAdapter[logging.Logger]) -> None:
    pass


def _one(ip: str) -> int:
    return 1


@dataclass(slots=True)
class Surroundings:
    """The same for every session of a server, and shared (``server.surroundings``); a
    session's own ``wait_for_input`` goes to its ``Conversation`` beside it."""

    #: Sets ``remote_host`` / ``remote_info`` before the connect hook (reverse DNS, ident),
    #: logging what it found through the session's logger.
    identify: Callable[[Connection, logging.LoggerAdapter[logging.Logger]], None] = _no_lookup
    #: Sessions open now from an address, this one included.
    peers: Callable[[str], int] = _one
    #: Whether the client sends something within so many seconds (None: whether input is
    #: buffered already, which is all a conversation without a socket can know).
    wait_for_input: Callable[[float], bool] | None = None
    counters: Counters = field(default_factory=NoCounters)
    limits: FailureLimits = field(default_factory=NoLimits)
    senders: Senders = field(default_factory=OwnAddressOnly)

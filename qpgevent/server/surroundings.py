"""What the server hands each conversation from the back ends (``engine.surroundings``).

One ``Surroundings`` per settings and server, shared by all its sessions: the AUTH failure
limiter, the ``[auth] senders`` map, the reverse look-up and ident, the metrics, the count
of sessions per address. The one part that is each session's own, its socket for
``wait_for_input``, the driver hands the conversation beside them.
Idle sessions by the thousand each hold these (docs/benchmarks.md, "idle"): shared, they
cost a pointer.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from ..backends import metrics
from ..backends.auth import FailureLimiter, SenderMap
from ..backends.services import identify
from ..config import Settings
from ..connection import Connection
from ..engine.surroundings import Surroundings


def surroundings(settings: Settings, peers: Callable[[str], int] = lambda ip: 1,
                 wait_for_input: Callable[[float], bool] | None = None) -> Surroundings:
    """What a conversation of this server gets from the back ends: look-ups, limits, counts.

    Made once per settings and ``peers``, and shared by every session (an idle session's
    bytes count: docs/benchmarks.md), unless given a session's own ``wait_for_input``
    (the driver hands its own to the conversation instead).
    """
    shared = _SHARED.get(id(settings))
    if shared is None or shared.settings() is not settings:
        shared = _SHARED[id(settings)] = _Shared(settings)
    made = shared.by_peers.get(peers) if wait_for_input is None else None
    if made is None:
        made = Surroundings(identify=shared.identify, peers=peers, wait_for_input=wait_for_input, counters=metrics,
                            limits=shared.limits, senders=shared.senders)
        if wait_for_input is None:
            shared.by_peers[peers] = made
    return made


class _Shared:
    """The parts of ``Surroundings`` that are the same for every session of one settings."""

    __slots__ = ("settings", "limits", "senders", "identify", "by_peers")

    def __init__(self, settings: Settings) -> None:
        # Weak, and forgotten with the settings (replaced on reload; one per test).
        self.settings = weakref.ref(settings)
        weakref.finalize(settings, _SHARED.pop, id(settings), None)
        senders = _SENDER_MAPS.get(settings.auth_senders)
        if senders is None:
            senders = _SENDER_MAPS[settings.auth_senders] = SenderMap(settings.auth_senders)
        self.senders = senders
        self.limits = FailureLimiter(settings.auth_max_failures_ip, settings.auth_max_failures_user,
                                     settings.auth_failure_window)
        self.identify = self._identify  # one bound method, shared
        #: The server's count of sessions per address (one per server) -> its surroundings.
        self.by_peers: dict[Callable[[str], int], Surroundings] = {}

    def _identify(self, connection: Connection, logger: logging.LoggerAdapter[logging.Logger]) -> None:
        settings = self.settings()
        assert settings is not None  # a session holds its settings
        identify(connection, settings, logger)


_SENDER_MAPS: dict[str, SenderMap] = {}  #: [auth] senders path -> its map (one per process)
#: id(settings) -> the parts every session of those settings shares.
_SHARED: dict[int, _Shared] = {}


"""Shedding idle sessions when the host nears ``max_connections`` (Postfix's stress mode).

One ``Shedder`` per server (per worker, under the master). Every ``TICK`` seconds, and at
once when a client finds no place, it reads the host's session count (the shared table:
every worker's sessions) and asks ``qpgevent.core.stress.Gauge`` whether the host is in
stress; a worker in stress says so in the table, and the others join it while the host
stays near the mark. In stress it closes this worker's idle sessions, the longest parked
first, until the host is under the mark again: each gets ``421 4.3.2`` (RFC 5321 3.8: a
server may close with 421 when it must), and its place is freed before the next is
chosen, so two workers shedding at once overshoot by a session or two, not by half. Every worker does this when
the *host* is in stress, so room appears whichever worker holds the idle sessions, and a
worker that holds none sheds nothing.

Only a session that has nothing to lose is shed: parked (idle past ``[limits]
park_after``), no transaction (MAIL not given), not authenticated, and no input waiting
(a command on its way is served). In stress, command waits also shrink to ``[limits]
stress_command_timeout`` and no session waits parked longer than that, so idle sessions
that cannot be shed (in a transaction, authenticated) still let go of their places soon.
A session that waits in a greenlet when stress begins keeps that wait's timeout; its next
one is short.

A client that finds no place, on a worker with nothing left to shed, is not refused at
once while the host is in stress: the idle sessions may be another worker's, shed at its
next look (every ``TICK``), or this worker's own, about to park. It waits for a place, at
most ``ROOM_WAIT`` seconds, and no more of them at once than the reserve (the places kept
for newcomers, ``core.stress.reserve``): a flood of newcomers past that is refused at once,
so the waits cannot pile up descriptors.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import gevent

from ..backends import metrics
from ..config import Settings
from ..core import stress
from ..core.reply import Reply, reply
from .driver import has_input
from .shared_counters import Counters, Lease

log = logging.getLogger("qpgevent.server")

TICK = 0.1  #: seconds between two looks at the host's count (a lock and a sum: microseconds)
ROOM_WAIT = 1.0  #: seconds a newcomer that finds no place waits for one, in stress (ten looks)



def shed_reply(me: str) -> Reply:
    return reply(421, "4.3.2", f"{me} Too busy, closing idle connection, try again later", close=True)


def may_shed(driver: Any) -> bool:
    """An idle session with nothing to lose: no transaction, not authenticated, no input waiting."""
    session = driver.session
    if session.current_transaction is not None or session.connection.notes.get("auth_user"):
        return False
    # Without waiting, so without yielding: choosing and taking a session is one step no
    # other greenlet of ours sees half done.
    try:
        return not has_input(driver.sock)
    except (OSError, ValueError):
        return False  # closed under us: it ends by itself


class Shedder:
    """The stress mode of one server: its gauge, its timeouts, its shedding."""

    def __init__(self, server: Any, settings: Settings, counters: Counters) -> None:
        self.server, self.counters = server, counters
        self.gauge = stress.Gauge(settings.max_connections, settings.stress_at)
        self.normal_timeout, self.stress_timeout = settings.command_timeout, settings.stress_command_timeout
        self.last_words = shed_reply(settings.me)
        self._watcher: gevent.Greenlet | None = None
        #: Newcomers that may wait for a place at once (the reserve), and those waiting now.
        self.room_waiters = stress.reserve(settings.max_connections, settings.stress_at)
        self.waiting = 0

    @property
    def stressed(self) -> bool:
        return self.gauge.stressed

    def command_timeout(self) -> float:
        """Seconds to wait for the next command now."""
        return stress.command_timeout(self.normal_timeout, self.gauge.stressed, self.stress_timeout)

    def start(self) -> None:
        if self.gauge.mark is not None and self._watcher is None:
            self._watcher = gevent.spawn(self._watch)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.kill(block=False)
            self._watcher = None
            self.counters.set_stressed(False)  # a stopping worker no longer holds the others in stress

    def _watch(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # the next tick tries again; the server must not lose its watcher
                log.exception("stress check failed")
            gevent.sleep(TICK)

    def check(self) -> int:
        """Look at the host's count: enter or leave stress, shed what must be. How many were shed."""
        gauge, parking = self.gauge, self.server.parking
        if gauge.mark is None:
            return 0  # no stress mode
        was = gauge.stressed
        sessions = self.counters.sessions()
        if gauge.update(sessions, self.counters.stressed_elsewhere()) != was:
            self.counters.set_stressed(gauge.stressed)
            if gauge.stressed:
                log.warning("stress: %d sessions on the host (stress_at %d): shedding idle sessions, "
                            "command_timeout %gs", sessions, gauge.mark, self.command_timeout())
                parking.cap(self.stress_timeout)
            else:
                log.info("stress over: %d sessions on the host; command_timeout %gs again", sessions,
                         self.normal_timeout)
                parking.cap(None)
        if not gauge.stressed:
            return 0
        shed = 0
        for driver in parking.oldest():
            if gauge.excess(sessions) <= 0:
                break
            if may_shed(driver) and self._shed(driver):
                shed += 1
                sessions = self.counters.sessions()  # the other workers may be shedding too
        return shed

    def wait_for_room(self, acquire: Callable[[], Lease | None]) -> Lease | None:
        """For a newcomer that found no place even after this worker's ``check``: in stress,
        ``acquire`` again twice a tick, for ``ROOM_WAIT`` seconds at most, while other workers
        shed (and our own idle sessions park, to be shed here). None, at once, out of stress
        or when the reserve's worth of newcomers already waits; else None once the wait is over."""
        if not self.gauge.stressed or self.waiting >= self.room_waiters:
            return None
        self.waiting += 1
        try:
            deadline = time.monotonic() + ROOM_WAIT
            while time.monotonic() < deadline:
                gevent.sleep(TICK / 2)
                lease = acquire()
                if lease is None and self.check():  # our own sessions may have parked meanwhile
                    lease = acquire()
                if lease is not None:
                    return lease
            return None
        finally:
            self.waiting -= 1

    def _shed(self, driver: Any) -> bool:
        taken = self.server.parking.take(driver)
        if taken is None:
            return False
        pause, lease = taken
        lease.release()  # the place is free now, for the count that decides the next one
        metrics.session_shed()
        parking = self.server.parking
        parking.resumed.spawn(pause.context.run, self.server.run_parked, driver, lease,
                              lambda: driver.shed(self.last_words))
        return True

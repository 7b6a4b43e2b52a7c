"""Idle sessions without a greenlet: how thousands of quiet clients stay cheap.

A session waiting for its client's next command holds a greenlet, and a greenlet parked
in ``recv()`` keeps its Python frames and its saved slice of the C stack: about 9 KiB,
more than the session's own objects. So past ``[limits] park_after`` seconds of silence
the session *parks*: its greenlet ends (everything the conversation needs lives in the
conversation object, not on the stack), and a watcher on the event loop waits for its
input in its place (the gevent socket's own, idle while no greenlet reads it), while its
deadline, the rest of ``command_timeout``, joins the others in one timer for them all.
Input wakes the session into a new greenlet that goes on where it stopped; the deadline
wakes it to say 421 and close, as if it had waited all along. A parked session is its
socket, its objects and its place in a heap of deadlines.

``Parking`` holds the parked sessions of one server. The server decides what a woken
session runs (``resume``); the driver decides when to park (``Driver._recv``), and
reads ``after`` for that each time, so ``stop_parking`` takes effect at once: a server
that stops wakes every parked session and lets none park again, so that each one ends
the usual way, within ``shutdown_timeout`` or with 421 (an idle one, with no transaction
under way, says 421 at once: ``Driver.resume``).

Under stress (``qpgevent.server.shedding``) the shedder ``take``s the oldest idle parked
sessions to close them, and ``cap``s how long any session waits parked.
"""

from __future__ import annotations

import contextvars
import heapq
import time
from collections.abc import Callable
from typing import Any, Protocol

import gevent
from gevent.pool import Group


class Pause:
    """A parked session's place in time: its context (log ids, DNS budget), its time left.

    ``context`` is the session greenlet's ``contextvars`` context as it parked: the woken
    session runs in it. ``seconds_left``: of ``command_timeout``, when it must give up.
    While parked it also holds what ``Parking`` keeps for it (one object, not a tuple more).
    """

    __slots__ = ("context", "seconds_left", "reader", "session", "held", "deadline")

    def __init__(self, context: contextvars.Context, seconds_left: float) -> None:
        self.context, self.seconds_left = context, seconds_left
        self.reader: Any = None  #: parked: the watcher of its input
        self.session: Any = None  #: parked: the session it is the Pause of
        self.held: Any = None  #: parked: what the caller of ``park`` keeps with it
        self.deadline = 0.0  #: parked: when it must give up, on the monotonic clock

    def __lt__(self, other: Pause) -> bool:  # in Parking's heap: the earliest deadline first
        return self.deadline < other.deadline


class Session(Protocol):
    """What parking needs of a session (its driver, qpgevent.server.driver.Driver): its socket."""

    @property
    def sock(self) -> Any: ...


class Parking:
    """The parked sessions of one server, and the greenlets of the ones woken."""

    def __init__(self, after: float, resume: Callable[..., None]) -> None:
        #: Seconds of silence before a session parks; None: sessions do not park.
        self.after: float | None = after or None
        #: Called in a new greenlet, in the session's saved context, as
        #: ``resume(session, timed_out, held)`` with the ``held`` given to ``park``.
        self._resume = resume
        #: Parked session -> its Pause (which holds its watchers, what park was given, its
        #: deadline); in the order they parked: the longest idle first.
        self._parked: dict[Session, Pause] = {}
        #: Seconds a session may wait parked, at most (None: its Pause decides); see ``cap``.
        self._cap: float | None = None
        #: The greenlets of woken sessions, for the server to wait for when it stops.
        self.resumed = Group()
        self._waker = self._wake  # bound once: every parked session's watcher calls it
        #: The parked sessions' Pauses by deadline (a heap), and the one timer, set for the
        #: earliest: a timer per parked session would cost more than the rest of its Pause.
        #: A session that leaves stays in the heap until its deadline or the next tidy-up.
        self._deadlines: list[Pause] = []
        self._timer: Any = None
        self._timer_at = 0.0  #: the deadline the timer is set for

    def __len__(self) -> int:
        return len(self._parked)

    def __contains__(self, session: object) -> bool:
        return session in self._parked

    def park(self, session: Session, pause: Pause, held: Any = None) -> None:
        """Wait for ``session``'s input, or for ``pause.seconds_left``, with no greenlet.

        ``held``: what the caller keeps with the session (the server: its lease), handed
        to ``resume`` and back by ``take`` (one value, not a tuple per parked session)."""
        loop = gevent.get_hub().loop
        reader = _idle_reader(session.sock)
        if reader is None:
            reader = loop.io(session.sock.fileno(), 1)  # 1: readable (EV_READ)
        seconds = max(pause.seconds_left, 0.0)
        if self._cap is not None:
            seconds = min(seconds, self._cap)
        pause.reader, pause.session, pause.held, pause.deadline = reader, session, held, time.monotonic() + seconds
        self._parked[session] = pause
        reader.start(self._waker, session, False)
        heapq.heappush(self._deadlines, pause)
        if self._timer is None or pause.deadline < self._timer_at:
            self._set_timer()

    def oldest(self) -> list[Session]:
        """The parked sessions, the longest parked first."""
        return list(self._parked)

    def cap(self, seconds: float | None) -> None:
        """From now on no session waits parked more than ``seconds`` (None: no cap); the
        ones parked now with more left have their timers cut to ``seconds``."""
        self._cap = seconds
        if seconds is None:
            return
        now = time.monotonic()
        for pause in self._parked.values():
            pause.deadline = min(pause.deadline, now + seconds)
        self._deadlines = list(self._parked.values())
        heapq.heapify(self._deadlines)
        self._set_timer()

    def take(self, session: Session) -> tuple[Pause, Any] | None:
        """Unpark ``session`` without waking it: its Pause and the ``held`` of ``park``, for the
        caller to end it; None if it is not parked (woken meanwhile)."""
        pause = self._parked.pop(session, None)
        if pause is None:
            return None
        reader: Any = pause.reader
        if _is_own(session.sock, reader):
            reader.stop()  # the socket's own: it waits with it again
        else:
            reader.close()
        held, pause.reader, pause.session, pause.held = pause.held, None, None, None
        if not self._parked:  # nobody left to time out: no timer keeps the loop busy
            self._deadlines.clear()
            self._set_timer()
        elif len(self._deadlines) > 2 * len(self._parked) + 64:  # mostly gone: tidy up
            self._deadlines = [waiting for waiting in self._deadlines if waiting.session is not None]
            heapq.heapify(self._deadlines)
        return pause, held

    def stop_parking(self) -> None:
        """No session parks from now on, and every parked one is woken to wait in a greenlet."""
        self.after = None
        for session in list(self._parked):
            self._wake(session, False)

    def wake(self, session: Any) -> None:
        """Wake one parked session now, as if its client had spoken (to kick it, say).

        ``session`` is what was parked (the driver), or the plugins' session it drives.
        """
        parked = next((held for held in self._parked if held is session or getattr(held, "session", None) is session),
                      None)
        if parked is not None:
            self._wake(parked, False)

    def _set_timer(self) -> None:
        """Set the one timer for the earliest deadline of a session still parked (or none)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0].session is None:  # left already
            heapq.heappop(deadlines)
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if deadlines:
            self._timer_at = deadlines[0].deadline
            self._timer = gevent.get_hub().loop.timer(max(self._timer_at - time.monotonic(), 0.0))
            self._timer.start(self._time_up)

    def _time_up(self) -> None:
        """The timer: wake every session whose deadline has come, as timed out."""
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and (deadlines[0].session is None or deadlines[0].deadline <= now):
            pause = heapq.heappop(deadlines)
            if pause.session is not None:
                self._wake(pause.session, True)
        self._set_timer()  # the loop's clock may run a hair behind ours: then it is set again

    def _wake(self, session: Session, timed_out: bool) -> None:
        # Runs in the hub: its input and its deadline may come in one loop turn, the second finds it gone.
        taken = self.take(session)
        if taken is None:
            return
        pause, held = taken
        self.resumed.spawn(pause.context.run, self._resume, session, timed_out, held)


def _idle_reader(sock: Any) -> Any:
    """The gevent socket's own input watcher, idle while its session is parked (no greenlet
    waits on the socket): parked on it, a session costs one watcher less. None when the
    socket has none (not a gevent socket) or it is in use."""
    reader = getattr(sock, "_read_event", None)
    if reader is None or reader.active or reader.callback is not None:
        return None
    return reader


def _is_own(sock: Any, reader: Any) -> bool:
    return reader is getattr(sock, "_read_event", None)

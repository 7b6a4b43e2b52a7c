"""Accepting connections, and the greenlets that serve them: the server's own accept loop.

In place of gevent's ``StreamServer`` and ``Pool``, which cost more per connection than
their work: a Python accept loop that looks up how full its pool is and builds the
client's socket through several frames, a new ``Greenlet`` per connection (with its
spawning tree, a loop callback to start it and another to run its links), the pool's
set, semaphore and link, and, under Python 3.11, the interpreter's frame stack of each
new greenlet: a 16 KiB ``mmap`` made and unmapped once per connection
(docs/benchmarks.md, "Round four").

- ``Listener``: a read watcher on the listening socket; when it fires, up to
  ``max_accept`` connections are accepted (one failing ``accept`` ends a wake that took
  fewer), each wrapped once in a gevent socket and handed to the crew. Accept errors
  other than "nothing to accept" (EMFILE: out of descriptors) pause it, from
  ``min_delay`` doubling to ``max_delay``, as gevent does; a socket that is gone
  (EBADF, EINVAL, ENOTSOCK) closes it.
- ``Crew``: greenlets that each serve one connection after another. A connection goes to
  a spare greenlet (a new one if none is spare) at once, from the watcher's callback,
  and runs until its first wait; each session runs in a fresh ``contextvars`` context,
  as in a new greenlet. At most ``spares`` wait between connections (a burst's others
  end), and at most ``capacity`` serve at once: when that many do, the listeners stop
  accepting until one ends (the kernel queues the rest), as a full gevent ``Pool`` did.

The server stops with ``join`` (wait for the sessions in flight) and ``kill`` (end them
with ``GreenletExit``), once its listeners are closed. Since a greenlet outlives its
connection, whoever ends one session (the operator's kick) checks when the exception is
delivered that the greenlet still serves that session (``SmtpServer.end_session``).
"""

from __future__ import annotations

import contextvars
import errno
import ipaddress
import logging
import sys
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
from gevent.socket import socket as GeventSocket
from greenlet import greenlet

log = logging.getLogger("qpgevent.server")

#: Greenlets kept between connections: enough for a busy server's churn, few enough that a
#: burst's thousands of greenlets end once it is over (an idle session has none: parking).
SPARES = 256


class Crew:
    """Greenlets that serve ``handle(*args)`` for one connection after another."""

    def __init__(self, handle: Callable[..., Any], capacity: int, spares: int = SPARES) -> None:
        self.handle = handle
        self.capacity = capacity
        self.spares = spares
        self.hub = gevent.get_hub()
        #: Greenlets serving a connection now.
        self.busy: set[greenlet] = set()
        self._spare: list[greenlet] = []
        self._paused: list[Listener] = []  #: listeners that stopped accepting because we were full
        self._idle: gevent.event.Event | None = None  #: made by join, set when no greenlet is busy
        self._closed = False

    def full(self) -> bool:
        return len(self.busy) >= self.capacity

    def serve(self, *args: Any) -> None:
        """Serve ``args`` in a spare greenlet, until its first wait. Called in the hub only
        (the listener's callback): the greenlet goes back to the hub when it waits."""
        spare = self._spare
        worker = spare.pop() if spare else greenlet(self._run, self.hub)
        worker.switch(args)

    def _run(self, args: tuple[Any, ...]) -> None:
        me = gevent.getcurrent()
        busy, spare, switch = self.busy, self._spare, self.hub.switch
        while True:
            busy.add(me)
            try:
                contextvars.Context().run(self.handle, *args)
            except gevent.GreenletExit:
                pass  # ended by the server (kill, throw): the session is over
            # A Greenlet would report it so, and die; we serve on. gevent.Timeout too: one a
            # plugin left running in an earlier session of this greenlet can land here.
            except (Exception, gevent.Timeout):
                self.hub.handle_error(me, *sys.exc_info())
            finally:
                busy.discard(me)
                if self._paused:
                    self._room()
                if self._idle is not None and not busy:
                    self._idle.set()
            if self._closed or len(spare) >= self.spares:
                return
            spare.append(me)
            waiting = self._next_connection(me, switch)
            if waiting is None:
                return
            args = waiting

    def _next_connection(self, me: greenlet, switch: Callable[[], Any]) -> tuple[Any, ...] | None:
        """Wait as a spare for the next connection's arguments; None once the server ends
        this greenlet (GreenletExit). Any other exception thrown in meanwhile was meant for
        a session that has ended: a timer its plugin left armed (``gevent.Timeout`` started
        and never cancelled), which would have hit a dead greenlet before greenlets outlived
        their connection. It is logged and dropped: letting it kill the spare would leave a
        dead greenlet in the list, and the next connection handed to it would be lost."""
        while True:
            try:
                return switch()
            except gevent.GreenletExit:
                if me in self._spare:
                    self._spare.remove(me)
                return None
            except BaseException as stray:  # gevent.Timeout is a BaseException
                log.warning("dropped %r: thrown between sessions, meant for one that ended "
                            "(a plugin's timer left running?)", stray)

    def _room(self) -> None:
        paused, self._paused = self._paused, []
        for listener in paused:
            listener.start_accepting()

    def wait_for_room(self, listener: Listener) -> None:
        self._paused.append(listener)

    def join(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds until no greenlet serves a connection; whether none does."""
        if not self.busy:
            return True
        self._idle = gevent.event.Event()
        try:
            return self._idle.wait(timeout)
        finally:
            self._idle = None

    def kill(self) -> None:
        """End every session in flight with GreenletExit (at the greenlets' next turn)."""
        def end(worker: greenlet) -> None:
            if worker in self.busy:  # else it ended meanwhile, and takes no new one (stopped)
                worker.throw(gevent.GreenletExit())
        for worker in self.busy:
            self.hub.loop.run_callback(end, worker)

    def close(self) -> None:
        """End the spare greenlets, and the others when their connection ends."""
        self._closed = True
        for worker in self._spare:
            self.hub.loop.run_callback(worker.throw, gevent.GreenletExit())


def fixed_local_address(sock: Any) -> tuple[str, int] | None:
    """The local address of every connection a listening socket accepts: its own, unless it
    listens on every address of the host (then each connection's is asked: a system call)."""
    address = sock.getsockname()
    if ipaddress.ip_address(address[0]).is_unspecified:
        return None
    return address[0], address[1]


class Listener:
    """Accepts connections on a bound, listening socket; ``crew.serve(sock, address, *extra)``."""

    #: Connections accepted per wake, at most (worker.py lowers it when workers share the socket).
    max_accept = 100
    min_delay, max_delay = 0.01, 1.0
    fatal_errors = (errno.EBADF, errno.EINVAL, errno.ENOTSOCK)

    def __init__(self, sock: Any, crew: Crew, *extra: Any) -> None:
        self.socket = sock
        raw = sock
        while hasattr(raw, "_sock"):  # a gevent socket: the OS socket under it
            raw = raw._sock
        raw.setblocking(False)
        self._raw = raw
        self._family, self._type, self._proto = raw.family, raw.type, raw.proto
        self.crew, self.extra = crew, extra
        self.loop = gevent.get_hub().loop
        self._watcher: Any = None
        self._timer: Any = None
        self.delay = self.min_delay
        self.started = False

    def start(self) -> None:
        self.started = True
        self.start_accepting()

    def start_accepting(self) -> None:
        if self.started and self._watcher is None:
            self._watcher = self.loop.io(self._raw.fileno(), 1)  # 1: readable
            self._watcher.start(self._accept)

    def stop_accepting(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def close(self) -> None:
        """Stop accepting and close the listening socket."""
        self.started = False
        self.stop_accepting()
        self.socket.close()

    def _accept(self) -> None:
        crew, raw = self.crew, self._raw
        for _ in range(self.max_accept):
            if self._watcher is None:  # stopped by a session we just served
                return
            if crew.full():
                self.stop_accepting()
                crew.wait_for_room(self)
                return
            try:
                fd, address = raw._accept()
            except BlockingIOError:
                return
            except OSError as error:
                self._failed(error)
                return
            self.delay = self.min_delay
            crew.serve(GeventSocket(self._family, self._type, self._proto, fileno=fd), address, *self.extra)

    def _failed(self, error: OSError) -> None:
        if error.errno in self.fatal_errors:
            log.error("listener %s failed: %s; closed", self.socket, error)
            self.close()
            return
        log.warning("accept failed: %s; accepting again in %gs", error, self.delay)
        self.stop_accepting()
        self._timer = self.loop.timer(self.delay)
        self._timer.start(self._again)
        self.delay = min(self.max_delay, self.delay * 2)

    def _again(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self.start_accepting()

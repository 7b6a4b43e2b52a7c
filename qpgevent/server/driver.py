"""The I/O driver of one connection: a socket and a conversation, and nothing else.

The conversation (``qpgevent.engine.conversation``) decides everything that is said; this
driver moves the bytes: it writes what the conversation queued, reads what the client
sends within the command or DATA timeout, does the TLS handshake when asked (STARTTLS,
or before the greeting on an implicit-TLS listener), pauses when asked (AUTH failures),
and parks an idle session (``qpgevent.parking``) by letting its greenlet end. It also
keeps the session on the live scoreboard and in the connection metrics.
"""

from __future__ import annotations

import _socket
import contextlib
import contextvars
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.monkey
import gevent.socket
import gevent.ssl

from ..backends import dns, metrics, scoreboard
from ..backends.log import bind_session
from ..config import Listen, Settings
from ..connection import Connection
from ..core.codes import Verdict
from ..core.reply import Canned, Reply, reply
from ..engine.conversation import Conversation
from ..engine.dialogue import CLOSE, FLUSH, READ, START_TLS
from ..engine.hooks import HookRunner
from ..engine.session import Session
from .parking import Parking, Pause
from .surroundings import surroundings  # and for whoever imports it from here (dryrun, testing)
from .timers import WaitTimer
from .tls import HandshakeFailed, TlsContexts, describe

log = logging.getLogger("qpgevent.session")
READ_SIZE = 1 << 16


class SessionClosed(Exception):
    """The client went away, or we closed; the session ends without further replies."""


class _Parked(Exception):
    """Unwinds the session's greenlet when it parks; ``Driver._hold`` catches it."""

    def __init__(self, pause: Pause) -> None:
        super().__init__()
        self.pause = pause


class Driver:
    """Runs one connection's conversation over its socket."""

    # Slotted: a parked session is mostly its objects (docs/benchmarks.md, "idle").
    __slots__ = ("sock", "settings", "command_timeout", "tls", "listen", "parking", "_input", "conversation",
                 "session", "_timers", "_ends", "_request_started", "_request_octets", "raw")

    def __init__(self, sock: socket.socket, connection: Connection, runner: HookRunner,
                 settings: Settings, peers: Callable[[str], int] = lambda ip: 1,
                 listen: Listen | None = None, tls: TlsContexts | None = None,
                 parking: Parking | None = None, command_timeout: Callable[[], float] | None = None) -> None:
        self.sock: Any = sock  #: an SSLSocket after STARTTLS
        self.settings = settings
        #: Seconds to wait for a command now: shorter while the host is in stress (qpgevent.server.shedding).
        self.command_timeout = command_timeout or (lambda: settings.command_timeout)
        self.tls = tls
        self.listen = listen or Listen("", 0)
        #: When to park while waiting for a command (None: never); see qpgevent.parking.
        self.parking = parking
        #: Our socket, for the session's wait_for_input (earlytalker): it holds the socket, not
        #: us, so there is no cycle through the conversation (freed at once, not by the GC).
        self._input = _Input(sock)
        self.conversation = Conversation(connection, runner, settings, listen=self.listen, tls=tls is not None,
                                         surroundings=surroundings(settings, peers), wait_for_input=self._input)
        self.session: Session = self.conversation.session
        #: The OS socket under a plain gevent socket, not blocking: for reads and sends that
        #: never wait, and the peek after QUIT (None under TLS).
        self.raw: _socket.socket | None = _raw_socket(sock)
        self._timers: dict[float, WaitTimer] | None = None  #: see _within
        #: [limits] session_timeout: when the session must end, however busy.
        self._ends = time.monotonic() + settings.session_timeout
        #: The request being read (since our last reply): when it began, octets so far
        #: ([limits] min_data_rate, see _time_left).
        self._request_started: float | None = None
        self._request_octets = 0
        if metrics.enabled():
            runner.observe(metrics.HOOK_METRICS)
        if scoreboard.active():
            runner.observe(HOOK_ACTIVITY)

    @property
    def client_quit(self) -> bool:
        return self.conversation.client_quit

    def run(self) -> Pause | None:
        """Hold the conversation from the connect: None once it has ended, or a Pause.

        A Pause means the session parked: it waits for its client without a greenlet, and
        ``resume`` goes on with it, in the Pause's context.
        """
        bind_session(self.session)  # lines that plugins and services log get our ids
        scoreboard.add(self.session)
        metrics.connection_opened()
        # The DNS time every hook of this session may spend, in all ([dns] session_budget);
        # a parked session keeps it in its Pause's context.
        seconds = self.settings.dns_session_budget
        with dns.budget(seconds) if seconds else contextlib.nullcontext():
            return self._hold(self._open)

    def resume(self, timed_out: bool) -> Pause | None:
        """Go on after parking: read what woke us, or say we timed out (as ``run``).

        Woken because the server is stopping, an idle session says 421 and ends at once
        rather than hold the stop for ``shutdown_timeout``.
        """
        if not timed_out and self._idle_while_stopping():
            return self._hold(self._shut_down)
        return self._hold(self._timed_out if timed_out else self._converse)

    def _idle_while_stopping(self) -> bool:
        """The server is stopping (parking stopped), and we wait for a client that has no
        transaction under way and has sent nothing since our last reply."""
        parking = self.parking
        return (parking is not None and parking.after is None and self.session.current_transaction is None
                and not getattr(self.sock, "pending", _nothing)() and not self._wait_for_input(0))

    def _shut_down(self) -> None:
        self._last_words(Canned.SHUTTING_DOWN)

    def shed(self, words: Reply) -> Pause | None:
        """End a parked session the server sheds (qpgevent.server.shedding): say ``words``, end."""
        def leave() -> None:
            self.session.log.info("shed: the host is in stress and this session was idle, with no transaction")
            self._last_words(words)
        return self._hold(leave)

    def _hold(self, part: Callable[[], None]) -> Pause | None:
        """Run ``part`` of the conversation; end the session unless it parked."""
        pause = None
        try:
            part()
        except _Parked as parked:
            pause = parked.pause
        except SessionClosed:
            pass
        except gevent.GreenletExit as stop:
            # A kick by the operator carries its own words (qpgevent.server.steering).
            self._last_words(getattr(stop, "last_words", Canned.SHUTTING_DOWN))
            raise
        except Exception:  # the last resort: a bug in the core must not pass silently
            self.session.log.exception("internal error; closing the session")
            self._last_words(reply(421, "4.3.0", "Internal error, closing connection", close=True))
        finally:
            if pause is None:
                try:
                    self._finish()
                finally:
                    scoreboard.discard(self.session)
                    metrics.connection_closed()
        return pause

    def _open(self) -> None:
        if self.listen.implicit_tls and self.tls is not None:
            self._start_tls()  # RFC 8314 3.3: TLS from the first octet, before the greeting
        self.conversation.open()
        self._converse()

    def _converse(self) -> None:
        """Do what the conversation asks until it is over (or the session parks)."""
        conversation = self.conversation
        while True:
            request = conversation.next_request()
            if request is READ:
                self._flush()
                conversation.receive(self._receive())
            elif request is FLUSH:
                self._flush()
            elif request is START_TLS:
                self._flush()
                self._start_tls()
            elif request is CLOSE:
                return
            else:  # Wait
                gevent.sleep(request.seconds)  # type: ignore[union-attr]

    def _receive(self) -> bytes:
        in_data = self.conversation.in_data
        try:
            data = self._recv(in_data)
        except TimeoutError:
            self._timed_out(in_data)
        except OSError as error:
            self.session.log.info("read failed: %s", error)
            raise SessionClosed from None
        metrics.received(len(data))
        self._request_octets += len(data)
        return data

    def _timed_out(self, in_data: bool = False) -> None:
        self.conversation.timed_out(in_data)
        raise SessionClosed

    def _recv(self, in_data: bool) -> bytes:
        """The client's next bytes; raises _Parked past ``[limits] park_after`` of silence.

        Only between commands: mid-DATA the client is sending, and a TLS session with
        decrypted bytes buffered has input the socket's watcher would never report.
        """
        timeout = self.settings.data_timeout if in_data else self.command_timeout()
        left = self._time_left(timeout)
        # The session's or this request's deadline comes first: wait only that long, and do not
        # park. Within a tenth of the timeout it is the usual wait (with its reusable timer, and
        # parking): a request's own deadline starts a moment before we wait, every time.
        if left < timeout * 0.9:
            if left <= 0:
                self.session.log.info("session or request deadline reached (session_timeout, min_data_rate)")
                raise TimeoutError
            if self.sock.timeout is not None:
                self.sock.settimeout(None)
            with gevent.Timeout(left, TimeoutError):
                return self._read()
        raw = self.raw
        if raw is not None:
            try:  # the client has often answered already: then no timer is armed for the wait
                return raw.recv(READ_SIZE)
            except BlockingIOError:
                pass
        read = self._read if raw is None else self._wait_and_read
        parking = self.parking
        after = parking.after if parking is not None and not in_data else None
        sock = self.sock
        # (A plain socket has no ``pending``: asking gevent's would raise and catch an AttributeError.)
        if after is None or after >= timeout or (raw is None and getattr(sock, "pending", _nothing)()):
            return self._within(timeout, read)
        try:
            return self._within(after, read)
        except TimeoutError:
            if parking is None or parking.after is None:
                # The server began to stop while we waited: an idle session ends now;
                # another waits on here, to end as every session does.
                if self._idle_while_stopping():
                    self._shut_down()
                    raise SessionClosed from None
                return self._within(timeout - after, read)
            self._drop_timers()  # a parked session keeps as little as it can
            raise _Parked(Pause(contextvars.copy_context(), timeout - after)) from None

    def _read(self) -> bytes:
        """The client's next bytes: on a plain socket, what gevent's ``recv`` does without its
        Python wrapper (which catches, inspects and clears the EAGAIN of every read that
        must wait): take what the OS socket has, else wait on the gevent socket's own input
        watcher, and take it then.

        Not "wait first": the client has often answered by the time we read (nearly always
        at valgrind's pace), and a wait for input already there costs a turn of the loop
        (docs/benchmarks.md, "Round three").
        """
        raw = self.raw
        if raw is None:
            return self.sock.recv(READ_SIZE)
        try:
            return raw.recv(READ_SIZE)
        except BlockingIOError:
            return self._wait_and_read()

    def _wait_and_read(self) -> bytes:
        """``_read`` when the OS socket had nothing a moment ago: wait for input, then take it."""
        raw = self.raw
        assert raw is not None
        while True:
            sock = self.sock
            reader = sock._read_event
            if reader is None:  # closed meanwhile: recv says so
                return sock.recv(READ_SIZE)
            sock._wait(reader)
            try:
                return raw.recv(READ_SIZE)
            except BlockingIOError:
                pass

    def _time_left(self, timeout: float) -> float:
        """Seconds this wait may take: to the session's end, and to the request's deadline.

        A request (a command line, or a message's data) may take ``timeout`` plus a second
        for each ``min_data_rate`` octets received in it (Postfix's smtpd_min_data_rate):
        a client trickling an octet per wait cannot make one request last for ever.
        """
        now = time.monotonic()
        left = self._ends - now
        rate = self.settings.min_data_rate
        if rate:
            if self._request_started is None:
                self._request_started, self._request_octets = now, 0
            left = min(left, self._request_started + timeout + self._request_octets / rate - now)
        return left

    def _within(self, seconds: float, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` on our socket, or TimeoutError after ``seconds``.

        One reusable timer per session and duration, on a socket without a timeout of its
        own: gevent's socket timeouts make a new timer for every wait, which costs more
        than the wait itself (docs/benchmarks.md, "Profile"). Each wait gets the whole
        period (RFC 5321 4.5.3.2), see ``WaitTimer``.
        """
        if self.sock.timeout is not None:  # set by the TLS handshake, or new after STARTTLS
            self.sock.settimeout(None)
        timers = self._timers
        if timers is None:
            timers = self._timers = {}
        timer = timers.get(seconds)
        if timer is None:
            timer = timers[seconds] = WaitTimer.take(seconds)
        timer.start()
        try:
            return call(*args)
        finally:
            timer.cancel()

    def _drop_timers(self) -> None:
        if self._timers is not None:
            for timer in self._timers.values():
                timer.release()
            self._timers = None

    def _wait_for_input(self, seconds: float) -> bool:
        return has_input(self.sock, seconds)

    def _start_tls(self) -> None:
        """Handshake on our socket; the conversation then forgets what was said before."""
        assert self.tls is not None
        try:
            self.raw = None  # from now on bytes go through TLS
            self.sock = self._input.sock = self.tls.handshake(self.sock)
        except HandshakeFailed as error:
            self.session.log.info("TLS handshake failed: %s", error)
            if self.conversation.trace is not None:
                self.conversation.trace.note(f"TLS handshake failed: {error}")
            raise SessionClosed from None
        self.conversation.tls_started(describe(self.sock))

    def _flush(self) -> None:
        out = self.conversation.out
        if not out:
            return
        try:
            # Most replies fit the socket's buffer: one send() on the plain socket, without
            # gevent's sendall (which asks the kernel for SO_SNDBUF on every call) or a timer.
            # What does not fit waits for the client with the usual per-wait timeout.
            raw = self.raw
            sent = 0
            if raw is not None:
                try:
                    sent = raw.send(out)
                except BlockingIOError:
                    pass  # the kernel's buffer is full
            if sent < len(out):
                # Sent as a copy: gevent's sendall holds a view of what it sends, and on a
                # failed write the exception's traceback (kept by whoever keeps the log
                # record) keeps that view alive; a bytearray with a view cannot be cleared.
                self._within(self.settings.command_timeout, self.sock.sendall, bytes(out[sent:]))
        except OSError as error:
            self.session.log.info("write failed: %s", error)
            out.clear()
            raise SessionClosed from None
        out.clear()
        self._request_started = None  # we answered: what the client sends next is a new request

    def _last_words(self, words: Reply) -> None:
        """We must go now (server stopping, or a bug): say so if we can, queued replies dropped."""
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(self.conversation.last_words(words))
        except OSError:
            self.session.log.debug("could not send the shutdown reply")

    def _finish(self) -> None:
        try:
            self._flush()
        except SessionClosed:
            pass
        self._drop_timers()
        self.conversation.end()



class _Input:
    """A session's socket, for its ``wait_for_input``; ``sock`` changes after STARTTLS."""

    __slots__ = ("sock",)

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def __call__(self, seconds: float) -> bool:  # callable itself: no bound method kept per session
        return has_input(self.sock, seconds)


class _HookActivity:
    """A hook-runner observer: which plugin a session is in, for the scoreboard."""

    def hook_started(self, hook: str, plugin: str, session: Any) -> None:
        if isinstance(session, Session):
            session.hook_running = f"{hook} ({plugin})"

    def hook_finished(self, hook: str, plugin: str, session: Any, verdict: Verdict, seconds: float) -> None:
        if isinstance(session, Session):
            session.hook_running = None


HOOK_ACTIVITY = _HookActivity()


def _nothing() -> int:
    return 0


def _raw_socket(sock: Any) -> _socket.socket | None:
    """The non-blocking OS socket inside a plain gevent socket; None for anything else (TLS),
    or for a gevent whose socket no longer has the private parts ``_read`` waits with (then
    every read and write takes gevent's public path)."""
    if (isinstance(sock, gevent.socket.socket) and not isinstance(sock, gevent.ssl.SSLSocket)
            and hasattr(sock, "_wait") and hasattr(sock, "_read_event")):
        raw = getattr(sock, "_sock", None)  # a _socket.socket: with monkey-patching, socket.socket is gevent's
        if isinstance(raw, _socket.socket) and raw.gettimeout() == 0.0:
            return raw
    return None


#: The real poll: asking without waiting must not yield. Not select: it fails on a
#: descriptor past 1023 (FD_SETSIZE), and a worker with a thousand sessions has those.
_poll = gevent.monkey.get_original("select", "poll")


def has_input(sock: Any, seconds: float = 0.0) -> bool:
    """Whether ``sock`` has input now, or within ``seconds`` (a wait for it only then yields)."""
    if getattr(sock, "pending", _nothing)():  # TLS: decrypted octets already off the socket
        return True
    poller = _poll()
    poller.register(sock.fileno(), 1)  # 1: POLLIN
    if poller.poll(0):
        return True
    if seconds <= 0:
        return False
    try:
        gevent.socket.wait_read(sock.fileno(), timeout=seconds)
    except TimeoutError:
        return False
    return True

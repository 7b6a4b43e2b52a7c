"""One SMTP conversation, in straight-line blocking code, over one socket.

The shape of every command: the protocol core parses it (and refuses what is out of
order), the hook runner asks the plugins, the reply table turns their verdict into a
reply, and the reply is queued; queued replies are written out whenever we need more
input, so pipelined commands (RFC 2920) get their replies in one batch, in order.

This module owns the ``Session`` object plugins receive as their first argument:
``session.connection``, ``session.transaction``, ``session.notes``, ``session.respond``.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import email.utils
import logging
import os
import re
import socket
import time
from typing import Any, Callable

import gevent
from gevent import select

from .. import __version__
from ..backends import auth, dns, metrics, scoreboard
from ..core import authresults
from ..core.address import Address, AddressError
from ..core.codes import OK, ReturnCode, Verdict
from ..config import Listen, Settings
from ..connection import Connection
from ..engine.hooks import HookRunner
from ..backends.log import SessionLogger, bind_session, redact
from .parking import Parking, Pause
from ..core.protocol import (CONNECTION_CLOSED, NEED_DATA, Auth, AuthResponse, Data, Ehlo, Helo, Help, Limits, Mail, MessageData, MessageEnd, Noop, Quit, Rcpt, Rejected, Rset, SmtpProtocol, Starttls, State, Unknown, Vrfy)
from ..core.proxy import looks_like_header
from ..core.reply import INTERNAL_ERROR, Canned, Outcome, Reply, answer, reply
from ..backends.services import identify
from .tls import HandshakeFailed, TlsContexts, describe
from ..transaction import Transaction

log = logging.getLogger("qpgevent.session")
READ_SIZE = 1 << 16


class SessionClosed(Exception):
    """The client went away, or we closed; the session ends without further replies."""


class _Parked(Exception):
    """Unwinds the session's greenlet when it parks; ``Session._hold`` catches it."""

    def __init__(self, pause: Pause) -> None:
        super().__init__()
        self.pause = pause


class Session:
    #: The client ended the session with QUIT (it expects nothing after our 221).
    client_quit = False

    def __init__(self, sock: socket.socket, connection: Connection, runner: HookRunner,
                 settings: Settings, peers: Callable[[str], int] = lambda ip: 1,
                 listen: Listen | None = None, tls: TlsContexts | None = None,
                 parking: Parking | None = None) -> None:
        self.sock = sock
        #: When to park while waiting for a command (None: never); see qpgevent.server.parking.
        self.parking = parking
        #: This listener's policy (implicit TLS, submission...), and the TLS contexts (None: no TLS).
        self.listen = listen or Listen("", 0)
        self.tls = tls
        self._sasl: dict[str, Any] | None = None  #: the AUTH exchange in progress
        self.connection = connection
        self.runner = runner
        self.settings = settings
        self.log = SessionLogger(log, self)
        self.protocol = SmtpProtocol(Limits(
            max_command_line=settings.max_command_line,
            max_text_line=settings.max_text_line,
            max_message_size=settings.max_message_size,
            max_recipients=settings.max_recipients,
            max_bad_commands=settings.max_bad_commands,
            allow_bare_lf=settings.allow_bare_lf,
            nul_bytes=settings.nul_bytes,
        ))
        self._peers = peers
        self._transaction: Transaction | None = None
        self._out = bytearray()
        self._message_refusal: Reply | None = None
        self._messages = 0
        self._started = time.monotonic()
        self._started_at = time.time()  #: wall clock: the scoreboard is read by other processes
        # For the summary line and the scoreboard:
        self._transactions = self._accepted = self._refused = self._bytes = self._last_reply = 0
        self._doing = "connect"  #: the command in progress, or "waiting"
        self.hook_running: str | None = None  #: "hook (plugin)" while a plugin runs
        if metrics.enabled():
            runner.observe(metrics.HOOK_METRICS)
        if scoreboard.active():
            runner.observe(HOOK_ACTIVITY)
        self._heard = False  #: the client has sent something
        self._timers: dict[float, gevent.Timeout] | None = None  #: see _within

    # -- what plugins use ----------------------------------------------------
    @property
    def me(self) -> str:
        return self.settings.me

    @property
    def notes(self) -> dict[str, Any]:
        return self.connection.notes

    @property
    def transaction(self) -> Transaction:
        """The current transaction, started on first use (as in qpsmtpd, never None)."""
        if self._transaction is None:
            self._transaction = Transaction(self.settings.spool_dir, self.settings.size_threshold,
                                            connection_id=self.connection.id,
                                            max_header_size=self.settings.max_header_size)
        return self._transaction

    @property
    def current_transaction(self) -> Transaction | None:
        """The transaction if one is open, without starting one."""
        return self._transaction

    def respond(self, code: int, *lines: str, enhanced: str | None = None, close: bool = False) -> None:
        """Answer the client directly (a plugin that returns DONE has called this)."""
        self._send(reply(code, enhanced, *lines, close=close))

    def concurrent_connections(self, ip: str | None = None) -> int:
        """Sessions open now from ``ip`` (default: this client's), this one included."""
        return self._peers(ip or self.connection.remote_ip)

    def wait_for_input(self, seconds: float) -> bool:
        """Whether the client sends something within ``seconds`` (earlytalker)."""
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return bool(readable)

    # -- the conversation ----------------------------------------------------
    def run(self) -> Pause | None:
        """Hold the conversation from the connect: None once it has ended, or a Pause.

        A Pause means the session parked (``qpgevent.server.parking``): it waits for its client
        without a greenlet, and ``resume`` goes on with it, in the Pause's context.
        """
        bind_session(self)  # lines that plugins and services log get our ids
        scoreboard.add(self)
        metrics.connection_opened()
        connection = self.connection
        via = f" via proxy {connection.proxy_ip}:{connection.proxy_port}" if connection.proxy_ip else ""
        self.log.info("connect from %s:%s to %s:%s%s", connection.remote_ip, connection.remote_port,
                      connection.local_ip, connection.local_port, via)
        # The DNS time every hook of this session may spend, in all ([dns] session_budget);
        # a parked session keeps it in its Pause's context.
        seconds = self.settings.dns_session_budget
        with dns.budget(seconds) if seconds else contextlib.nullcontext():
            return self._hold(self._open)

    def resume(self, timed_out: bool) -> Pause | None:
        """Go on after parking: read what woke us, or say we timed out (as ``run``)."""
        return self._hold(self._timed_out if timed_out else self._converse)

    def _hold(self, part: Callable[[], Any]) -> Pause | None:
        """Run ``part`` of the conversation; end the session unless it parked."""
        pause = None
        try:
            part()
        except _Parked as parked:
            pause = parked.pause
        except SessionClosed:
            pass
        except gevent.GreenletExit as stop:  # the server stops, or the operator kicked us (steering.Kicked)
            self._shutdown_reply(getattr(stop, "last_words", Canned.SHUTTING_DOWN))
            raise
        except Exception:  # the last resort: a bug in the core must not pass silently
            self.log.exception("internal error; closing the session")
            self._shutdown_reply(reply(421, "4.3.0", "Internal error, closing connection", close=True))
        finally:
            if pause is None:
                try:
                    self._finish()
                finally:
                    scoreboard.discard(self)
                    metrics.connection_closed()
        return pause

    def _open(self) -> None:
        if self._start():
            self._converse()

    def _start(self) -> bool:
        if self.listen.implicit_tls and self.tls is not None:
            self._start_tls()  # RFC 8314 3.3: TLS from the first octet, before the greeting
        for hook in ("pre_connection", "connect"):
            if hook == "connect":
                identify(self.connection, self.settings, self.log)  # remote_host, remote_info
            result = self._ask(hook)
            if result.outcome is Outcome.CLOSE:
                return False
            if hook == "connect" and result.outcome is Outcome.ANSWERED:
                return self.protocol.state is not State.CLOSED
        banner = self.settings.banner or f"ESMTP qpgevent {__version__} ready"
        self._out += self.protocol.greeting(reply(220, None, f"{self.me} {banner}"))
        return True

    def _converse(self) -> None:
        while self.protocol.state is not State.CLOSED:
            event = self.protocol.next_event()
            if event is NEED_DATA:
                self._flush()
                self._doing = "DATA (receiving)" if self.protocol.state is State.DATA else "waiting"
                self._receive()
            elif event is CONNECTION_CLOSED:
                if self.protocol.state is State.DATA:
                    self.log.info("client vanished during DATA; message dropped")
                return
            else:
                self._doing = _describe(event)
                getattr(self, _HANDLERS[type(event)])(event)

    def _receive(self) -> None:
        in_data = self.protocol.state is State.DATA
        try:
            data = self._recv(in_data)
        except TimeoutError:
            self._timed_out(in_data)
        except OSError as error:
            self.log.info("read failed: %s", error)
            raise SessionClosed from None
        self._bytes += len(data)
        metrics.received(len(data))
        if not self._heard and data:
            self._heard = True
            if looks_like_header(data):
                self._untrusted_proxy()
        self.protocol.receive_data(data)

    def _recv(self, in_data: bool) -> bytes:
        """The client's next bytes; raises _Parked past ``[limits] park_after`` of silence.

        Only between commands: mid-DATA the client is sending, and a TLS session with
        decrypted bytes buffered has input the socket's watcher would never report.
        """
        timeout = self.settings.data_timeout if in_data else self.settings.command_timeout
        after = self.parking.after if self.parking is not None and not in_data else None
        sock = self.sock
        if after is None or after >= timeout or getattr(sock, "pending", _nothing)():
            return self._within(timeout, sock.recv, READ_SIZE)
        try:
            return self._within(after, sock.recv, READ_SIZE)
        except TimeoutError:
            if self.parking.after is None:
                # The server began to stop while we waited: it waits for this greenlet,
                # not for parked sessions. Wait on here, to end as every session does.
                return self._within(timeout - after, sock.recv, READ_SIZE)
            self._drop_timers()  # a parked session keeps as little as it can
            raise _Parked(Pause(contextvars.copy_context(), timeout - after)) from None

    def _within(self, seconds: float, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` on our socket, or TimeoutError after ``seconds``.

        One reusable timer per session and duration, on a socket without a timeout of its
        own: gevent's socket timeouts make a new timer for every wait, which costs more
        than the wait itself (docs/benchmarks.md, "Profile").
        """
        if self.sock.timeout is not None:  # set by the TLS handshake, or new after STARTTLS
            self.sock.settimeout(None)
        timers = self._timers
        if timers is None:
            timers = self._timers = {}
        timer = timers.get(seconds)
        if timer is None:
            timer = timers[seconds] = gevent.Timeout(seconds, TimeoutError)
        timer.start()
        try:
            return call(*args)
        finally:
            timer.cancel()

    def _drop_timers(self) -> None:
        if self._timers is not None:
            for timer in self._timers.values():
                timer.close()
            self._timers = None

    def _timed_out(self, in_data: bool = False) -> None:
        self.log.info("timeout %s", "in DATA" if in_data else "waiting for a command")
        self._send(Canned.TIMEOUT.with_text(f"{self.me} Timeout, closing connection"))
        self._flush()
        raise SessionClosed

    def _untrusted_proxy(self) -> None:
        """A PROXY header from an address not in ``[proxy] trusted`` (or a second header).

        Most likely a load balancer missing from the list. Answered as SMTP, its "PROXY"
        line would get our 500 as the reply to the real client's EHLO, and the dialogue
        would limp on out of step; so we say what is wrong once, and close.
        """
        ip = self.connection.remote_ip
        self.log.warning("PROXY header from %s, which is not in [proxy] trusted; closing with 421", ip)
        text = f"{self.me} PROXY header not accepted from {ip}, closing connection"
        self._send(reply(421, "4.7.0", text, close=True))
        self._flush()
        raise SessionClosed

    def _send(self, answer_reply: Reply) -> None:
        self._last_reply = answer_reply.code
        self._out += self.protocol.send(answer_reply)
        if len(self._out) > READ_SIZE:
            self._flush()

    def _flush(self) -> None:
        if not self._out:
            return
        try:
            self._within(self.settings.command_timeout, self.sock.sendall, self._out)
        except OSError as error:
            self.log.info("write failed: %s", error)
            self._out.clear()
            raise SessionClosed from None
        self._out.clear()

    def _shutdown_reply(self, last_words: Reply) -> None:
        """We must go now (server stopping, or a bug): say so if we can, queued replies dropped."""
        self._out.clear()
        self._last_reply = last_words.code
        self._out += last_words.to_bytes()
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(self._out)
        except OSError:
            self.log.debug("could not send the shutdown reply")
        self._out.clear()

    def _finish(self) -> None:
        try:
            self._flush()
        except SessionClosed:
            pass
        self._drop_timers()
        self._reset_transaction()
        self.runner.notify("disconnect", self)
        if self.log.isEnabledFor(logging.INFO):  # the line is dear to make, and often not kept
            summary = self.summary()
            self.log.info("disconnect: %s", " ".join(f"{key}={_text(value)}" for key, value in summary.items()),
                          extra={"fields": summary})

    def summary(self) -> dict[str, Any]:
        """The one line per connection (Haraka's lesson): who, what, how it ended."""
        connection = self.connection
        return {"ip": connection.remote_ip, "rdns": connection.remote_host, "helo": connection.hello_host,
                "tls": connection.tls, "auth": connection.notes.get("auth_user"),
                "transactions": self._transactions, "rcpts_accepted": self._accepted,
                "rcpts_rejected": self._refused, "messages": self._messages, "bytes": self._bytes,
                "bad_commands": self.protocol.bad_commands,
                "seconds": round(time.monotonic() - self._started, 3), "last_reply": self._last_reply}

    def status(self) -> dict[str, Any]:
        """This session's row on the live scoreboard (``qpgevent.backends.scoreboard``)."""
        connection, transaction = self.connection, self._transaction
        sender = transaction.sender if transaction is not None else None
        return {"id": connection.id, "pid": os.getpid(), "remote_ip": connection.remote_ip,
                "remote_port": connection.remote_port, "rdns": connection.remote_host,
                "helo": connection.hello_host, "tls": connection.tls, "auth": connection.notes.get("auth_user"),
                "state": self.protocol.state.value, "doing": self.hook_running or self._doing,
                "sender": sender.format() if sender is not None else None,
                "recipients": len(transaction.recipients) if transaction is not None else 0,
                "transactions": self._transactions, "messages": self._messages, "bytes": self._bytes,
                "started": self._started_at}

    # -- running a hook --------------------------------------------------------
    def _ask(self, hook: str, *args: Any, **fields: str) -> Any:
        """Run ``hook``, send what the reply table says, and return the Answer."""
        verdict = self.runner.run(hook, self, *args)
        result = answer(hook, verdict, me=self.me, **fields)
        if result.outcome is Outcome.ANSWERED and self._awaiting_reply(hook):
            self.log.error("hook=%s plugin=%s returned DONE without answering", hook, verdict.plugin)
            result = answer(hook, Verdict(ReturnCode.DENYSOFT, (), verdict.plugin, True), me=self.me, **fields)
        if result.reply is not None and result.outcome is not Outcome.PROCEED:
            self._send(result.reply)
        return _Asked(result.outcome, result.reply, verdict)

    def _awaiting_reply(self, hook: str) -> bool:
        if hook in ("pre_connection", "connect"):
            return not self._out and self.protocol.state is not State.CLOSED
        if hook in ("data_headers_end",):
            return False
        return self.protocol.awaiting_reply

    # -- commands --------------------------------------------------------------
    def on_rejected(self, event: Rejected) -> None:
        self._sasl = None  # a refused line ends any AUTH exchange (the protocol left it too)
        self.log.info("refused %r: %s", redact(event.line[:80]), event.reply.code)
        verb = event.line.split(" ", 1)[0].upper()
        if verb == "RCPT":
            self._refused += 1
            metrics.recipient(False)
        metrics.rejected(verb.lower() if verb in _VERBS else "command", "core", str(event.reply.code))
        self._send(event.reply)

    def on_helo(self, command: Helo) -> None:
        self._hello("helo", command.domain)

    def on_ehlo(self, command: Ehlo) -> None:
        self._hello("ehlo", command.domain)

    def _hello(self, verb: str, domain: str) -> None:
        asked = self._ask(verb, domain)
        if asked.outcome is not Outcome.PROCEED:
            return
        # RFC 5321 4.1.4: a new HELO/EHLO is like RSET, plus a new greeting.
        self._reset_transaction()
        self.connection.hello, self.connection.hello_host = verb, domain
        first = f"{self.me} Hi {self.connection.remote_host or 'there'} [{self.connection.remote_ip}]"
        if verb == "helo":
            self._send(reply(250, None, first + "; I am so happy to meet you."))
            return
        self._send(reply(250, None, first, *self.extensions()))

    def extensions(self) -> list[str]:
        """The EHLO keywords we offer (RFC 5321 4.1.1.1), plus ones plugins add."""
        size = self.settings.max_message_size
        offered = ["PIPELINING", f"SIZE {size}" if size else "SIZE", "8BITMIME",
                   "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.tls is not None and not self.connection.tls:
            offered.append("STARTTLS")
        mechanisms = self.auth_mechanisms()
        if mechanisms and not self.protocol.authenticated:
            offered.append("AUTH " + " ".join(mechanisms))
        offered += list(self.connection.notes.get("capabilities", ()))
        return offered

    # -- STARTTLS (RFC 3207) ---------------------------------------------------
    def on_starttls(self, command: Starttls) -> None:
        if self.tls is None:
            self._send(Canned.TLS_NOT_OFFERED)
        elif self.connection.tls:
            self._send(Canned.ALREADY_TLS)
        else:
            self._send(Canned.READY_FOR_TLS)  # the protocol drops pipelined plaintext here
            self._flush()
            self._start_tls()

    def _start_tls(self) -> None:
        """Handshake on our socket; then a new Connection, everything said before forgotten."""
        assert self.tls is not None
        try:
            self.sock = self.tls.handshake(self.sock)
        except HandshakeFailed as error:
            self.log.info("TLS handshake failed: %s", error)
            raise SessionClosed from None
        self._reset_transaction()
        old = self.connection
        twin = old.clone()  # RFC 3207 4.2: discard knowledge obtained before TLS
        twin.tls = True
        if twin.notes.pop("auth_user", None) is not None:
            twin.notes.pop("auth_method", None)
            twin.relay_client = False
        twin.hello = twin.hello_host = None
        details = describe(self.sock)  # type: ignore[arg-type]
        twin.notes.update(details)
        self.connection = twin
        self.log.info("TLS started: %s %s", details["tls_version"], details["tls_cipher"])

    # -- AUTH (RFC 4954) -------------------------------------------------------
    def auth_mechanisms(self) -> tuple[str, ...]:
        """The mechanisms offered now: only over TLS, unless the listener or config allows plaintext."""
        if not (self.connection.tls or self.listen.plain_auth or not self.settings.tls_before_auth):
            return ()
        return auth.mechanisms(self.runner.has)

    def _limiter(self) -> auth.FailureLimiter:
        settings = self.settings
        return auth.FailureLimiter(settings.auth_max_failures_ip, settings.auth_max_failures_user,
                                   settings.auth_failure_window)

    def on_auth(self, command: Auth) -> None:
        offered = self.auth_mechanisms()
        if not offered:
            needs_tls = auth.mechanisms(self.runner.has) and not self.connection.tls
            self._send(Canned.ENCRYPTION_REQUIRED if needs_tls else Canned.AUTH_NOT_OFFERED)
            return
        if command.mechanism not in offered:
            self._send(Canned.UNKNOWN_MECHANISM)
            return
        if self._limiter().blocked(self.connection.remote_ip):
            self.log.warning("AUTH refused: too many failures from %s", self.connection.remote_ip)
            self._send(Canned.TOO_MANY_AUTH_FAILURES)
            return
        mechanism, initial = command.mechanism, command.initial
        if mechanism == "PLAIN":
            self._sasl = {"mechanism": mechanism}
            if initial is None:
                self._send(reply(334, None, ""))
            else:
                self._sasl_step(initial)
        elif mechanism == "LOGIN":
            self._sasl = {"mechanism": mechanism}
            if initial is None:
                self._send(reply(334, None, auth.USERNAME_PROMPT))
            else:
                self._sasl_step(initial)
        else:  # CRAM-MD5: the server speaks first (RFC 4954 4: no initial response)
            if initial is not None:
                self._send(Canned.SYNTAX)
                return
            ticket = auth.challenge(self.me)
            self._sasl = {"mechanism": mechanism, "ticket": ticket}
            self._send(reply(334, None, base64.b64encode(ticket.encode()).decode()))

    def on_auth_response(self, event: AuthResponse) -> None:
        self._doing = "AUTH"
        if self._sasl is None:  # cannot happen: the protocol only reads these after our 334
            self._send(Canned.AUTH_CANCELLED)
            return
        self._sasl_step(event.data)

    def _sasl_step(self, data: bytes) -> None:
        """One client response in the exchange: ask for more, or check the credentials."""
        sasl = self._sasl
        assert sasl is not None
        mechanism = sasl["mechanism"]
        try:
            if mechanism == "PLAIN":
                user, password = auth.parse_plain(data)
                ticket = None
            elif mechanism == "LOGIN" and "user" not in sasl:
                sasl["user"] = auth.parse_login(data)
                self._send(reply(334, None, auth.PASSWORD_PROMPT))
                return
            elif mechanism == "LOGIN":
                user, ticket = sasl["user"], None
                password = auth.parse_login(data)
            else:
                user, password = auth.parse_cram(data)
                ticket = sasl["ticket"]
        except auth.BadResponse as error:
            self.log.info("AUTH %s: %s", mechanism, error)
            self._auth_failed(mechanism, sasl.get("user"), Canned.BAD_CREDENTIALS)
            return
        self._check_credentials(mechanism, user, password, ticket)

    def _check_credentials(self, mechanism: str, user: str, password: str, ticket: str | None) -> None:
        if self._limiter().blocked(self.connection.remote_ip, user):
            self._auth_failed(mechanism, user, Canned.BAD_CREDENTIALS, counted=False)
            return
        hook = auth.MECHANISM_HOOKS[mechanism]
        verdict = self.runner.run(hook, self, mechanism, user, password, ticket)
        if verdict.code is ReturnCode.DECLINED and not verdict.internal_error and mechanism in auth.GENERIC_MECHANISMS:
            verdict = self.runner.run("auth", self, mechanism, user, password, ticket)
        result = answer("auth", verdict, me=self.me)
        if result.outcome is Outcome.ANSWERED and self.protocol.awaiting_reply:
            result = answer("auth", Verdict(ReturnCode.DENYSOFT, (), verdict.plugin, True), me=self.me)
        if result.outcome is Outcome.PROCEED:
            self._sasl = None
            self.connection.notes["auth_user"] = user
            self.connection.notes["auth_method"] = mechanism
            self.connection.relay_client = True
            self.log.info("AUTH %s: authenticated user=%s (plugin %s)", mechanism, user, verdict.plugin)
            assert result.reply is not None
            self._send(result.reply)
        elif result.outcome is Outcome.ANSWERED:
            self._sasl = None
        elif result.reply is not None and result.reply.code // 100 == 4 and not result.reply.close:
            self._sasl = None  # the backend could not check (454): not the client's failure
            self._send(result.reply)
        else:
            self._auth_failed(mechanism, user, result.reply or Canned.BAD_CREDENTIALS)

    def _auth_failed(self, mechanism: str, user: str | None, refusal: Reply, counted: bool = True) -> None:
        """Count the failure, make the client wait longer each time, then 535 (or 421 past the limit)."""
        self._sasl = None
        settings, ip = self.settings, self.connection.remote_ip
        failures = self._limiter().failed(ip, user) if counted else settings.auth_max_failures_ip + 1
        self.log.info("AUTH %s failed for user=%s (%d from %s in the window)", mechanism, user or "-",
                      min(failures, settings.auth_max_failures_ip + 1), ip)
        gevent.sleep(min(settings.auth_failure_delay * failures, settings.auth_max_delay))
        if failures > settings.auth_max_failures_ip or self._limiter().blocked(ip, user):
            self.log.warning("AUTH: too many failures (address %s, user %s); closing", ip, user or "-")
            self._send(Canned.TOO_MANY_AUTH_FAILURES)
        else:
            self._send(refusal)

    def on_mail(self, command: Mail) -> None:
        if self.listen.submission and not self.connection.notes.get("auth_user"):
            self._send(Canned.AUTH_REQUIRED)  # RFC 4954 6: 530 until AUTH
            return
        asked = self._ask("mail_pre", command.path, command.params)
        if asked.outcome is not Outcome.PROCEED:
            return
        path = _rewritten(asked.verdict, command.path)
        smtputf8 = "SMTPUTF8" in command.params
        if not path.isascii() and not smtputf8:
            self._send(Canned.NEEDS_SMTPUTF8)
            return
        try:
            sender = Address.parse(path, smtputf8=smtputf8, allow_null=True)
        except AddressError as error:
            self._send(Canned.BAD_SENDER.with_text(f"could not parse your mail from command: {error}"))
            return
        user = self.connection.notes.get("auth_user")
        if self.listen.submission and not self._senders().allows(user, sender):
            self.log.info("sender %s refused: not one of user %s's", sender.format(), user)
            self._send(Canned.SENDER_NOT_YOURS)
            return
        self._reset_transaction()
        asked = self._ask("mail", sender, command.params, address=sender.format())
        if asked.outcome is Outcome.PROCEED:
            self._begin(sender)
            self._send(asked.reply)
        elif asked.outcome is Outcome.ANSWERED and self.protocol.state is State.MAIL:
            self._begin(sender)

    def _senders(self) -> auth.SenderMap:
        senders = _SENDER_MAPS.get(self.settings.auth_senders)
        if senders is None:
            senders = _SENDER_MAPS[self.settings.auth_senders] = auth.SenderMap(self.settings.auth_senders)
        return senders

    def _begin(self, sender: Address) -> None:
        self.transaction.sender = sender
        self._transactions += 1
        metrics.transaction_started()

    def on_rcpt(self, command: Rcpt) -> None:
        accepted = self._accepted
        self._rcpt(command)
        if self._accepted == accepted:
            self._refused += 1
            metrics.recipient(False)

    def _rcpt(self, command: Rcpt) -> None:
        asked = self._ask("rcpt_pre", command.path, command.params)
        if asked.outcome is not Outcome.PROCEED:
            return
        path = _rewritten(asked.verdict, command.path)
        smtputf8 = self.protocol.smtputf8
        if not path.isascii() and not smtputf8:
            self._send(Canned.NEEDS_SMTPUTF8)
            return
        try:
            recipient = Address.parse(path, smtputf8=smtputf8, allow_null=False, allow_postmaster=True)
        except AddressError as error:
            self._send(Canned.BAD_RECIPIENT.with_text(f"could not parse recipient: {error}"))
            return
        asked = self._ask("rcpt", recipient, command.params, address=recipient.format())
        if asked.outcome is Outcome.PROCEED:
            self._accept(recipient)
            self._send(asked.reply)
        elif asked.outcome is Outcome.ANSWERED and self.protocol.state is State.RCPT:
            self._accept(recipient)

    def _accept(self, recipient: Address) -> None:
        self.transaction.add_recipient(recipient)
        self._accepted += 1
        metrics.recipient(True)

    def on_data(self, command: Data) -> None:
        asked = self._ask("data")
        if asked.outcome is Outcome.PROCEED:
            self._message_refusal = None
            self._send(asked.reply)
        elif asked.outcome is not Outcome.ANSWERED:
            self._reset_transaction()

    def on_message_data(self, event: MessageData) -> None:
        if self._message_refusal is not None:
            return  # refused at data_headers_end: read to the end, keep nothing
        if self.transaction.write(event.data):
            self._headers_done()

    def _headers_done(self) -> None:
        if self.transaction.problem is not None:  # header too large, spool_dir full
            self._message_refusal = self.transaction.problem
            return
        asked = self._ask_silently("data_headers_end")
        if asked.outcome is Outcome.CLOSE:
            self._send(asked.reply)
        elif asked.outcome is not Outcome.PROCEED:
            self._message_refusal = asked.reply or INTERNAL_ERROR

    def _ask_silently(self, hook: str) -> Any:
        """Run a hook whose reply must wait (mid-DATA): return the Answer, send nothing."""
        verdict = self.runner.run(hook, self)
        result = answer(hook, verdict, me=self.me)
        if result.outcome is Outcome.ANSWERED:
            result = answer(hook, Verdict(ReturnCode.DENYSOFT, (), verdict.plugin, True))
        return _Asked(result.outcome, result.reply, verdict)

    def on_message_end(self, event: MessageEnd) -> None:
        try:
            self._message_end(event)
        finally:
            self._reset_transaction()

    def _message_end(self, event: MessageEnd) -> None:
        if event.problem is not None:
            self.log.info("message refused: %s (%d octets)", event.problem.text[0], event.size)
            metrics.rejected("data", "core", str(event.problem.code))
            self._send(event.problem)
            return
        transaction = self.transaction
        if transaction.end_of_data() and self._message_refusal is None:
            self._headers_done()
        if self._message_refusal is None:
            self._message_refusal = transaction.problem
        if self._message_refusal is not None:
            self._send(self._message_refusal)
            return
        transaction.headers.prepend("Received", self.received_line())
        for hook in ("data_post", "queue_pre"):
            asked = self._ask(hook)
            if asked.outcome is not Outcome.PROCEED:
                return
            if hook == "data_post":  # every plugin has recorded its result: one header (RFC 8601)
                authresults.finish(transaction, self.connection, self.me)
        asked = self._ask("queue")
        if asked.outcome is Outcome.PROCEED:
            self._messages += 1
            metrics.message_queued(asked.verdict.plugin)
            self.log.info("queued: from=%s rcpts=%d size=%d: %s", transaction.sender,
                          len(transaction.recipients), transaction.data_size, asked.reply.text[0])
            self._send(asked.reply)
        self.runner.notify("queue_post", self)

    def received_line(self) -> str:
        """Our trace header (RFC 5321 4.4), protocol names as RFC 3848 and RFC 6531 4.3 say."""
        connection, transaction = self.connection, self.transaction
        esmtp = connection.hello == "ehlo"
        if self.protocol.smtputf8:
            protocol = "UTF8SMTP"
        else:
            protocol = "ESMTP" if esmtp else "SMTP"
        if connection.tls:
            protocol += "S"
        user = connection.notes.get("auth_user")
        if user and esmtp:
            protocol += "A"
            protocol += f" (authenticated as {_printable(user)})"
        helo = connection.hello_host or "unknown"
        if not _ADDRESS_LITERAL.fullmatch(helo):  # "[192.0.2.1]" stays; brackets elsewhere could forge ours
            helo = _printable(helo)
        remote = _printable(connection.remote_host or "unknown")
        if connection.remote_info:  # the ident answer, as sendmail writes it: user@host
            remote = f"{_printable(connection.remote_info)}@{remote}"
        recipients = transaction.recipients
        recipient = f"\n\tfor {recipients[0].format()}" if len(recipients) == 1 else ""
        date = _received_date()
        return (f"from {helo} ({remote} [{connection.remote_ip}])\n"
                f"\tby {self.me} (qpgevent {__version__}) with {protocol} id {transaction.id}"
                f"{recipient};\n\t{date}")

    def on_rset(self, command: Rset) -> None:
        self._reset_transaction()
        self._send(Canned.OK)

    def on_noop(self, command: Noop) -> None:
        self._ask_and_send("noop", command.argument)

    def on_vrfy(self, command: Vrfy) -> None:
        self._ask_and_send("vrfy", command.argument)

    def on_help(self, command: Help) -> None:
        self._ask_and_send("help", command.argument)

    def on_quit(self, command: Quit) -> None:
        self.client_quit = True
        self._ask_and_send("quit")
        if self.protocol.state is not State.CLOSED:
            raise SessionClosed  # RFC 5321 4.1.1.10: QUIT ends it, even if a plugin answered (DONE)

    def on_unknown(self, command: Unknown) -> None:
        self._ask_and_send("unrecognized_command", command.verb.lower(), command.argument)

    def _ask_and_send(self, hook: str, *args: Any) -> None:
        asked = self._ask(hook, *args)
        if asked.outcome is Outcome.PROCEED and asked.reply is not None:
            self._send(asked.reply)

    def _reset_transaction(self) -> None:
        if self._transaction is None:
            return
        self.runner.notify("reset_transaction", self)
        self._transaction.close()
        self._transaction = None
        self._message_refusal = None


class _Asked:
    __slots__ = ("outcome", "reply", "verdict")

    def __init__(self, outcome: Outcome, answer_reply: Reply | None, verdict: Verdict) -> None:
        self.outcome, self.reply, self.verdict = outcome, answer_reply, verdict


class _HookActivity:
    """A hook-runner observer: which plugin a session is in, for the scoreboard."""

    def hook_started(self, hook: str, plugin: str, session: Any) -> None:
        if isinstance(session, Session):
            session.hook_running = f"{hook} ({plugin})"

    def hook_finished(self, hook: str, plugin: str, session: Any, verdict: Verdict, seconds: float) -> None:
        if isinstance(session, Session):
            session.hook_running = None


HOOK_ACTIVITY = _HookActivity()
#: Event type -> the Session method that handles it (a name: one table per process, not a
#: dict of bound methods per session).
_HANDLERS: dict[type, str] = {
    Helo: "on_helo", Ehlo: "on_ehlo", Mail: "on_mail", Rcpt: "on_rcpt", Data: "on_data", Rset: "on_rset",
    Noop: "on_noop", Quit: "on_quit", Vrfy: "on_vrfy", Help: "on_help", Unknown: "on_unknown",
    Rejected: "on_rejected", MessageData: "on_message_data", MessageEnd: "on_message_end",
    Starttls: "on_starttls", Auth: "on_auth", AuthResponse: "on_auth_response",
}
_SENDER_MAPS: dict[str, auth.SenderMap] = {}  #: [auth] senders path -> its map (one per process)
#: Verbs the core knows: a refused line's verb is a metric label only if it is one of these.
_VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP"})


def _describe(event: Any) -> str:
    """What the scoreboard shows for an event: the verb alone, never an argument (AUTH)."""
    if isinstance(event, MessageData):
        return "DATA (receiving)"
    if isinstance(event, MessageEnd):
        return "DATA (end)"
    if isinstance(event, Rejected):
        return "refused command"
    if isinstance(event, AuthResponse):
        return "AUTH"
    verb = event.verb.upper()
    return verb if verb.isascii() and verb.isalpha() and len(verb) <= 12 else "unknown command"


def _nothing() -> int:
    return 0


def _text(value: Any) -> str:
    """A summary value in the text log: '-' for none, yes/no, quoted when it has spaces."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    return repr(text) if any(c.isspace() or not c.isprintable() for c in text) else text


def _rewritten(verdict: Verdict, path: str) -> str:
    """A ``*_pre`` hook may answer (OK, new_path) to fix up what the client wrote."""
    if verdict.code is OK and verdict.message:
        return verdict.message[0].strip()
    return path


def _printable(text: str) -> str:
    """Client text fit for our Received comment: no control characters, nothing that
    could open or close a comment or an address literal of its own."""
    return "".join(c if c.isprintable() and c not in "()[]" else "?" for c in text)[:255]


_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:)?[0-9A-Fa-f:.]{2,45}\]")


_date_second, _date_text = -1, ""  #: the wall-clock second _received_date last made, and its text


def _received_date() -> str:
    """``email.utils.formatdate(localtime=True)``, made once a second: every message's
    Received header needs it, and it costs more than the rest of the header."""
    global _date_second, _date_text
    now = time.time()
    if int(now) != _date_second:
        _date_second, _date_text = int(now), email.utils.formatdate(now, localtime=True)
    return _date_text

"""The conversation: every decision of one SMTP dialogue, without a socket.

Theory of operation. The I/O driver (``qpgevent.server.driver``, or ``engine.memory`` in
tests and dry runs) feeds the client's bytes in with ``receive`` and asks
``next_request`` what to do; the answer is one of ``READ`` (write ``out``, then feed
the next bytes), ``FLUSH`` (write ``out``, ask again), ``START_TLS`` (write ``out``,
handshake, call ``tls_started``), ``CLOSE`` (write ``out``, the dialogue is over) or
``Wait(seconds)`` (pause, write nothing yet, ask again). Hooks run synchronously, in the
caller's greenlet, through ``decide``: the ONE path to the plugins. Each command takes
the same road: the protocol core parses it and refuses what is out of order, ``decide``
asks the plugins, the reply table turns their verdict into a reply, and the reply is
queued in ``out``; replies pile up while pipelined input is pending (RFC 2920). How
long a READ may wait, and parking an idle session meanwhile, are the driver's business.

This module imports nothing that does I/O (tests/unit/test_layers.py checks it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..config import Listen, Settings
from ..connection import Connection, host_port
from ..core.codes import DECLINED_VERDICT, OK, ReturnCode, Verdict
from ..core.help import verb_list
from ..core.help import about as help_about
from ..core.protocol import (CONNECTION_CLOSED, NEED_DATA, Auth, AuthResponse, Bdat, ChunkEnd, Command, Ehlo, Helo, Limits,
                             Mail, MessageData, MessageEnd, Noop, Quit, Rcpt, Rejected, Rset, SmtpProtocol,
                             Starttls, State, Unknown, Vrfy, Data, Help)
from ..core.proxy import looks_like_header
from ..core.reply import INTERNAL_ERROR, Answer, Canned, Outcome, Reply, answer, reply, settled_answer
from . import offers
from .authentication import Authentication
from .dialogue import CLOSE, FLUSH, READ, START_TLS, Asked, Request, Wait
from .hooks import HOOKS, HookRunner
from .mail import MailTransaction
from .session import Session, Tally, describe, redact, summary_text
from .surroundings import Surroundings
from .trace import Trace, trace_for

READ_SIZE = 1 << 16  #: queued output past this is written before going on
#: Events handled in one ``next_request`` before the other sessions get a turn (about 30
#: pipelined commands): reading input already there and writing replies the kernel takes
#: do not give the others a turn by themselves.
EVENTS_PER_TURN = 32
OTHERS_TURN = Wait(0.0)


class Conversation:
    """One client's SMTP dialogue: bytes in, replies and requests out."""

    # Slotted: idle sessions by the thousand (docs/benchmarks.md, "idle").
    __slots__ = ("runner", "settings", "listen", "tls_offered", "surroundings", "counters", "session", "log",
                 "protocol", "auth", "mail", "tally", "out", "copies", "_request", "_heard", "trace", "client_quit")

    def __init__(self, connection: Connection, runner: HookRunner, settings: Settings, *,
                 listen: Listen | None = None, tls: bool = False,
                 surroundings: Surroundings | None = None,
                 wait_for_input: Callable[[float], bool] | None = None) -> None:
        self.runner, self.settings = runner, settings
        self.listen = listen or Listen("", 0)  #: this listener's policy (implicit TLS, submission...)
        self.tls_offered = tls
        self.surroundings = surroundings = surroundings or Surroundings()
        self.counters = surroundings.counters
        # wait_for_input: this session's own, when the surroundings are shared by many.
        self.session = Session(self, connection, settings, surroundings.peers,
                               wait_for_input or surroundings.wait_for_input)
        self.log = self.session.log
        extensions = runner.extensions
        self.protocol = SmtpProtocol(limits_of(settings), mail_parameters=extensions.mail_parameters,
                                     rcpt_parameters=extensions.rcpt_parameters,
            parse=self._parse if extensions.parses else None, lmtp=self.listen.lmtp)
        self.auth = Authentication()
        self.mail = MailTransaction()
        self.tally = Tally()
        self.out = bytearray()  #: replies to write; the driver writes and clears it
        #: How many times ``send`` writes its reply: LMTP answers the end of data once per recipient.
        self.copies = 1
        self._request: Request | Wait | None = None
        self._heard = False  #: the client has sent something
        #: The client ended the session with QUIT (it expects nothing after our 221).
        self.client_quit = False
        #: The protocol trace ([logging] trace, trace_clients), None when this session is not traced.
        self.trace: Trace | None = trace_for(self.session)

    @property
    def me(self) -> str:
        return self.settings.me

    @property
    def in_data(self) -> bool:
        """The message is streaming in (the driver's timeout is the DATA one)."""
        return self.protocol.state is State.DATA

    # -- what the driver calls ----------------------------------------------------
    def open(self) -> None:
        """The client connected: pre_connection, connect, then the greeting (or a refusal)."""
        connection = self.session.connection
        if self.log.isEnabledFor(logging.INFO):
            via = f" via proxy {host_port(connection.proxy_ip, connection.proxy_port)}" if connection.proxy_ip else ""
            self.log.info("connect from %s to %s%s", connection.peer,
                          host_port(connection.local_ip, connection.local_port), via)
        self._judge_client(identify=True)

    def _judge_client(self, identify: bool) -> bool:
        """pre_connection, connect: whether they let the client in (else they answered)."""
        if self.ask("pre_connection").outcome is Outcome.CLOSE:
            return False
        if identify:
            self.surroundings.identify(self.session.connection, self.log)  # remote_host, remote_info, for connect
        if self.ask("connect").outcome in (Outcome.CLOSE, Outcome.ANSWERED):
            return False
        self._greet(self._banner())
        return True

    def _banner(self) -> Reply:
        """The 220 greeting: made once per settings, so its bytes too (``Reply.to_bytes``)."""
        global _last_banner
        if _last_banner[0] is not self.settings:
            text = f"{self.me} {self.settings.banner or f'ESMTP qpgevent {__version__} ready'}"
            _last_banner = (self.settings, reply(220, None, text))
        return _last_banner[1]

    def _greet(self, greeting: Reply) -> None:
        if self.protocol.awaiting_reply:  # the reply to the command that restarted the session
            self.send(greeting)
            return
        self.tally.last_reply = greeting.code  # a client that only read the banner was told 220
        out = self.protocol.greeting(greeting)
        if self.trace is not None:
            self.trace.server(out)
        self.out += out

    def receive(self, data: bytes) -> None:
        """The client's next bytes; ``b""``: it closed its side."""
        self.tally.bytes += len(data)
        if not self._heard and data:
            self._heard = True
            if looks_like_header(data):
                self._untrusted_proxy()
                return
        self.protocol.receive_data(data)

    def next_request(self) -> Request | Wait:
        """Handle every command the input holds, until the driver has something to do.

        After ``EVENTS_PER_TURN`` events in one call, a ``Wait(0)``: a client that pipelines
        without end must not keep its worker from the other sessions."""
        protocol = self.protocol
        handled = 0
        while True:
            if self._request is not None:
                request, self._request = self._request, None
                return request
            if protocol.state is State.CLOSED:
                return CLOSE
            if len(self.out) > READ_SIZE:
                return FLUSH
            if handled == EVENTS_PER_TURN:
                return OTHERS_TURN
            handled += 1
            event = protocol.next_event()
            if event is NEED_DATA:
                self.tally.doing = "DATA (receiving)" if protocol.state is State.DATA else "waiting"
                return READ
            if event is CONNECTION_CLOSED:
                if self.trace is not None:
                    self.trace.closed()
                if protocol.state is State.DATA:
                    self.log.info("client vanished during DATA; message dropped")
                return CLOSE
            self.tally.doing = event  # described when the scoreboard asks (Tally.status)
            if self.trace is not None:
                self.trace.client(event)
            part, handler = _HANDLERS[type(event)]
            if part:  # the parts are handed the conversation: they keep no reference to it
                getattr(getattr(self, part), handler)(self, event)
            else:
                getattr(self, handler)(event)

    def timed_out(self, in_data: bool = False) -> None:
        self.log.info("timeout %s", "in DATA" if in_data else "waiting for a command")
        self.send(Canned.TIMEOUT.with_text(f"{self.me} Timeout, closing connection"))

    def tls_started(self, details: dict[str, Any]) -> None:
        """The handshake is done: a new Connection, everything said before forgotten (RFC 3207 4.2)."""
        self.reset_transaction()
        twin = self.session.connection.clone()
        twin.tls = True
        if twin.notes.pop("auth_user", None) is not None:
            twin.notes.pop("auth_method", None)
            twin.relay_client = False
        twin.hello = twin.hello_host = None
        twin.notes.update(details)
        self.session.connection = twin
        self.log.info("TLS started: %s %s", details.get("tls_version"), details.get("tls_cipher"))
        if self.trace is not None:
            self.trace.note(f"TLS handshake done: {details.get('tls_version')} {details.get('tls_cipher')}")

    def restart(self, client: Connection) -> None:
        """A plugin says ``client`` speaks on this stream now (XCLIENT): the old client's
        session ends for the plugins (disconnect), the new one is judged as at connect (what
        was noted of the old one does not carry over), and their answer, a new 220 or a
        refusal, is the reply to the command; HELO/EHLO must be said again. What STARTTLS
        noted (``tls_*``) stays: the stream is still encrypted."""
        self.reset_transaction()
        self.auth.exchange = None
        self.runner.notify("disconnect", self.session)
        old = self.session.connection
        client.notes.update({key: value for key, value in old.notes.items() if key.startswith("tls_")})
        self.session.connection = client
        self.protocol.restart()
        self._judge_client(identify=False)  # the upstream named the client (XCLIENT NAME)

    def last_words(self, words: Reply) -> bytes:
        """We must go now (server stopping, a kick, or a bug): what to say; queued replies
        dropped, but for the 250 of a message handed off and not yet written (it was
        delivered: a 421 alone would make a duplicate on the retry)."""
        owed = self.mail.owed
        said = owed if owed and owed in self.out else b""
        self.out.clear()
        self.tally.last_reply = words.code  # the summary line tells what the client was told last
        out = said + words.to_bytes()
        if self.trace is not None:
            self.trace.server(out)
        return out

    def end(self) -> None:
        """The dialogue is over: drop the transaction, tell the plugins, log the summary."""
        try:
            self.reset_transaction()
            self.runner.notify("disconnect", self.session)
            if self.log.isEnabledFor(logging.INFO):  # the line is dear to make, and often not kept
                summary = self.tally.summary(self.session, self.protocol.bad_commands)
                self.log.info("disconnect: %s", " ".join(f"{key}={summary_text(value)}" for key, value in summary.items()),
                              extra={"fields": summary})
        finally:
            self.session.detach()  # the session's reference back to us: no cycle outlives the session

    # -- asking the plugins: the one path ------------------------------------------
    def decide(self, hook: str, *args: Any, only: str | None = None) -> Verdict:
        """Run ``hook``'s plugins (``only``: that one); their verdict."""
        return self.runner.run(hook, self.session, *args, only=only)

    def answer(self, hook: str, verdict: Verdict, **fields: str) -> Answer:
        """The reply table's answer to ``verdict``; DONE without a reply is a plugin's bug (451)."""
        result = answer(hook, verdict, me=self.settings.me, **fields)
        if result.outcome is Outcome.ANSWERED and self._awaiting_reply(hook):
            self.log.error("hook=%s plugin=%s returned DONE without answering", hook, verdict.plugin)
            result = answer(hook, Verdict(ReturnCode.DENYSOFT, (), verdict.plugin, True), me=self.me, **fields)
        return result

    def ask(self, hook: str, *args: Any, **fields: str) -> Asked:
        """``decide`` and ``answer`` (inlined: every command passes here); send the reply
        unless the command goes on (then the caller sends it)."""
        verdict = self.runner.run(hook, self.session, *args)
        if verdict is DECLINED_VERDICT:  # no plugin decided (most hooks): the table's answer
            settled = _DECLINED.get(hook)
            if settled is not None:
                if settled.reply is not None and settled.outcome is not Outcome.PROCEED:
                    self.send(settled.reply)
                return settled
        result = answer(hook, verdict, me=self.settings.me, **fields)
        if result.outcome is Outcome.ANSWERED:
            result = self.answer(hook, verdict, **fields)
        if result.reply is not None and result.outcome is not Outcome.PROCEED:
            self.send(result.reply)
        return Asked(result.outcome, result.reply, verdict)

    def _ask_and_send(self, hook: str, *args: Any) -> None:
        asked = self.ask(hook, *args)
        if asked.outcome is Outcome.PROCEED and asked.reply is not None:
            self.send(asked.reply)

    def _awaiting_reply(self, hook: str) -> bool:
        if hook in ("pre_connection", "connect"):
            return not self.out and self.protocol.state is not State.CLOSED
        return self.protocol.awaiting_reply

    def _parse(self, verb: str, argument: str) -> str | Reply:
        """The ``*_parse`` hooks: the argument to parse (a plugin's rewrite), or a refusal."""
        hook = _PARSE_HOOKS[verb]
        if not self.runner.has(hook):
            return argument
        verdict = self.decide(hook, argument)
        result = self.answer(hook, verdict)
        if result.outcome is not Outcome.PROCEED:
            return result.reply or INTERNAL_ERROR
        return verdict.message[0].strip() if verdict.code is OK and verdict.message else argument

    # -- output -------------------------------------------------------------------------
    def send(self, answer_reply: Reply) -> None:
        self.tally.last_reply = answer_reply.code
        out = self.protocol.send(answer_reply) * self.copies
        if self.trace is not None:
            self.trace.server(out)
        self.out += out

    def respond(self, code: int, lines: tuple[str, ...], enhanced: str | None, close: bool) -> None:
        self.send(reply(code, enhanced, *lines, close=close))

    def status(self) -> dict[str, Any]:
        return self.tally.status(self.session, self.protocol.state.value)

    def has_input(self) -> bool:
        return self.protocol.has_input()

    def wait(self, seconds: float) -> None:
        """Pause before what comes next is written (AUTH failures)."""
        self._request = Wait(seconds)

    def _untrusted_proxy(self) -> None:
        """A PROXY header from an address not in ``[proxy] trusted`` (or a second header).

        Most likely a load balancer missing from the list. Answered as SMTP, its "PROXY"
        line would get our 500 as the reply to the real client's EHLO, and the dialogue
        would limp on out of step; so we say what is wrong once, and close.
        """
        ip = self.session.connection.remote_ip
        self.log.warning("PROXY header from %s, which is not in [proxy] trusted; closing with 421", ip)
        text = f"{self.me} PROXY header not accepted from {ip}, closing connection"
        self.send(reply(421, "4.7.0", text, close=True))

    # -- commands ----------------------------------------------------------------
    def on_rejected(self, event: Rejected) -> None:
        self.auth.exchange = None  # a refused line ends any AUTH exchange (the protocol left it too)
        self.log.info("refused %r: %s", redact(event.line[:80]), event.reply.code)
        verb = event.line.split(" ", 1)[0].upper()
        if verb == "RCPT":
            self.tally.refused += 1
            self.counters.recipient(False)
        self.counters.rejected(verb.lower() if verb in _VERBS else "command", "core", str(event.reply.code))
        self.send(event.reply)

    def on_hello(self, command: Helo | Ehlo) -> None:
        # LHLO (LMTP) asks the ehlo hooks and answers as EHLO does; interned: each session keeps it.
        verb = sys.intern(command.verb.lower())
        if self.ask("ehlo" if verb == "lhlo" else verb, command.domain).outcome is not Outcome.PROCEED:
            return
        self.reset_transaction()  # RFC 5321 4.1.4: a new HELO/EHLO is like RSET, plus a new greeting
        connection = self.session.connection
        connection.hello, connection.hello_host = verb, command.domain
        first = f"{self.me} Hi {connection.remote_host or 'there'} [{connection.remote_ip}]"
        if verb == "helo":
            self.send(reply(250, None, first + "; I am so happy to meet you."))
        else:
            self.send(reply(250, None, first, *offers.ehlo_keywords(self, self.auth.mechanisms(self))))

    def on_starttls(self, command: Starttls) -> None:
        if not self.tls_offered:
            self.send(Canned.TLS_NOT_OFFERED)
        elif self.session.connection.tls:
            self.send(Canned.ALREADY_TLS)
        else:
            self.send(Canned.READY_FOR_TLS)  # the protocol drops pipelined plaintext here
            self._request = START_TLS

    def on_auth(self, command: Auth) -> None:
        self.auth.begin(self, command.mechanism, command.initial)

    def on_auth_response(self, event: AuthResponse) -> None:
        self.auth.respond(self, event.data)

    def on_rset(self, command: Rset) -> None:
        self.decide("rset")  # a notification: RFC 5321 4.1.1.5 wants 250 whatever plugins think
        self.reset_transaction()
        self.send(Canned.OK)

    def on_simple(self, command: Command) -> None:
        self._ask_and_send(command.verb.lower(), command.argument)  # NOOP, VRFY

    def on_help(self, command: Help) -> None:
        """The ``help`` hook first; when every plugin declines, the core's per-verb help."""
        verdict = self.decide("help", command.argument)
        if verdict.code is not ReturnCode.DECLINED or verdict.message or verdict.internal_error:
            result = self.answer("help", verdict)
            if result.reply is not None:
                self.send(result.reply)
            return
        words = command.argument.split()  # "HELP MAIL FROM": the verb is the first word
        mechanisms = self.auth.mechanisms(self)
        self.send(help_about(words[0], offers.help_texts(self, mechanisms)) if words
                  else verb_list(offers.verbs(self, mechanisms)))

    def on_quit(self, command: Quit) -> None:
        self.client_quit = True
        self._ask_and_send("quit")
        if self.protocol.state is not State.CLOSED:
            self._request = CLOSE  # RFC 5321 4.1.1.10: QUIT ends it, even if a plugin answered (DONE)

    def on_unknown(self, command: Unknown) -> None:
        if command.verb == "EXPN":
            # EXPN is optional (RFC 5321 4.5.1): the core has no lists, the expn hook may.
            if not command.argument.strip():
                self.send(Canned.SYNTAX)
            else:
                self._ask_and_send("expn", command.argument.strip())
        elif command.verb in self.runner.extensions.verbs:
            self._ask_and_send("command", command.verb, command.argument)
        else:
            self._ask_and_send("unrecognized_command", command.verb.lower(), command.argument)

    def reset_transaction(self) -> None:
        """End the transaction in progress, if any (reset_transaction tells the plugins)."""
        if self.session.current_transaction is None:
            return
        self.runner.notify("reset_transaction", self.session)
        transaction = self.session.end_transaction()
        assert transaction is not None
        transaction.close()
        self.mail.refusal = None


def limits_of(settings: Settings) -> Limits:
    """The protocol's limits for ``settings``: made once per settings, not once per session."""
    global _last_limits
    made, limits = _last_limits
    if made is not settings:
        limits = Limits(
            max_command_line=settings.max_command_line, max_text_line=settings.max_text_line,
            max_message_size=settings.max_message_size, max_recipients=settings.max_recipients,
            max_bad_commands=settings.max_bad_commands, max_junk_commands=settings.max_junk_commands,
            allow_bare_lf=settings.allow_bare_lf, nul_bytes=settings.nul_bytes)
        _last_limits = (settings, limits)
    return limits


_last_limits: tuple[Settings | None, Limits] = (None, Limits())  #: the settings limits_of last saw, and theirs
_last_banner: tuple[Settings | None, Reply] = (None, Canned.OK)  #: the settings _banner last saw, and theirs


#: Hook -> what ``ask`` comes to when no plugin decided, where that needs no fields: made once.
_DECLINED = {hook: Asked(settled.outcome, settled.reply, DECLINED_VERDICT) for hook in HOOKS
             if (settled := settled_answer(hook, ReturnCode.DECLINED)) is not None}
#: The hooks that may rewrite (or refuse) a command's argument before it is parsed.
_PARSE_HOOKS = {"HELO": "helo_parse", "EHLO": "ehlo_parse", "LHLO": "ehlo_parse", "MAIL": "mail_parse", "RCPT": "rcpt_parse",
                "AUTH": "auth_parse"}
#: Event type -> (the part of the conversation that handles it, its method): one table per
#: process, not a dict of bound methods per session.
_HANDLERS: dict[type, tuple[str, str]] = {
    Helo: ("", "on_hello"), Ehlo: ("", "on_hello"), Rset: ("", "on_rset"), Noop: ("", "on_simple"),
    Vrfy: ("", "on_simple"), Help: ("", "on_help"), Quit: ("", "on_quit"), Unknown: ("", "on_unknown"),
    Rejected: ("", "on_rejected"), Starttls: ("", "on_starttls"), Auth: ("", "on_auth"),
    AuthResponse: ("", "on_auth_response"), Mail: ("mail", "on_mail"), Rcpt: ("mail", "on_rcpt"),
    Data: ("mail", "on_data"), Bdat: ("mail", "on_bdat"), ChunkEnd: ("mail", "on_chunk_end"), MessageData: ("mail", "on_message_data"), MessageEnd: ("mail", "on_message_end"),
}
#: Verbs the core knows: a refused line's verb is a metric label only if it is one of these.
_VERBS = frozenset({"HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY", "HELP"})

"""The sans-I/O SMTP server protocol (RFC 5321 and the ESMTP extensions we offer).

Rules:
1. This module knows nothing of sockets, gevent, plugins or configuration files. Bytes
   come in through ``receive_data``; events come out of ``next_event``; replies go in
   through ``send`` and come back as bytes to write.
2. All command sequencing lives here. A command that is out of order, malformed or too
   long never reaches the session as a command: it comes out as ``Rejected`` with the
   reply to send, and the state does not move.

Theory of operation. The state (``State``) moves only when the session sends the reply
to the event that is pending: MAIL answered 2xx moves READY to MAIL, DATA answered 354
switches the input framing to the message, any reply to ``MessageEnd`` goes back to
READY, and a reply marked ``close`` ends everything. So the session decides (through
plugins) *whether* a command succeeds, and the protocol decides *what that means* for
the conversation. PIPELINING (RFC 2920) falls out of this: events are taken one at a time
from whatever the client sent, and the session writes the replies out in order when
``next_event`` says it needs more data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .events import (CONNECTION_CLOSED, NEED_DATA, Auth, AuthResponse, Bdat, ChunkEnd, Command, Data, Ehlo,
                     Event, Helo, Help, Mail, MessageData, MessageEnd, Noop, Quit, Rcpt, Rejected, Rset, Starttls, State, Unknown,
                     Vrfy)
from .arguments import parse_auth, parse_auth_response, split_path as _split_path
from . import dsn_request
from .chunking import ChunkReader, parse_bdat
from .reply import Canned, Reply
from .wire import BareLineEnding, CommandFramer, DataReader, LineTooLong


_VERBS: dict[str, type[Command]] = {
    "HELO": Helo, "EHLO": Ehlo, "MAIL": Mail, "RCPT": Rcpt, "DATA": Data, "RSET": Rset,
    "NOOP": Noop, "QUIT": Quit, "VRFY": Vrfy, "HELP": Help, "STARTTLS": Starttls, "AUTH": Auth,
    "BDAT": Bdat,
}
#: The commands whose argument the ``parse`` callback may rewrite (the ``*_parse`` hooks).
_HOOKED = (Helo, Ehlo, Mail, Rcpt, Auth)
#: RFC 4954 4: an AUTH command line, and each line answering a 334, may be 12288 octets.
AUTH_LINE_MAX = 12288
_MAIL_ARG = re.compile(r"FROM:\s*", re.IGNORECASE)
_RCPT_ARG = re.compile(r"TO:\s*", re.IGNORECASE)
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 5321 4.1.2 esmtp-keyword
_VERB = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,19}$")
#: RFC 5321 2.2.2 / 4.1.4: these errors are the client's fault and count against it.
_SYNTAX_CODES = frozenset({500, 501, 502, 503, 504, 555})
#: Commands that move nothing forward: a flood of them is counted as errors past a budget.
_JUNK = (Noop, Rset, Vrfy, Help)


@dataclass(frozen=True, slots=True)
class Limits:
    max_command_line: int = 512
    max_text_line: int = 1000
    max_message_size: int = 0  #: 0: no limit
    max_recipients: int = 0  #: 0: no limit
    max_bad_commands: int = 20  #: syntax and sequence errors before 421
    #: NOOP, RSET, VRFY and HELP past this many since the last message are counted as bad
    #: commands too (Postfix's smtpd_junk_command_limit); 0: no limit.
    max_junk_commands: int = 100
    allow_bare_lf: bool = False
    nul_bytes: str = "reject"  #: NULs in message text: reject, strip or accept (wire.DataReader)


#: Limits in use -> themselves: sessions with equal limits share one object.
_LIMITS: dict[Limits, Limits] = {}
_NONE: Mapping[str, "ParameterSyntax"] = {}  #: no parameters declared (shared, never written)


def _shared(limits: Limits) -> Limits:
    """The one ``Limits`` object equal to ``limits`` (a frozen value: sharing it is safe)."""
    if len(_LIMITS) > 64:  # settings reloaded many times over: forget the old ones
        _LIMITS.clear()
    return _LIMITS.setdefault(limits, limits)


#: A parameter's value syntax (matched whole), or None: the keyword takes no value.
ParameterSyntax = re.Pattern[str] | None
#: Rewrites a command's argument before it is parsed (the ``*_parse`` hooks): the new
#: argument, or the reply that refuses the command.
ArgumentHook = Callable[[str, str], "str | Reply"]


class SmtpProtocol:
    """One SMTP conversation, server side, as a state machine over bytes.

    ``mail_parameters`` / ``rcpt_parameters``: the MAIL/RCPT parameters plugins declared,
    beyond the core's, with their syntax; any other still gets 555. ``parse``: called as
    ``parse(verb, argument)`` for HELO, EHLO, MAIL, RCPT and AUTH once they are in
    sequence, before their argument is parsed.

    Slotted, and its limits shared by every session with the same ones (``_shared``):
    an idle session's bytes are mostly its objects (docs/benchmarks.md, "idle").
    """

    __slots__ = ("limits", "lmtp", "_mail_parameters", "_rcpt_parameters", "_argument_hook", "state", "esmtp",
                 "smtputf8", "bad_commands", "junk_commands", "recipients_tried", "recipients_accepted",
                 "authenticated", "_framer", "_in_auth", "_data", "binarymime", "_chunk", "_chunked",
                 "_chunk_problem", "_pending", "_end_ready", "_eof")

    def __init__(self, limits: Limits = Limits(), *,
                 mail_parameters: Mapping[str, ParameterSyntax] | None = None,
                 rcpt_parameters: Mapping[str, ParameterSyntax] | None = None,
                 parse: ArgumentHook | None = None, lmtp: bool = False) -> None:
        self.limits = limits = _shared(limits)
        self.lmtp = lmtp  #: LMTP (RFC 2033): LHLO is the greeting verb; HELO and EHLO are unknown
        self._mail_parameters: Mapping[str, ParameterSyntax] = mail_parameters or _NONE
        self._rcpt_parameters: Mapping[str, ParameterSyntax] = rcpt_parameters or _NONE
        self._argument_hook = parse
        self.state = State.NEED_HELLO
        self.esmtp = False  #: the client said EHLO, so extensions are on
        self.smtputf8 = False  #: the current transaction asked for SMTPUTF8
        self.bad_commands = 0
        self.junk_commands = 0  #: NOOP, RSET, VRFY, HELP since the last message (Limits.max_junk_commands)
        self.recipients_tried = 0
        self.recipients_accepted = 0
        self.authenticated = False  #: an AUTH exchange ended in 235 (RFC 4954 4: once only)
        # The framer lets AUTH-sized lines through; _parse holds other verbs to their limit.
        self._framer = CommandFramer(max(limits.max_command_line, AUTH_LINE_MAX))
        self._in_auth = False  #: we sent 334: the next line is a SASL response, not a command
        self._data: DataReader | None = None
        self.binarymime = False  #: the current transaction said BODY=BINARYMIME (BDAT only)
        self._chunk: ChunkReader | None = None  #: a BDAT chunk's octets are being read
        self._chunked = 0  #: octets of this transaction's message received by BDAT
        self._chunk_problem: Reply | None = None  #: the BDAT message went past the size limit
        self._pending: Event | None = None
        self._end_ready: MessageEnd | None = None
        self._eof = False

    # -- input -------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if data:
            self._framer.feed(data)
        else:
            self._eof = True

    def has_input(self) -> bool:
        """Whether bytes the client sent are waiting to be read as commands."""
        return bool(self._framer.buffer)

    def discard_input(self) -> None:
        """Forget buffered input (after STARTTLS, pipelined plaintext must not count)."""
        self._framer.take_rest()
        self._framer = CommandFramer(self._framer.max_line)  # no half-discarded line survives

    def next_event(self) -> Event:
        if self.state is State.CLOSED:
            return CONNECTION_CLOSED
        if self._pending is not None:
            raise RuntimeError(f"reply to {self._pending!r} first")
        if self._end_ready is not None:
            self._pending, self._end_ready = self._end_ready, None
            return self._pending
        if self._data is not None:
            return self._next_data_event()
        if self._chunk is not None:
            return self._next_chunk_event()
        line = self._framer.next_line()
        if line is None:
            return CONNECTION_CLOSED if self._eof else NEED_DATA
        event = self._parse_auth_response(line) if self._in_auth else self._parse(line)
        if event is None:  # a refused BDAT: its octets first, then the refusal
            return self._next_chunk_event()
        self._pending = event
        return event

    def start_chunk(self, command: Bdat) -> None:
        """The session takes the pending BDAT: read its octets as message data.

        Past ``max_message_size`` (counted over all the chunks) the octets are read and
        dropped, and the chunk's end carries the 552 (RFC 3030 4.2, RFC 1870). If the
        command was answered already (a plugin sent its own reply), the octets are
        read and dropped, and nothing more is said.
        """
        if self._pending is not command:
            return  # answered already: send() set its octets to be read and dropped
        pending, self._pending = command, None
        limit = self.limits.max_message_size
        self._chunked += pending.size
        if limit and self._chunked > limit:
            self._chunk_problem = Canned.TOO_BIG
        self.state = State.DATA
        self._chunk = ChunkReader(pending.size, 0 if self._chunk_problem else pending.size, pending)

    def _next_chunk_event(self) -> Event:
        chunk = self._chunk
        assert chunk is not None
        if not chunk.done:
            piece = chunk.take(self._framer.buffer)
            if piece:
                return MessageData(piece)
            if not chunk.done:
                return CONNECTION_CLOSED if self._eof else NEED_DATA
        self._chunk = None
        end = chunk.then
        if end is None:  # answered before its octets came: nothing more to say
            return self.next_event()
        if isinstance(end, Bdat):
            problem = self._chunk_problem
            end = MessageEnd(self._chunked, problem) if end.last else ChunkEnd(end.size, self._chunked, problem)
        assert isinstance(end, (MessageEnd, ChunkEnd, Rejected))
        self._pending = end
        return end

    def _next_data_event(self) -> Event:
        assert self._data is not None
        chunk = self._framer.take_rest()
        if not chunk:
            return CONNECTION_CLOSED if self._eof else NEED_DATA
        message, rest = self._data.feed(chunk)
        if rest is None:
            if message:
                return MessageData(message)
            return CONNECTION_CLOSED if self._eof else NEED_DATA
        self._framer.feed(rest)  # pipelined commands after the final dot
        end = self._finish_message()
        if message:
            self._end_ready = end  # hand out the last piece first, the end next
            return MessageData(message)
        self._pending = end
        return end

    def _finish_message(self) -> MessageEnd:
        assert self._data is not None
        reader, self._data = self._data, None
        problems = reader.problems
        problem = None
        if problems.too_big:
            problem = Canned.TOO_BIG
        elif problems.bare_line_ending:
            problem = Canned.BARE_LINE_ENDING
        elif problems.line_too_long:
            problem = Canned.TEXT_LINE_TOO_LONG
        elif problems.nul_byte:
            problem = Canned.NUL_IN_TEXT
        return MessageEnd(reader.size, problem)

    # -- output ------------------------------------------------------------
    @property
    def awaiting_reply(self) -> bool:
        """An event was handed out and has not been answered yet."""
        return self._pending is not None

    def send(self, reply: Reply) -> bytes:
        """Bytes for ``reply`` to the pending event, after moving the state."""
        pending, self._pending = self._pending, None
        out = reply.to_bytes(enhanced_codes=True)
        if reply.close or reply.code == 421:
            self.state = State.CLOSED
            return out
        if isinstance(pending, Rejected) and pending.reply is Canned.BAD_BDAT:
            self.state = State.CLOSED  # the chunk's octets would be read as commands
            return out + Canned.BDAT_LOST.to_bytes()
        if isinstance(pending, Rejected) or isinstance(pending, Command):
            bad = reply.code in _SYNTAX_CODES
            if isinstance(pending, _JUNK) and self.limits.max_junk_commands:
                self.junk_commands += 1
                bad = bad or self.junk_commands > self.limits.max_junk_commands
            if bad:
                self.bad_commands += 1
                if self.limits.max_bad_commands and self.bad_commands >= self.limits.max_bad_commands:
                    self.state = State.CLOSED
                    return out + Canned.TOO_MANY_ERRORS.to_bytes()
        if isinstance(pending, (Auth, AuthResponse)):
            # 334 asks for another line; anything else ends the exchange (RFC 4954 4).
            self._in_auth = reply.code == 334
            self.authenticated = self.authenticated or reply.code == 235
        if isinstance(pending, Bdat):  # answered, not started: its octets are still read, and dropped
            self._chunk = ChunkReader(pending.size, 0)
        if isinstance(pending, Command):
            self._transition(pending, reply)
        elif isinstance(pending, MessageEnd):
            self._reset_transaction()
            if reply.code == 250:
                self.junk_commands = 0  # a client that delivers mail is no flooder
        elif isinstance(pending, ChunkEnd):
            self.state = State.BDAT  # whatever the reply: more chunks, RSET, or a new EHLO
        return out

    def greeting(self, reply: Reply) -> bytes:
        """Bytes of the 220 banner (no enhanced code: RFC 2034 excludes the greeting)."""
        out = reply.to_bytes(enhanced_codes=False)
        if reply.close or reply.code == 421:
            self.state = State.CLOSED
        return out

    def _transition(self, command: Command, reply: Reply) -> None:
        ok = reply.is_positive
        if isinstance(command, (Helo, Ehlo)) and ok:
            self._reset_transaction()
            self.state = State.READY
            self.esmtp = isinstance(command, Ehlo)
        elif isinstance(command, Mail) and ok:
            self.state = State.MAIL
            self.smtputf8 = "SMTPUTF8" in command.params
            self.binarymime = (command.params.get("BODY") or "").upper() == "BINARYMIME"
        elif isinstance(command, Rcpt):
            self.recipients_tried += 1
            if ok:
                self.recipients_accepted += 1
                self.state = State.RCPT
        elif isinstance(command, Data):
            if reply.code == 354:
                self.state = State.DATA
                self._data = DataReader(self.limits.max_message_size, self.limits.max_text_line,
                                        self.limits.allow_bare_lf, self.limits.nul_bytes)
            else:
                self._reset_transaction()
        elif isinstance(command, Rset):
            self._reset_transaction()
        elif isinstance(command, Starttls) and reply.code == 220:
            # RFC 3207 4.2: forget everything learnt before TLS, EHLO again; and drop any
            # input the client pipelined after STARTTLS, which came in plaintext and must
            # not be taken as said inside TLS (CVE-2011-0411).
            self.discard_input()
            self._reset_transaction()
            self.state = State.NEED_HELLO
            self.esmtp = self.authenticated = self._in_auth = False

    def restart(self) -> None:
        """A new session on the same stream (XCLIENT): the client must say HELO/EHLO again."""
        self._reset_transaction()
        self.state = State.NEED_HELLO
        self.esmtp = self.authenticated = self._in_auth = False

    def _reset_transaction(self) -> None:
        self.state = State.NEED_HELLO if self.state is State.NEED_HELLO else State.READY
        self.smtputf8 = self.binarymime = False
        self.recipients_tried = self.recipients_accepted = self._chunked = 0
        self._chunk_problem = None

    # -- parsing -----------------------------------------------------------
    def _parse(self, raw: bytes | LineTooLong | BareLineEnding) -> Command | Rejected | None:
        if isinstance(raw, LineTooLong):
            return Rejected(Canned.COMMAND_TOO_LONG)
        if isinstance(raw, BareLineEnding):
            return Rejected(Canned.BARE_LF_IN_COMMAND)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return Rejected(Canned.NOT_UTF8)
        verb, _, argument = line.strip(" ").partition(" ")
        argument = argument.strip(" ")
        if len(raw) + 2 > self.limits.max_command_line and verb.upper() != "AUTH":
            return Rejected(Canned.COMMAND_TOO_LONG)  # only AUTH may be longer (RFC 4954 4)
        if not _VERB.match(verb):
            return Unknown(verb.upper()[:20], argument, line)
        verb = verb.upper()
        kind = _VERBS.get(verb)
        if self.lmtp and verb in ("HELO", "EHLO", "LHLO"):
            kind = Ehlo if verb == "LHLO" else None  # RFC 2033 4.1: LHLO, and HELO/EHLO are 500
        if kind is None:
            return Unknown(verb, argument, line)
        if kind is Bdat:
            return self._parse_bdat(verb, argument, line)
        problem = self._out_of_order(kind, argument)
        if problem is not None:
            return Rejected(problem, line)
        if self._argument_hook is not None and kind in _HOOKED:
            rewritten = self._argument_hook(verb, argument)
            if isinstance(rewritten, Reply):
                return Rejected(rewritten, line)
            argument = rewritten
        if kind in (Helo, Ehlo):
            if not argument:
                return Rejected(Canned.HELO_NEEDS_DOMAIN, line)
            return kind(verb, argument, line, domain=argument.split(" ")[0])
        if kind is Mail or kind is Rcpt:
            return self._parse_path_command(kind, verb, argument, line)
        if kind is Auth:
            return parse_auth(verb, argument, line)
        return kind(verb, argument, line)

    def _parse_bdat(self, verb: str, argument: str, line: str) -> Bdat | Rejected | None:
        """A BDAT in sequence, or None: refused, its octets to be read before the refusal."""
        parsed = parse_bdat(argument)
        if parsed is None:
            return Rejected(Canned.BAD_BDAT, line)
        size, last = parsed
        problem = self._out_of_order(Bdat, argument)
        if problem is not None:
            self._chunk = ChunkReader(size, 0, Rejected(problem, line))
            return None
        return Bdat(verb, argument, line, size=size, last=last)

    def _parse_auth_response(self, raw: bytes | LineTooLong | BareLineEnding) -> AuthResponse | Rejected:
        self._in_auth = False  # a Rejected ends the exchange; send() re-enters on 334
        return parse_auth_response(raw)

    def _out_of_order(self, kind: type[Command], argument: str) -> Reply | None:
        state = self.state
        if kind is Mail:
            if state is State.NEED_HELLO:
                return Canned.SAY_HELLO_FIRST
            if state in (State.MAIL, State.RCPT, State.BDAT):
                return Canned.NESTED_MAIL  # RFC 5321 4.1.1.2: no MAIL inside a transaction
        elif kind is Rcpt:
            if state is State.NEED_HELLO:
                return Canned.SAY_HELLO_FIRST
            if state is State.READY:
                return Canned.MAIL_FIRST
            if state is State.BDAT:
                return Canned.RCPT_AFTER_BDAT
            if self.limits.max_recipients and self.recipients_accepted >= self.limits.max_recipients:
                return Canned.TOO_MANY_RECIPIENTS
        elif kind is Data or kind is Bdat:
            if kind is Data and argument:
                return Canned.NO_ARGUMENTS
            if state in (State.NEED_HELLO, State.READY):
                return Canned.MAIL_FIRST
            if kind is Data and state is State.BDAT:
                return Canned.DATA_AFTER_BDAT  # RFC 3030 2: no mixing in one transaction
            if kind is Data and self.binarymime:
                return Canned.BINARYMIME_NEEDS_BDAT  # RFC 3030 3
            if state is State.MAIL:
                # RFC 2920 3.1: recipients were tried and all refused: 554, not 503.
                return Canned.NO_VALID_RECIPIENTS if self.recipients_tried else Canned.RCPT_FIRST
        elif kind in (Rset, Quit) and argument:
            return Canned.NO_ARGUMENTS
        elif kind is Vrfy and not argument:
            return Canned.SYNTAX
        elif kind is Starttls:
            if argument:
                return Canned.NO_ARGUMENTS  # RFC 3207 4: no parameters
            if not self.esmtp or state is State.NEED_HELLO:
                return Canned.SAY_EHLO_FIRST
            if state is not State.READY:
                return Canned.NOT_IN_TRANSACTION
        elif kind is Auth:
            if not self.esmtp or state is State.NEED_HELLO:
                return Canned.SAY_EHLO_FIRST  # AUTH is an ESMTP extension: EHLO first
            if self.authenticated:
                return Canned.ALREADY_AUTHENTICATED  # RFC 4954 4: one successful AUTH only
            if state is not State.READY:
                return Canned.NOT_IN_TRANSACTION  # RFC 4954 4: not during a mail transaction
        return None

    def _parse_path_command(self, kind: type[Mail] | type[Rcpt], verb: str, argument: str,
                            line: str) -> Command | Rejected:
        prefix = (_MAIL_ARG if kind is Mail else _RCPT_ARG).match(argument)
        if prefix is None:
            return Rejected(Canned.SYNTAX, line)
        path, words = _split_path(argument[prefix.end():])
        if not path:
            return Rejected(Canned.SYNTAX, line)
        params: dict[str, str | None] = {}
        for word in words:
            key, eq, value = word.partition("=")
            if not _KEYWORD.match(key) or key.upper() in params or (eq and not value):
                return Rejected(Canned.SYNTAX, line)
            params[key.upper()] = value if eq else None
        problem = self._check_params(kind, params)
        if problem is not None:
            return Rejected(problem, line)
        return kind(verb, argument, line, path=path, params=params)

    def _check_params(self, kind: type[Command], params: dict[str, str | None]) -> Reply | None:
        if params and not self.esmtp:
            return Canned.UNKNOWN_PARAMETER  # RFC 1869 6: parameters need EHLO
        for key, value in params.items():
            if kind is Mail and key == "SIZE":
                # RFC 1870 3: size-value is 1*20 ASCII DIGIT; str.isdigit() alone also
                # takes "²", on which int() raises.
                if value is None or not (value.isascii() and value.isdigit()):
                    return Canned.BAD_SIZE
                limit = self.limits.max_message_size
                if limit and int(value) > limit:
                    return Canned.TOO_BIG  # RFC 1870 6.1: refuse early
            elif kind is Mail and key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                    return Canned.BAD_BODY
            elif kind is Mail and key == "SMTPUTF8":
                if value is not None:
                    return Canned.SYNTAX
            elif kind is Mail and key == "REQUIRETLS":
                if value is not None:  # RFC 8689 4: a bare keyword; whether TLS is on is the engine's
                    return Canned.SYNTAX
            elif kind is Mail and key == "AUTH":
                if not value:  # RFC 4954 5: AUTH=<mailbox> or AUTH=<>, an xtext; kept, not trusted
                    return Canned.SYNTAX
            elif key in (dsn_request.MAIL if kind is Mail else dsn_request.RCPT):
                why = dsn_request.problem(key, value)  # RFC 3461 4: 501 5.5.4 for a bad one
                if why is not None:
                    return Canned.SYNTAX.with_text(why)
            elif key not in (declared := self._mail_parameters if kind is Mail else self._rcpt_parameters):
                return Canned.UNKNOWN_PARAMETER  # RFC 5321 4.1.1.11
            else:  # a plugin's: its declared syntax, matched whole
                syntax = declared[key]
                if (value is not None) if syntax is None else (value is None or not syntax.fullmatch(value)):
                    return Canned.SYNTAX
        return None


__all__ = ["SmtpProtocol", "Limits", "AUTH_LINE_MAX", "ParameterSyntax", "ArgumentHook",
           # the events, made here and defined in .events (importable from either)
           "State", "Command", "Helo", "Ehlo", "Mail", "Rcpt", "Data", "Bdat", "Rset", "Noop", "Quit", "Vrfy", "Help",
           "Starttls", "Auth", "AuthResponse", "Unknown", "Rejected", "MessageData", "MessageEnd", "ChunkEnd",
           "NEED_DATA",
           "CONNECTION_CLOSED", "Event"]

"""The ``Session`` plugins receive as their first argument, and the per-connection tallies.

One per connection. What a plugin may read and do, typed: ``connection`` (who is talking,
its ``notes``), ``transaction`` (the current one, started on first use, as in qpsmtpd),
``respond`` (answer the client yourself, then return DONE), ``challenge`` and
``auth_step`` (a SASL exchange of several steps, at ``auth_sasl``), ``rewrite_sender`` and
``rewrite_recipient`` (at ``mail_pre`` / ``rcpt_pre``: fix up the path the client wrote),
``concurrent_connections`` and ``wait_for_input``. Everything else of the dialogue lives
in the conversation (``qpgevent.engine.conversation``), out of plugins' reach.
"""

from __future__ import annotations

import logging
import os
import re
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from ..config import Settings
from ..connection import Connection
from ..core.codes import ReturnCode
from ..core.protocol import AuthResponse, ChunkEnd, Command, MessageData, MessageEnd, Rejected
from ..transaction import Transaction

log = logging.getLogger("qpgevent.session")
#: What a hook returns: DECLINED (or None), a return code, or (code, message) with the
#: message a string or a list of lines.
HookResult = ReturnCode | tuple[ReturnCode, str | list[str] | tuple[str, ...]] | None


def session_ids(session: Any) -> dict[str, str]:
    """The ids a log line of ``session`` carries: ``conn``, and ``txn`` inside a transaction."""
    ids = {"conn": session.connection.id}
    transaction = session.current_transaction
    if transaction is not None:
        ids["txn"] = transaction.id
    return ids


class SessionLogger(logging.LoggerAdapter[logging.Logger]):
    """Attaches ``conn=<id>`` (and ``txn=<id>`` inside a transaction) to every record."""

    def __init__(self, logger: logging.Logger, session: Any) -> None:
        super().__init__(logger, _NO_EXTRA)  # shared: process() makes each record's extra
        self.session = session

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**session_ids(self.session), **(kwargs.get("extra") or {})}
        return msg, kwargs


_NO_EXTRA: dict[str, Any] = {}  #: SessionLogger's ``extra``, never read nor written
_AUTH = re.compile(r"(?i)^(\s*AUTH\s+\S+)(\s+\S.*)?$")


def redact(line: str) -> str:
    """A command line fit for a log: ``AUTH PLAIN <secret>`` becomes ``AUTH PLAIN ***``.

    The AUTH mechanism stays (it helps), its initial response goes (RFC 4954 4: it holds
    the credentials, base64 is no protection). Lines sent in answer to a 334 challenge
    are all secret: the code that reads them must not log them at all.
    """
    match = _AUTH.match(line)
    if match is None:
        return line
    return match.group(1) + (" ***" if match.group(2) else "")


class Speaker(Protocol):
    """What the session asks of its conversation (``Conversation`` is the one)."""

    def respond(self, code: int, lines: tuple[str, ...], enhanced: str | None, close: bool) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def has_input(self) -> bool: ...

    def restart(self, client: Connection) -> None: ...


class Session:
    """What a hook gets as ``session``: this connection, its transaction, ways to answer."""

    # Slotted (idle sessions by the thousand); what a plugin keeps goes in ``notes``.
    __slots__ = ("connection", "settings", "log", "hook_running", "_conversation", "_transaction", "_peers",
                 "_wait_for_input", "_rewritten", "_rewriting", "auth_step", "auth_challenge", "__weakref__")

    def __init__(self, conversation: Speaker, connection: Connection, settings: Settings,
                 peers: Callable[[str], int], wait_for_input: Callable[[float], bool] | None) -> None:
        self.connection: Connection = connection  #: a new one after STARTTLS (RFC 3207 4.2)
        self.settings: Settings = settings
        self.log: SessionLogger = SessionLogger(log, weakref.proxy(self))  # weak: no cycle through the logger
        #: "hook (plugin)" while a plugin runs (the live scoreboard shows it)
        self.hook_running: str | None = None
        # The conversation holds the session and the session its conversation: a cycle, which
        # the conversation's ``end`` breaks (``detach``) so that every object of the connection
        # is freed at once, not by the garbage collector. Not a weak reference: the compiled
        # build's Conversation (a mypyc class) cannot be weakly referenced.
        self._conversation: Speaker | None = conversation
        self._transaction: Transaction | None = None
        self._peers = peers
        self._wait_for_input = wait_for_input
        self._rewritten: str | None = None  #: the path a *_pre hook asked for (rewrite_sender)
        self._rewriting: str | None = None  #: "mail_pre" or "rcpt_pre" while they run
        #: At ``auth_sasl``: 0 for an AUTH's first response, n for the answer to our n-th challenge.
        self.auth_step = 0
        self.auth_challenge: bytes | None = None  #: what ``challenge`` asked to send (the engine takes it)

    @property
    def me(self) -> str:
        """This server's name ([server] me)."""
        return self.settings.me

    @property
    def notes(self) -> dict[str, Any]:
        """The connection's notes (``connection.notes``)."""
        return self.connection.notes

    @property
    def transaction(self) -> Transaction:
        """The current transaction, started on first use (as in qpsmtpd, never None)."""
        if self._transaction is None:
            self._transaction = Transaction(self.settings.spool_dir, self.settings.size_threshold,
                                            connection_id=self.connection.id,
                                            max_header_size=self.settings.max_header_size,
                                            max_received=self.settings.max_received)
        return self._transaction

    @property
    def current_transaction(self) -> Transaction | None:
        """The transaction if one is open, without starting one."""
        return self._transaction

    def end_transaction(self) -> Transaction | None:
        """Forget the transaction (the conversation's to call); the one that was open."""
        transaction, self._transaction = self._transaction, None
        return transaction

    def respond(self, code: int, *lines: str, enhanced: str | None = None, close: bool = False) -> None:
        """Answer the client directly (a plugin that returns DONE has called this)."""
        self._speaker().respond(code, lines, enhanced, close)

    def challenge(self, data: bytes) -> ReturnCode:
        """At ``auth_sasl``: send the client ``data`` as a SASL challenge (334, base64) and be asked
        again with its answer (``auth_step`` one higher); ``return session.challenge(...)``."""
        self.auth_challenge = data
        return ReturnCode.DONE

    def restart(self, client: Connection) -> None:
        """From the ``command`` hook: ``client`` (``connection.successor(...)``) speaks on this
        stream now, as after Postfix's XCLIENT. The old client's session ends for the plugins
        (the disconnect hook), the new one is judged as at connect (pre_connection, connect);
        their answer, a new 220 or a refusal, is the reply (return DONE), and the client must
        say HELO/EHLO again."""
        self._speaker().restart(client)

    def rewrite_sender(self, path: str) -> None:
        """At ``mail_pre``: take ``path`` ("<a@b>") instead of what the client wrote."""
        self._rewrite("mail_pre", path)

    def rewrite_recipient(self, path: str) -> None:
        """At ``rcpt_pre``: take ``path`` instead of what the client wrote."""
        self._rewrite("rcpt_pre", path)

    def _rewrite(self, hook: str, path: str) -> None:
        if self._rewriting != hook:
            raise RuntimeError(f"rewrite_{'sender' if hook == 'mail_pre' else 'recipient'}() "
                               f"is for the {hook} hook only")
        self._rewritten = path.strip()

    def concurrent_connections(self, ip: str | None = None) -> int:
        """Sessions open now from ``ip`` (default: this client's), this one included."""
        return self._peers(ip or self.connection.remote_ip)

    def wait_for_input(self, seconds: float) -> bool:
        """Whether the client sends something within ``seconds`` (earlytalker). Without a
        socket (the harness, a dry run), whether it has sent something already."""
        if self._wait_for_input is None:
            return self._speaker().has_input()
        return self._wait_for_input(seconds)

    def status(self) -> dict[str, Any]:
        """This session's row on the live scoreboard (``qpgevent.scoreboard``)."""
        return self._speaker().status()

    def detach(self) -> None:
        """The conversation is over (its ``end``): let go of it, which breaks the cycle."""
        self._conversation = None

    def _speaker(self) -> Speaker:
        conversation = self._conversation
        if conversation is None:
            raise RuntimeError("this session's conversation is over")
        return conversation


class Tally:
    """What one connection did, for the summary line and the scoreboard."""

    __slots__ = ("transactions", "accepted", "refused", "messages", "bytes", "last_reply", "doing",
                 "started", "started_at")

    def __init__(self) -> None:
        self.transactions = self.accepted = self.refused = self.messages = self.bytes = self.last_reply = 0
        #: The command in progress (an event, described when asked), or "waiting".
        self.doing: object = "connect"
        self.started = time.monotonic()
        self.started_at = time.time()  #: wall clock: the scoreboard is read by other processes

    def summary(self, session: Session, bad_commands: int) -> dict[str, Any]:
        """The one line per connection (Haraka's lesson): who, what, how it ended."""
        connection = session.connection
        return {"ip": connection.remote_ip, "rdns": connection.remote_host, "helo": connection.hello_host,
                "tls": connection.tls, "auth": connection.notes.get("auth_user"),
                "transactions": self.transactions, "rcpts_accepted": self.accepted,
                "rcpts_rejected": self.refused, "messages": self.messages, "bytes": self.bytes,
                "bad_commands": bad_commands,
                "seconds": round(time.monotonic() - self.started, 3), "last_reply": self.last_reply}

    def status(self, session: Session, state: str) -> dict[str, Any]:
        connection, transaction = session.connection, session.current_transaction
        sender = transaction.sender if transaction is not None else None
        return {"id": connection.id, "pid": os.getpid(), "remote_ip": connection.remote_ip,
                "remote_port": connection.remote_port, "rdns": connection.remote_host,
                "helo": connection.hello_host, "tls": connection.tls, "auth": connection.notes.get("auth_user"),
                "state": state,
                "doing": session.hook_running or (self.doing if isinstance(self.doing, str) else describe(self.doing)),
                "sender": sender.format() if sender is not None else None,
                "recipients": len(transaction.recipients) if transaction is not None else 0,
                "transactions": self.transactions, "messages": self.messages, "bytes": self.bytes,
                "started": self.started_at}


def summary_text(value: Any) -> str:
    """A summary value in the text log: '-' for none, yes/no, quoted when it has spaces."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    return repr(text) if any(c.isspace() or not c.isprintable() for c in text) else text


def describe(event: object) -> str:
    """What the scoreboard shows for an event: the verb alone, never an argument (AUTH)."""
    if isinstance(event, MessageData):
        return "DATA (receiving)"
    if isinstance(event, MessageEnd):
        return "DATA (end)"
    if isinstance(event, ChunkEnd):
        return "BDAT (chunk end)"
    if isinstance(event, Rejected):
        return "refused command"
    if isinstance(event, AuthResponse):
        return "AUTH"
    assert isinstance(event, Command)
    verb = event.verb.upper()
    return verb if verb.isascii() and verb.isalpha() and len(verb) <= 12 else "unknown command"

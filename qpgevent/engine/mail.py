"""MAIL, RCPT, DATA and the end of the message: the mail transaction's part of the conversation.

The order of one transaction: ``mail_pre`` (the raw path: a plugin may rewrite it with
``session.rewrite_sender``), the address parser, the submission checks, ``mail`` (the
parsed sender); the same for RCPT with ``rcpt_pre`` and ``rcpt``; then ``data`` (354),
``data_headers_end`` when the header is in (its refusal waits for the final dot), our
Received line (the ``received_line`` hook may give its own), ``data_post``,
``queue_pre`` and ``queue``, whose OK alone makes the 250.

BDAT (RFC 3030) fills the same Transaction by the same road: the first chunk asks
``data`` (its 354 is not sent; a refusal becomes every chunk's reply), each chunk's
octets go in as they arrive, each chunk but the LAST gets its own 250 (or the
refusal), and the LAST one ends the message exactly as the final dot does.

Rewriting a path by returning ``(OK, "<new@path>")`` from a ``*_pre`` hook is the old,
implicit form (qpsmtpd's): it still works, and logs a deprecation warning once per
plugin; ``session.rewrite_sender`` / ``rewrite_recipient`` say it outright.

On an LMTP listener (RFC 2033 4.2) the end of the message gets one reply per accepted
recipient, in RCPT order: a refusal before or at ``queue`` is repeated for each; after
``queue`` said OK, a recipient a queue plugin marked in
``transaction.notes["recipient_results"]`` (address -> ``(code, message)``) gets that
verdict, answered by the same reply table, and every other one the plugin's OK. That
dict is put there only on LMTP listeners: on SMTP a recipient left undelivered under a
250 would be lost.
"""

from __future__ import annotations

import dataclasses


from ..core import authresults, dsn_request
from ..core.address import Address, AddressError
from ..core.codes import OK, ReturnCode, Verdict
from ..core.protocol import Bdat, ChunkEnd, Data, Mail, MessageData, MessageEnd, Rcpt, State
from ..core.reply import INTERNAL_ERROR, Canned, Outcome, Reply, reply
from .dialogue import Asked, Dialogue
from .received import received_line
from .session import Session


def _with_dsn(recipient: Address, params: dict[str, str | None]) -> Address:
    """The recipient with RCPT's NOTIFY and ORCPT (RFC 3461 4.1, 4.2), when the client gave them."""
    notify, orcpt = params.get("NOTIFY"), params.get("ORCPT")
    if not notify and not orcpt:
        return recipient
    return dataclasses.replace(recipient, notify=dsn_request.notify_of(notify) if notify else None,
                               orcpt=dsn_request.orcpt_of(orcpt) if orcpt else None)


_WARNED: set[str] = set()  #: plugins told already that (OK, path) at *_pre is deprecated


class MailTransaction:
    """The transaction commands of one conversation."""

    __slots__ = ("refusal", "owed")  # one per session, idle ones too

    def __init__(self) -> None:
        #: The reply the end of this message gets instead of queueing (data_headers_end refused).
        self.refusal: Reply | None = None
        #: The 250 of a message handed off, as queued for the client: said before any last
        #: words if it has not been written yet (``Conversation.last_words``).
        self.owed = b""

    def on_mail(self, conversation: Dialogue, command: Mail) -> None:
        session = conversation.session
        submission = conversation.listen.submission
        if submission and not session.connection.notes.get("auth_user"):
            conversation.send(Canned.AUTH_REQUIRED)  # RFC 4954 6: 530 until AUTH
            return
        path = self._pre(conversation, "mail_pre", command.path, command.params)
        if path is None:
            return
        smtputf8 = "SMTPUTF8" in command.params
        if not path.isascii() and not smtputf8:
            conversation.send(Canned.NEEDS_SMTPUTF8)
            return
        try:
            sender = Address.parse(path, smtputf8=smtputf8, allow_null=True)
        except AddressError as error:
            conversation.send(Canned.BAD_SENDER.with_text(f"could not parse your mail from command: {error}"))
            return
        user = session.connection.notes.get("auth_user")
        if submission and not conversation.surroundings.senders.allows(user or "", sender):
            conversation.log.info("sender %s refused: not one of user %s's", sender.format(), user)
            conversation.send(Canned.SENDER_NOT_YOURS)
            return
        if "REQUIRETLS" in command.params and not session.connection.tls:
            conversation.send(Canned.REQUIRETLS_WITHOUT_TLS)  # RFC 8689 4: offered only over TLS
            return
        conversation.reset_transaction()
        asked = conversation.ask("mail", sender, command.params, address=sender.format())
        if asked.outcome is Outcome.PROCEED:
            self._begin(conversation, sender, command.params)
            conversation.send(asked.reply)  # type: ignore[arg-type]
        elif asked.outcome is Outcome.ANSWERED and conversation.protocol.state is State.MAIL:
            self._begin(conversation, sender, command.params)

    def _begin(self, conversation: Dialogue, sender: Address, params: dict[str, str | None]) -> None:
        transaction = conversation.session.transaction
        transaction.sender = sender
        if params.get("RET"):  # checked by the protocol core (core/dsn_request.py)
            transaction.dsn_ret = str(params["RET"]).upper()
        transaction.requiretls = "REQUIRETLS" in params  # RFC 8689: TLS all the way on
        if params.get("ENVID"):
            transaction.dsn_envid = dsn_request.unxtext(str(params["ENVID"]))
        conversation.tally.transactions += 1
        conversation.counters.transaction_started()

    def on_rcpt(self, conversation: Dialogue, command: Rcpt) -> None:
        tally = conversation.tally
        accepted = tally.accepted
        self._rcpt(conversation, command)
        if tally.accepted == accepted:
            tally.refused += 1
            conversation.counters.recipient(False)

    def _rcpt(self, conversation: Dialogue, command: Rcpt) -> None:
        path = self._pre(conversation, "rcpt_pre", command.path, command.params)
        if path is None:
            return
        smtputf8 = conversation.protocol.smtputf8
        if not path.isascii() and not smtputf8:
            conversation.send(Canned.NEEDS_SMTPUTF8)
            return
        try:
            recipient = Address.parse(path, smtputf8=smtputf8, allow_null=False, allow_postmaster=True)
            recipient = _with_dsn(recipient, command.params)
        except AddressError as error:
            conversation.send(Canned.BAD_RECIPIENT.with_text(f"could not parse recipient: {error}"))
            return
        asked = conversation.ask("rcpt", recipient, command.params, address=recipient.format())
        if asked.outcome is Outcome.PROCEED:
            self._accept(conversation, recipient)
            conversation.send(asked.reply)  # type: ignore[arg-type]
        elif asked.outcome is Outcome.ANSWERED and conversation.protocol.state is State.RCPT:
            self._accept(conversation, recipient)

    def _pre(self, conversation: Dialogue, hook: str, path: str, params: dict[str, str | None]) -> str | None:
        """Run ``mail_pre`` / ``rcpt_pre``: the path to parse (maybe rewritten), or None: refused."""
        session = conversation.session
        session._rewriting, session._rewritten = hook, None
        try:
            asked = conversation.ask(hook, path, params)
        finally:
            session._rewriting = None
        if asked.outcome is not Outcome.PROCEED:
            return None
        rewritten = _rewritten(session)
        if rewritten is not None:
            return rewritten
        verdict = asked.verdict
        if verdict.code is OK and verdict.message:
            if verdict.plugin not in _WARNED:
                _WARNED.add(str(verdict.plugin))
                session.log.warning("plugin %s rewrote a path by returning (OK, path) at %s: deprecated, "
                                    "call session.%s(path)", verdict.plugin, hook,
                                    "rewrite_sender" if hook == "mail_pre" else "rewrite_recipient")
            return verdict.message[0].strip()
        return path

    def _accept(self, conversation: Dialogue, recipient: Address) -> None:
        conversation.session.transaction.add_recipient(recipient)
        conversation.tally.accepted += 1
        conversation.counters.recipient(True)

    def on_data(self, conversation: Dialogue, command: Data) -> None:
        asked = conversation.ask("data")
        if asked.outcome is Outcome.PROCEED:
            self.refusal = None
            conversation.send(asked.reply)  # type: ignore[arg-type]
        elif asked.outcome is not Outcome.ANSWERED:
            conversation.reset_transaction()

    def on_bdat(self, conversation: Dialogue, command: Bdat) -> None:
        """A chunk comes: the first one asks ``data``, as DATA does; then its octets are read."""
        protocol = conversation.protocol
        if protocol.state is State.RCPT:  # the first chunk of this message
            self.refusal = None
            verdict = conversation.decide("data")
            result = conversation.answer("data", verdict)
            if result.outcome is Outcome.CLOSE:
                conversation.send(result.reply or INTERNAL_ERROR)
                return
            if result.outcome is not Outcome.PROCEED and protocol.awaiting_reply:
                self.refusal = result.reply or INTERNAL_ERROR
        protocol.start_chunk(command)  # if a plugin answered already: read, dropped

    def on_chunk_end(self, conversation: Dialogue, event: ChunkEnd) -> None:
        """A chunk but the LAST is in: 250, or why the message will not be taken."""
        refusal = event.problem or self.refusal or conversation.session.transaction.problem
        if refusal is not None:
            conversation.send(refusal)
        else:
            conversation.send(Canned.OK.with_text(f"{event.size} octets received"))

    def on_message_data(self, conversation: Dialogue, event: MessageData) -> None:
        if self.refusal is not None:
            return  # refused at data_headers_end: read to the end, keep nothing
        if conversation.session.transaction.write(event.data):
            self._headers_done(conversation)

    def _headers_done(self, conversation: Dialogue) -> None:
        """data_headers_end: its refusal is the reply to the final dot (we cannot answer mid-DATA)."""
        problem = conversation.session.transaction.problem
        if problem is not None:  # header too large, spool_dir full
            self.refusal = problem
            return
        verdict = conversation.decide("data_headers_end")
        result = conversation.answer("data_headers_end", verdict)
        if result.outcome is Outcome.ANSWERED:
            result = conversation.answer("data_headers_end", Verdict(ReturnCode.DENYSOFT, (), verdict.plugin, True))
        if result.outcome is Outcome.CLOSE:
            conversation.send(result.reply)  # type: ignore[arg-type]
        elif result.outcome is not Outcome.PROCEED:
            self.refusal = result.reply or INTERNAL_ERROR

    def on_message_end(self, conversation: Dialogue, event: MessageEnd) -> None:
        if conversation.listen.lmtp:  # RFC 2033 4.2: every reply to this dot, once per recipient
            conversation.copies = max(1, len(conversation.session.transaction.recipients or ()))
        try:
            self._message_end(conversation, event)
        finally:
            conversation.copies = 1
            conversation.reset_transaction()

    def _message_end(self, conversation: Dialogue, event: MessageEnd) -> None:
        if event.problem is not None:
            conversation.log.info("message refused: %s (%d octets)", event.problem.text[0], event.size)
            conversation.counters.rejected("data", "core", str(event.problem.code))
            conversation.send(event.problem)
            return
        transaction = conversation.session.transaction
        if transaction.end_of_data() and self.refusal is None:
            self._headers_done(conversation)
        if self.refusal is None:
            self.refusal = transaction.problem
        if self.refusal is not None:
            conversation.send(self.refusal)
            return
        received = self.received(conversation)
        if received is None:
            return
        transaction.headers.prepend("Received", received)
        for hook in ("data_post", "queue_pre"):
            if conversation.ask(hook).outcome is not Outcome.PROCEED:
                return
            if hook == "data_post":  # every plugin has recorded its result: one header (RFC 8601)
                authresults.finish(transaction, conversation.session.connection, conversation.me)
        if conversation.listen.lmtp:  # only where each recipient hears its own result
            transaction.notes["recipient_results"] = {}
        asked = self._queue(conversation)
        if asked.outcome is Outcome.PROCEED:
            assert asked.reply is not None
            self.owed = asked.reply.to_bytes(enhanced_codes=True)
            conversation.tally.messages += 1
            conversation.counters.message_queued(asked.verdict.plugin)
            conversation.log.info("queued: from=%s rcpts=%d size=%d: %s", transaction.sender,
                                  len(transaction.recipients), transaction.data_size, asked.reply.text[0])
            if conversation.listen.lmtp:
                self._each_recipient(conversation, asked.reply, asked.verdict.plugin)
            else:
                conversation.send(asked.reply)
        conversation.runner.notify("queue_post", conversation.session)

    def _each_recipient(self, conversation: Dialogue, queued: Reply, plugin: str | None) -> None:
        """LMTP: one reply per recipient, in RCPT order: its own result, or the queue's OK."""
        conversation.copies = 1
        transaction = conversation.session.transaction
        results = transaction.notes.get("recipient_results") or {}
        for recipient in transaction.recipients:
            result = results.get(recipient.address)
            if result is None:
                conversation.send(queued)
                continue
            code, message = result
            verdict = Verdict(ReturnCode(code), (message,) if message else (), plugin)
            conversation.log.info("recipient %s: %s %s", recipient.address, ReturnCode(code).name, message)
            conversation.send(conversation.answer("queue", verdict).reply or INTERNAL_ERROR)

    def _queue(self, conversation: Dialogue) -> Asked:
        """Ask ``queue``; once a plugin has handed the message off, the answer is 250.

        A 4xx for a message already delivered makes a duplicate on the client's retry: a
        plugin that calls ``transaction.handed_off`` and is then cut short (its timeout, an
        error, a DENYSOFT) gets its 250 all the same; if the server stops the session in the
        hook, the 250 goes out before the 421 (``owed``).
        """
        transaction = conversation.session.transaction
        self.owed = b""
        try:
            verdict = conversation.decide("queue")
        except BaseException:  # the server stopping, or a kick: the 421 comes after our 250
            if transaction.handed_off_as is not None:
                handed_off = reply(250, "2.0.0", transaction.handed_off_as)
                self.owed = handed_off.to_bytes(enhanced_codes=True)
                conversation.send(handed_off)
            raise
        if transaction.handed_off_as is not None and verdict.code is not OK:
            conversation.log.warning("hook=queue plugin=%s said %s after handing the message off: answering 250",
                                     verdict.plugin, verdict.code.name)
            verdict = Verdict(OK, (transaction.handed_off_as,), verdict.plugin)
        result = conversation.answer("queue", verdict)
        if result.reply is not None and result.outcome is not Outcome.PROCEED:
            conversation.send(result.reply)
        return Asked(result.outcome, result.reply, verdict)

    def received(self, conversation: Dialogue) -> str | None:
        """Our Received header's value, or the one a ``received_line`` plugin gives (None: refused)."""
        session = conversation.session
        line = received_line(session.connection, session.transaction, conversation.me,
                             conversation.protocol.smtputf8)
        if not conversation.runner.has("received_line"):
            return line
        asked = conversation.ask("received_line", line)
        if asked.outcome is not Outcome.PROCEED:
            return None
        verdict = asked.verdict
        if verdict.code is OK and verdict.message:
            return "\n\t".join(text.strip() for text in verdict.message)
        return line


def _rewritten(session: Session) -> str | None:
    """The path ``rewrite_sender`` / ``rewrite_recipient`` set while the hook ran. Read in a
    function of its own: right after ``_pre`` set it to None, mypy takes it for None still (it
    does not see the plugin's call change it), and the compiled build would enforce that."""
    return session._rewritten

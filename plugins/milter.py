"""milter: ask a chain of mail filters (sendmail/Postfix milters: OpenDKIM, clamav-milter, rspamd...).

Each milter named in a sub-section is asked, in config order, at every SMTP step it wants
(milter protocol version 6, negotiated: it may leave steps out or leave them unanswered):

  connect            connect (client name, address, port) with macros j, _, {daemon_name},
                     {if_name}, {if_addr}, {client_addr}, {client_port}, {client_name}
  helo / ehlo        HELO with the name given
  mail               MAIL with the ESMTP arguments; macros i (transaction id), {mail_addr},
                     {auth_type}, {auth_authen} (when the client authenticated)
  rcpt               RCPT with its arguments; macros {rcpt_addr}, {rcpt_host}
  data_post          DATA, each header field, end of header, the body in chunks of at most
                     64 KiB read from the spool (never whole), end of message; macro i
  reset_transaction  ABORT when a transaction the milter saw ends without end of message
  disconnect         QUIT

The message a milter sees at end of message carries our Received line and the changes the
milters before it made. Each milter has one connection per SMTP session, opened at connect
(or at the next MAIL after it failed) and reused for every message of the session.

What a milter answers:
  continue     the next milter is asked
  accept       this milter is done: for the session (at connect/HELO) or the message
  reject       5xx: the connection (at connect), HELO, MAIL, this RCPT, or the message
  tempfail     4xx, the same way
  replycode    its own code and text reach the client (421 also closes the connection)
  discard      the client gets 250, the message goes nowhere (the queue plugins do not run)
  quarantine   noted in ``transaction.notes["milter_quarantine"]`` and an ``X-Quarantined``
               header (nothing is held back: qpgevent has no hold queue)

Changes a milter makes at end of message, applied to the transaction before the next milter
and the queue plugins see it: add, insert and change (or delete) header fields, change the
sender, add and delete recipients, replace the body (spooled, not held in memory). Header
values are kept as the milter wrote them; the ESMTP arguments of a changed sender or an
added recipient are logged and not used.

Authentication-Results: fields the message came with that claim our authserv-id (``me``)
are removed before any milter reads them (RFC 8601 5: OpenDMARC trusts its
``TrustedAuthservIDs``); the fields milters add under our authserv-id become results of the
one Authentication-Results field the server writes (``qpgevent.authresults``). Fields of
other authserv-ids stay as they are.

A milter that refuses the connection, does not answer within its timeout, closes the
connection, or answers what the protocol does not allow is "failed"; ``on_failure`` says
what that costs: ``tempfail`` (default: ``451 4.7.1 mail filter NAME unavailable, try again
later``; at connect 421 and the connection closes), ``reject`` (the same with 5xx), or
``accept`` (the milter is skipped for the rest of the session). With tempfail or reject,
a failed milter is connected to again at the next MAIL. Results: ``transaction.notes["milter"]`` = {name: last reply}.

Options (in a sub-section per milter, the sub-section's name labels it in logs and replies):
  address          inet:HOST:PORT, inet:[v6]:PORT, inet:PORT@HOST or unix:/path (required)
  connect_timeout  seconds to connect and negotiate (default 10)
  command_timeout  seconds for the answer to one step (default 10)
  content_timeout  seconds for the whole message: header, body, end of message and its
                   changes, progress replies included (default 60)
  on_failure       tempfail, reject or accept (default tempfail)
The plugin's own ``timeout`` defaults to the sum of every milter's three timeouts plus one
second, so a milter's own timeout, not the hook runner's, decides. List this plugin before
the plugins that accept recipients (``rcpt_ok``), which end the ``rcpt`` hook.

Example::

    [[milter]]
      [[[opendkim]]]
        address = inet:127.0.0.1:8891
      [[[clamav]]]
        address = unix:/run/clamav/clamav-milter.ctl
        on_failure = accept
"""

import re

from qpgevent import authresults
from qpgevent import milter_client as client
from qpgevent import milter_protocol as mp
from qpgevent.address import Address, AddressError
from qpgevent.plugin import DECLINED, DENY, DENYSOFT, DENYSOFT_DISCONNECT, DONE, Plugin

NOTE = "milter"  # connection.notes: {milter name: _Peer}
#: Postfix's words for a milter's bare reject and tempfail (at connect the code is 554/421).
REFUSALS = {mp.Kind.REJECT: (DENY, 550, "5.7.1 Command rejected"),
            mp.Kind.TEMPFAIL: (DENYSOFT, 451, "4.7.1 Service unavailable - try again later")}
PERMISSION = {mp.Kind.ADDHEADER: mp.Action.ADDHDRS, mp.Kind.INSHEADER: mp.Action.ADDHDRS,
              mp.Kind.CHGHEADER: mp.Action.CHGHDRS, mp.Kind.CHGFROM: mp.Action.CHGFROM,
              mp.Kind.ADDRCPT: mp.Action.ADDRCPT, mp.Kind.ADDRCPT_PAR: mp.Action.ADDRCPT_PAR,
              mp.Kind.DELRCPT: mp.Action.DELRCPT, mp.Kind.REPLBODY: mp.Action.CHGBODY,
              mp.Kind.QUARANTINE: mp.Action.QUARANTINE}


class _Peer:
    """One milter's state in one session."""

    def __init__(self):
        self.connection = None  # a MilterConnection while open
        self.done_session = False  # accepted at connect/HELO, or failed with on_failure = accept
        self.done_message = False  # accepted or discarded this transaction
        self.failed_message = False  # failed during this transaction: every step answers so
        self.in_message = False  # MAIL sent, no end of message or ABORT yet


class Milter(Plugin):
    configspec = [
        "[__many__]",
        "address = string",
        "connect_timeout = float(min=0.01, default=10)",
        "command_timeout = float(min=0.01, default=10)",
        "content_timeout = float(min=0.01, default=60)",
        'on_failure = option("tempfail", "reject", "accept", default="tempfail")',
    ]

    def setup(self):
        self.milters = {name: value for name, value in self.config.items() if isinstance(value, dict)}
        if not self.milters:
            raise ValueError("name at least one milter: [[[NAME]]] with address = inet:HOST:PORT")
        for name, milter in self.milters.items():
            try:
                client.parse_address(milter["address"])
            except ValueError as error:
                raise ValueError(f"[[[{name}]]] address: {error}") from None
        if self.timeout is None:
            self.timeout = 1 + sum(m["connect_timeout"] + m["command_timeout"] + m["content_timeout"]
                                   for m in self.milters.values())

    # -- the hooks, one per SMTP step ----------------------------------------
    def hook_connect(self, session):
        return self._each(session, "connect", lambda name, peer: self._open(session, name, peer))

    def hook_helo(self, session, host):
        return self._each(session, "helo", lambda name, peer: self._helo(session, name, peer, host))

    hook_ehlo = hook_helo

    def hook_mail(self, session, sender, params):
        for peer in self._peers(session).values():
            peer.done_message = peer.failed_message = False

        def mail(name, peer):
            if peer.connection is None:
                reply = self._reopen(session, name, peer)
                if reply is not None:
                    return reply
            macros = {"i": session.transaction.id, "{mail_addr}": sender.address, "{mail_host}": sender.host,
                      "{auth_type}": session.connection.notes.get("auth_method"),
                      "{auth_authen}": session.connection.notes.get("auth_user")}
            peer.in_message = True
            return self._step(peer, mp.Command.MAIL, macros, mp.encode_envelope(
                mp.Command.MAIL, sender.address, _esmtp_args(params)))
        return self._each(session, "mail", mail, message=True)

    def hook_rcpt(self, session, recipient, params):
        def rcpt(name, peer):
            macros = {"{rcpt_addr}": recipient.address, "{rcpt_host}": recipient.host}
            return self._step(peer, mp.Command.RCPT, macros, mp.encode_envelope(
                mp.Command.RCPT, recipient.address, _esmtp_args(params)))
        return self._each(session, "rcpt", rcpt, message=True)

    def hook_data_post(self, session):
        transaction = session.transaction
        # A field claiming our authserv-id that came with the message is forged (RFC 8601 5):
        # gone before a milter that trusts our id (OpenDMARC's TrustedAuthservIDs) reads it.
        def ours(value):
            return authresults.authserv_id(value) == session.me.lower()
        transaction.headers.remove_if(authresults.HEADER, ours)
        discarded = session.connection.notes.get("milter_discard") or transaction.notes.get("milter_discard")
        if not discarded:
            verdict = self._each(session, "data_post", lambda name, peer: self._message(session, name, peer),
                                 message=True)
            if verdict is not None:
                return verdict
            discarded = transaction.notes.get("milter_discard")
            _record_results(transaction, ours)
        if discarded:
            self.log.info("message discarded as milter %s asked", discarded)
            session.respond(250, f"Message accepted (discarded by mail filter {discarded})", enhanced="2.0.0")
            return DONE
        return DECLINED

    def hook_reset_transaction(self, session):
        for peer in self._peers(session).values():
            if peer.in_message and peer.connection is not None:
                try:
                    peer.connection.send(mp.encode(mp.Command.ABORT))
                except client.MilterUnavailable:
                    pass  # it is closed now; the next MAIL opens a new connection
            peer.in_message = peer.done_message = peer.failed_message = False

    def hook_disconnect(self, session):
        for peer in session.connection.notes.pop(NOTE, {}).values():
            if peer.connection is not None:
                peer.connection.quit()

    # -- asking the chain ------------------------------------------------------
    def _peers(self, session):
        return session.connection.notes.setdefault(NOTE, {name: _Peer() for name in self.milters})

    def _each(self, session, stage, ask, message=False):
        """Ask every milter still in the conversation; the first refusal is the answer."""
        results = session.transaction.notes.setdefault("milter", {}) if message else {}
        for name, peer in self._peers(session).items():
            if peer.done_session or (message and peer.done_message):
                continue
            milter = self.milters[name]
            if peer.failed_message:
                return self._failure(stage, name, peer, "failed earlier in this message")
            seconds = milter["content_timeout"] if stage == "data_post" else milter["command_timeout"]
            if peer.connection is None:  # connecting (again) first
                seconds += milter["connect_timeout"]
            try:
                with client.deadline(seconds):
                    reply = ask(name, peer)
            except client.MilterUnavailable as error:
                self.log.warning("milter %s (%s) failed at %s: %s", name, milter["address"], stage, error)
                if peer.connection is not None:
                    peer.connection.close()
                peer.connection, peer.in_message = None, False
                peer.failed_message = message
                verdict = self._failure(stage, name, peer, str(error))
                if verdict is not None:
                    return verdict
                continue
            if reply is None:
                continue
            results[name] = reply.kind.name.lower()
            verdict = self._verdict(session, stage, name, peer, reply)
            if verdict is not None:
                return verdict
            if message and session.transaction.notes.get("milter_discard"):
                return None  # the message goes nowhere: the milters after this one need not see it
        return None

    def _failure(self, stage, name, peer, reason):
        mode = self.milters[name]["on_failure"]
        if mode == "accept":
            peer.done_session, peer.failed_message = True, False
            self.log.warning("milter %s skipped for this session (on_failure = accept): %s", name, reason)
            return None
        if mode == "reject":
            return _refusal(stage, DENY, 550, f"5.7.1 mail filter {name} unavailable")
        return _refusal(stage, DENYSOFT, 451, f"4.7.1 mail filter {name} unavailable, try again later")

    def _verdict(self, session, stage, name, peer, reply):
        kind = reply.kind
        self.log.info("milter %s at %s: %s %s", name, stage, kind.name.lower(), reply.text)
        if kind is mp.Kind.ACCEPT:
            if stage in ("connect", "helo"):
                peer.done_session = True
            else:
                peer.done_message = True
        elif kind is mp.Kind.DISCARD:
            notes = session.connection.notes if stage in ("connect", "helo") else session.transaction.notes
            notes.setdefault("milter_discard", name)
            peer.done_message = True
        elif kind in REFUSALS:
            return _refusal(stage, *REFUSALS[kind])
        elif kind is mp.Kind.REPLYCODE:
            return _replycode(reply.text)
        return None

    # -- the steps ---------------------------------------------------------------
    def _open(self, session, name, peer):
        milter = self.milters[name]
        peer.connection = client.MilterConnection(milter["address"], milter["connect_timeout"])
        conn = session.connection
        macros = {"j": session.me, "{daemon_name}": "qpgevent", "{if_name}": session.me,
                  "{if_addr}": conn.local_ip, "_": f"{conn.remote_host or 'unknown'} [{conn.remote_ip}]",
                  "{client_addr}": conn.remote_ip, "{client_port}": str(conn.remote_port),
                  "{client_name}": conn.remote_host or "unknown"}
        return self._step(peer, mp.Command.CONNECT, macros,
                          mp.encode_connect(conn.remote_host or "unknown", conn.remote_ip, conn.remote_port))

    def _helo(self, session, name, peer, host):
        if peer.connection is None:  # failed in an earlier transaction
            reply = self._open(session, name, peer)
            if reply is not None and reply.kind is not mp.Kind.CONTINUE:
                return reply
        return self._step(peer, mp.Command.HELO, {}, mp.encode_helo(host))

    def _reopen(self, session, name, peer):
        """A new connection after a failure: connect and HELO again; the first refusal, if any."""
        reply = self._open(session, name, peer)
        if session.connection.hello_host and (reply is None or reply.kind is mp.Kind.CONTINUE):
            reply = self._step(peer, mp.Command.HELO, {}, mp.encode_helo(session.connection.hello_host))
        return None if reply is None or reply.kind is mp.Kind.CONTINUE else reply

    def _step(self, peer, command, macros, packet):
        """Send one step (with its macros) unless the milter left it out; its reply or None."""
        connection = peer.connection
        negotiated = connection.negotiated
        if not negotiated.sends(command):
            return None
        wanted = negotiated.macros.get(command)
        macros = {k: v for k, v in macros.items()
                  if v and (wanted is None or k.strip("{}").encode() in {w.strip(b"{}") for w in wanted})}
        if macros:
            connection.send(mp.encode_macros(command, macros))
        if not negotiated.answers(command):
            connection.send(packet)
            return None
        return connection.ask(packet)

    def _message(self, session, name, peer):
        """DATA, the header, the body and end of message; apply the changes; the final reply."""
        transaction, connection = session.transaction, peer.connection
        negotiated = connection.negotiated
        for command, packet in [(mp.Command.DATA, mp.encode(mp.Command.DATA)),
                                *((mp.Command.HEADER, mp.encode_header(field_name, _wire_value(raw, negotiated)))
                                  for field_name, raw in transaction.headers.raw_fields()),
                                (mp.Command.EOH, mp.encode(mp.Command.EOH))]:
            reply = self._step(peer, command, {"i": transaction.id} if command is mp.Command.DATA else {}, packet)
            if reply is not None and reply.kind is not mp.Kind.CONTINUE:
                return self._settle(peer, reply)
        if negotiated.sends(mp.Command.BODY):
            for chunk in transaction.body_chunks(mp.CHUNK_SIZE):
                reply = self._step(peer, mp.Command.BODY, {}, mp.encode_body(chunk))
                if reply is not None and reply.kind is mp.Kind.SKIP:
                    break
                if reply is not None and reply.kind is not mp.Kind.CONTINUE:
                    return self._settle(peer, reply)
        connection.send(mp.encode_macros(mp.Command.BODYEOB, {"i": transaction.id}))
        changes = []
        for reply in connection.replies(mp.encode(mp.Command.BODYEOB)):
            if reply.kind in mp.MODIFICATIONS:
                if not negotiated.actions & PERMISSION[reply.kind]:
                    raise client.MilterUnavailable(f"{reply.kind.name} without negotiating it")
                changes.append(reply)
            elif reply.kind is mp.Kind.SKIP:
                raise client.MilterUnavailable("SKIP is no answer to end of message")
        if reply.kind in (mp.Kind.ACCEPT, mp.Kind.CONTINUE):
            self._apply(session, name, changes)
        return self._settle(peer, reply)

    def _settle(self, peer, reply):
        peer.in_message = False
        return reply

    def _apply(self, session, name, changes):
        transaction, body = session.transaction, None
        try:
            for change in changes:
                kind, field_name = change.kind, change.name.decode("ascii")
                if kind is mp.Kind.ADDHEADER:
                    transaction.headers.insert(len(transaction.headers), field_name, change.value)
                elif kind is mp.Kind.INSHEADER:
                    transaction.headers.insert(change.index, field_name, change.value)
                elif kind is mp.Kind.CHGHEADER:
                    transaction.headers.change(field_name, change.index, change.value or None)
                elif kind is mp.Kind.CHGFROM:
                    transaction.sender = _address(change.address, null=True)
                elif kind in (mp.Kind.ADDRCPT, mp.Kind.ADDRCPT_PAR):
                    transaction.add_recipient(_address(change.address))
                elif kind is mp.Kind.DELRCPT:
                    transaction.remove_recipient(_address(change.address))
                elif kind is mp.Kind.REPLBODY:
                    body = body or transaction.new_body()
                    body.write(change.data)
                elif kind is mp.Kind.QUARANTINE:
                    transaction.notes["milter_quarantine"] = f"{name}: {change.text}"
                    transaction.headers.add("X-Quarantined", f"by mail filter {name}: {change.text}")
                self.log.info("milter %s: %s %s %s", name, kind.name.lower(), field_name or change.address,
                              change.index or "")
        except (UnicodeDecodeError, AddressError) as error:
            raise client.MilterUnavailable(f"bad change from the filter: {error}") from None
        if body is not None:
            transaction.replace_body(body)


_RESULT_TOKEN = re.compile(r'\s*(?:(;)|([\w.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]+)|([^\s;]+))')


def _record_results(transaction, ours):
    """Milters' Authentication-Results fields under our authserv-id become results of the one
    field the session writes (qpgevent.authresults), instead of being dropped there as forged."""
    for name, value in list(transaction.headers):
        if name.lower() != authresults.HEADER.lower() or not ours(value):
            continue
        entries, current = [], None
        for semicolon, key, word, _ in _RESULT_TOKEN.findall(re.sub(r"\([^()]*\)", " ", value)):
            if semicolon:
                current = {"properties": {}}
                entries.append(current)
            elif key and current is not None:
                word = word.strip('"')
                if "method" not in current:
                    current.update(method=key, result=word)
                elif key.lower() == "reason":
                    current["reason"] = word
                else:
                    current["properties"][key.replace(".", "_", 1)] = word
        for entry in entries:
            if "method" in entry:
                authresults.record(transaction, entry["method"], entry["result"], entry.get("reason"),
                                   **entry["properties"])
    transaction.headers.remove_if(authresults.HEADER, ours)


def _refusal(stage, code, number, text):
    """A refusal with Postfix's reply code; at connect the hook's own (554/421, then close)."""
    return code, text if stage == "connect" else f"{number} {text}"


def _esmtp_args(params):
    return [key if value is None else f"{key}={value}" for key, value in params.items()]


def _wire_value(raw, negotiated):
    """A field's value as milters get it: folds as LF, the space after the colon only with HDR_LEADSPC."""
    value = raw.split(b":", 1)[1].rstrip(b"\r\n").replace(b"\r\n", b"\n")
    if not negotiated.steps & mp.Step.HDR_LEADSPC and value[:1] in (b" ", b"\t"):
        value = value[1:]
    return value


def _address(raw, null=False):
    text = raw.decode("utf-8").strip()
    if not text.startswith("<"):
        text = f"<{text}>"
    return Address.parse(text, smtputf8=True, allow_null=null, allow_postmaster=True)


def _replycode(text):
    """The milter's own reply ("550 5.7.1 Virus found", maybe several lines) as our verdict."""
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    code = int(lines[0][:3])
    message = [f"{code} {lines[0][4:]}"] + [line[4:] for line in lines[1:]]
    if code == 421:
        return DENYSOFT_DISCONNECT, message
    return (DENY if code >= 500 else DENYSOFT), message

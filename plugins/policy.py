"""policy: ask a Postfix policy server (SMTPD_ACCESS_POLICY delegation) and do what it says.

At each hook named in ``hooks`` (connect, helo, mail, rcpt, data, data_post; default
rcpt) the server gets the attributes Postfix sends: ``request=smtpd_access_policy``,
``protocol_state`` (CONNECT, HELO/EHLO, MAIL, RCPT, DATA, END-OF-MESSAGE),
``protocol_name`` (SMTP/ESMTP), ``helo_name``, ``queue_id``, ``sender``, ``recipient``
(at RCPT, and later when there is exactly one), ``recipient_count``, ``client_address``,
``client_port``, ``client_name`` and ``reverse_client_name`` (the confirmed reverse DNS
name, else ``unknown``), ``server_address``, ``server_port``, ``instance`` (one per
message), ``sasl_method``, ``sasl_username``, ``sasl_sender``, ``size`` (MAIL's SIZE, the
real size at END-OF-MESSAGE), ``encryption_protocol``, ``encryption_cipher``,
``encryption_keysize`` and the ``ccert_*`` attributes (empty: we ask for no client
certificates), ``stress``, ``policy_context`` (the ``context`` option).

The reply's action is applied as Postfix's access(5) would:

  OK, permit       nothing, unless ``ok_accepts = yes``: then OK (at rcpt, the
                   recipient is accepted, and later plugins of that hook are not asked)
  DUNNO            nothing: the next plugin decides
  REJECT [text]    ``554 5.7.1 <text>`` (default text "Access denied")
  DEFER [text]     ``450 4.7.1 <text>``; DEFER_IF_PERMIT likewise (this plugin cannot
                   see what later plugins would say: put it after the ones that refuse)
  DEFER_IF_REJECT  nothing (noted and logged)
  4NN/5NN text     that reply, with 4.7.1/5.7.1 added when the text has no enhanced code
  PREPEND header   the header field is put at the top of the message
  HOLD [text]      ``transaction.notes["hold"] = text`` (for the queue to keep it held)
  REDIRECT addr    the message goes to addr only (its recipients are replaced)
  BCC addr         addr is added to the recipients
  DISCARD [text]   the message is accepted and dropped: ``250``, nothing is queued (list
                   this plugin before the queue plugin)
  FILTER t:dest    ``transaction.notes["filter"] = "t:dest"``
  WARN/INFO text   logged

Actions that change the message (PREPEND, HOLD, REDIRECT, BCC, DISCARD, FILTER) take
effect when the message is complete (data_post); given before MAIL they apply to every
message of the connection. Every reply is kept in ``transaction.notes["policy"]`` (or the
connection's before MAIL) as (protocol_state, action) pairs.

One connection per SMTP session, opened at the first question and kept (in the
connection's notes) for the next ones, as Postfix does; a server that closed it meanwhile
is reconnected once. When the server is down, slow (``call_timeout`` per question) or
answers garbage (no ``action``, an unknown action), ``on_failure`` decides:
``tempfail`` (451 4.3.0, default), ``accept`` (as DUNNO) or ``reject``.

Options:
  server        host:port, [v6]:port or a unix socket path (required)
  hooks         where to ask (default rcpt)
  ok_accepts    see OK above (default no)
  context       the policy_context attribute (default: empty)
  on_failure, call_timeout  see above (tempfail; 10 s)
  plus the standard loglevel, timeout

Example::

    [[policy]]
      server = 127.0.0.1:10023
      hooks = rcpt
"""

import socket

from qpgevent import external, scanner
from qpgevent.address import Address, AddressError
from qpgevent.policy_protocol import Kind, ProtocolError, ReplyReader, encode_request, parse_action
from qpgevent.plugin import DECLINED, DENY, DENYSOFT, OK, Plugin

STATES = {"connect": "CONNECT", "mail": "MAIL", "rcpt": "RCPT", "data": "DATA", "data_post": "END-OF-MESSAGE"}
MESSAGE_ACTIONS = (Kind.PREPEND, Kind.HOLD, Kind.REDIRECT, Kind.BCC, Kind.DISCARD, Kind.FILTER)


class Channel:
    """The session's connection to the policy server, with the bytes read past the last reply."""

    def __init__(self, sock):
        self.sock, self.reader, self.used = sock, ReplyReader(), False

    def ask(self, request):
        self.sock.sendall(request)
        while True:
            reply = self.reader.next_reply()
            if reply is not None:
                self.used = True
                return reply
            data = self.sock.recv(4096)
            if not data:
                raise EOFError("the policy server closed the connection")
            self.reader.feed(data)

    def close(self):
        self.sock.close()


class Policy(Plugin):
    configspec = [
        "server = string()",
        "hooks = force_list(default=list('rcpt'))",
        "ok_accepts = boolean(default=no)",
        'context = string(default="")',
        *external.CONFIGSPEC,
    ]

    def setup(self):
        scanner.check_address(self.config["server"])
        unknown = set(self.config["hooks"]) - {*STATES, "helo"}
        if unknown:
            raise ValueError(f"hooks: unknown {', '.join(sorted(unknown))} (known: helo, {', '.join(STATES)})")
        self.key = f"policy:{self.name}"  # this plugin's channel in the connection's notes
        if self.timeout is None:
            self.timeout = 2 * self.config["call_timeout"] + 5  # a reconnection included

    # -- the hooks ---------------------------------------------------------------------
    def hook_connect(self, session):
        return self._check(session, "connect")

    def hook_helo(self, session, host):
        return self._check(session, "helo", helo=host, state="HELO")

    def hook_ehlo(self, session, host):
        return self._check(session, "helo", helo=host, state="EHLO")

    def hook_mail(self, session, sender, params):
        size = params.get("SIZE") if isinstance(params, dict) else None
        session.transaction.notes["policy_size"] = size if size and size.isdigit() else "0"
        return self._check(session, "mail", sender=sender)

    def hook_rcpt(self, session, recipient, params):
        return self._check(session, "rcpt", recipient=recipient)

    def hook_data(self, session):
        return self._check(session, "data")

    def hook_data_post(self, session):
        verdict = self._check(session, "data_post")
        if verdict in (DECLINED, OK):  # not refused: the message goes on, changed as asked
            self._apply_deferred(session)
        return verdict

    def hook_queue(self, session):
        discard = session.transaction.notes.get("discard")
        if discard is not None:
            self.log.info("message discarded as the policy server asked: %s", discard or "(no reason)")
            return OK, "Discarded"
        return DECLINED

    def hook_disconnect(self, session):
        channel = session.connection.notes.pop(self.key, None)
        if channel is not None:
            channel.close()

    # -- asking ------------------------------------------------------------------------
    def _check(self, session, hook, **known):
        if hook not in self.config["hooks"]:
            return DECLINED
        state = known.pop("state", STATES.get(hook))
        request = encode_request(self.attributes(session, state, **known))
        try:
            with scanner.scan_deadline(self.config["call_timeout"], "policy server"):
                reply = self._ask(session, request)
            action = parse_action(reply.get("action", ""))
        except (scanner.ScannerError, ProtocolError, EOFError) as error:
            self._drop(session)
            return external.failed(self, "policy server", error)
        self.log.info("%s: action=%s", state, reply["action"])
        return self._apply(session, state, action)

    def _ask(self, session, request):
        channel = session.connection.notes.get(self.key)
        if channel is not None:
            try:
                return channel.ask(request)
            except (EOFError, ConnectionError) as error:
                # Policy servers close idle connections (Postfix reconnects too): once.
                self.log.debug("reconnecting: %s", error)
                self._drop(session)
        channel = Channel(scanner.connect(self.config["server"], self.config["call_timeout"]))
        session.connection.notes[self.key] = channel
        return channel.ask(request)

    def _drop(self, session):
        """Forget the session's connection: after a failure its next bytes cannot be trusted."""
        channel = session.connection.notes.pop(self.key, None)
        if channel is not None:
            channel.close()

    def attributes(self, session, state, helo=None, sender=None, recipient=None):
        """The request Postfix would send at ``state``."""
        connection, transaction = session.connection, session.current_transaction
        recipients = transaction.recipients if transaction is not None else []
        sender = sender or (transaction.sender if transaction is not None else None)
        if recipient is None and len(recipients) == 1 and state in ("DATA", "END-OF-MESSAGE"):
            recipient = recipients[0]
        hello = connection.hello or ("ehlo" if state == "EHLO" else "helo" if state == "HELO" else "")
        size = (str(transaction.data_size) if state == "END-OF-MESSAGE" else
                transaction.notes.get("policy_size", "0")) if transaction is not None else "0"
        name = connection.remote_host or "unknown"
        return {
            "request": "smtpd_access_policy", "protocol_state": state,
            "protocol_name": "ESMTP" if hello == "ehlo" else "SMTP" if hello else "",
            "helo_name": helo or connection.hello_host or "",
            "queue_id": transaction.id if transaction is not None and state != "CONNECT" else "",
            "sender": _address(sender), "recipient": _address(recipient),
            "recipient_count": str(len(recipients)),
            "client_address": connection.remote_ip, "client_name": name, "reverse_client_name": name,
            "client_port": str(connection.remote_port),
            "server_address": connection.local_ip, "server_port": str(connection.local_port),
            "instance": f"{connection.id}.{transaction.id if transaction is not None else 0}",
            "sasl_method": connection.notes.get("auth_method") or "",
            "sasl_username": connection.notes.get("auth_user") or "", "sasl_sender": "",
            "size": size, "ccert_subject": "", "ccert_issuer": "", "ccert_fingerprint": "",
            "ccert_pubkey_fingerprint": "",
            "encryption_protocol": connection.notes.get("tls_version") or "",
            "encryption_cipher": connection.notes.get("tls_cipher") or "", "encryption_keysize": "0",
            "etrn_domain": "", "stress": "", "policy_context": self.config["context"],
        }

    # -- doing what it said ----------------------------------------------------------------
    def _apply(self, session, state, action):
        transaction = session.current_transaction
        before_mail = transaction is None or state in ("CONNECT", "HELO", "EHLO")
        notes = session.connection.notes if before_mail else transaction.notes
        notes.setdefault("policy", []).append((state, f"{action.keyword} {action.text}".strip()))
        kind = action.kind
        if kind is Kind.REJECT:
            return DENY, action.reply
        if kind is Kind.DEFER:
            return DENYSOFT, action.reply
        if kind is Kind.OK:
            return OK if self.config["ok_accepts"] else DECLINED
        if kind in (Kind.WARN, Kind.INFO):
            (self.log.warning if kind is Kind.WARN else self.log.info)("%s: %s", kind.value, action.text)
        elif kind in MESSAGE_ACTIONS:
            notes.setdefault("policy_actions", []).append(action)
        return DECLINED

    def _apply_deferred(self, session):
        transaction = session.transaction
        actions = session.connection.notes.get("policy_actions", []) + transaction.notes.pop("policy_actions", [])
        for action in actions:
            kind = action.kind
            if kind is Kind.PREPEND:
                name, _, value = action.text.partition(":")
                transaction.headers.prepend(name, value.strip())
            elif kind in (Kind.REDIRECT, Kind.BCC):
                try:
                    address = Address.parse(f"<{action.text.strip('<>')}>")
                except AddressError as error:
                    self.log.warning("%s %r ignored: %s", kind.value, action.text, error)
                    continue
                if kind is Kind.REDIRECT:
                    transaction.recipients = []
                transaction.add_recipient(address)
            else:  # HOLD, DISCARD, FILTER: for the queue to act on
                transaction.notes[kind.value.lower()] = action.text
        if actions:
            self.log.info("applied: %s", ", ".join(f"{a.keyword} {a.text}".strip() for a in actions))


def _address(address):
    if address is None or address.is_null:
        return ""
    return address.address

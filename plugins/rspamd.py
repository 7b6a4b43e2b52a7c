"""rspamd: ask rspamd (HTTP ``/checkv2``) about each message and do what its action says.

After the message is received (data_post), it is POSTed to rspamd's normal worker,
streamed from the spool (never read whole into memory), with the envelope as rspamd wants
it in request headers: ``IP``, ``Hostname`` (the client's confirmed name, or ``unknown``),
``Helo``, ``From``, one ``Rcpt`` per recipient, ``Queue-Id``, ``User`` (the SMTP AUTH
name), ``TLS-Version``/``TLS-Cipher`` over TLS, and ``Settings-ID`` (see below).

rspamd's ``action`` decides:

  reject           refused with rspamd's text: ``554 5.7.1 Gtube pattern`` (its
                   ``smtp_message``, else "Spam message rejected"; ``reject`` /
                   ``reject_type`` apply as usual)
  soft reject      ``451 4.7.1 <rspamd's text>`` (``soft_reject = no``: accepted)
  greylist         accepted (greylisting is the greylisting plugin's job) unless
                   ``defer_greylist = yes``: then ``451 4.7.1 Greylisted, try again later``
  rewrite subject  the Subject becomes rspamd's ``subject`` (its ``subject`` setting,
                   e.g. ``***SPAM*** %s``), else ``subject_prefix`` and the old one;
                   then as add header
  add header       ``X-Spam-Flag: YES``
  no action        nothing

Whatever the action, the header changes of rspamd's ``milter`` block are applied to the
queued message (``milter_headers = no`` ignores them): ``remove_headers`` {name: n}
removes every field of that name (n = 0), the n-th (n > 0) or the n-th from the end
(n < 0); ``add_headers`` {name: value | {value, order} | list of those} adds them, at the
top for order 0, at the end otherwise. With ``add_headers = always`` (the default
``sometimes``: only for add header and rewrite subject; ``never``), the score goes in
``X-Rspamd-Score: 9.6 / 15.0``, a bar of ``+`` per point in ``X-Rspamd-Bar`` and the
symbols in ``X-Rspamd-Report``; the message's own X-Rspamd-* and X-Spam-Flag are
removed first, so a sender cannot forge a verdict. The verdict is kept in
``transaction.notes["rspamd"]`` and logged: action, score, required score, symbols.

Settings: ``Settings-ID`` is ``settings_id_authenticated`` for clients that logged in,
``settings_id_relay`` for other relay clients, ``settings_id`` for everyone else (empty:
not sent); rspamd's settings module also matches ``User`` for per-user rules. Relay
clients are scanned unless ``scan_relay_clients = no``; messages over ``size_limit``
octets are not scanned (logged).

When rspamd is down, slow (``call_timeout`` for the whole scan) or answers something that
is not its JSON, ``on_failure`` decides: ``tempfail`` (451 4.3.0, default), ``accept``
(the message goes on unscanned) or ``reject``.

Options:
  url                        rspamd's normal worker (default http://127.0.0.1:11333)
  settings_id                Settings-ID for everyone else (default: none)
  settings_id_authenticated  Settings-ID for SMTP AUTH clients (default: none)
  settings_id_relay          Settings-ID for relay clients (default: none)
  scan_relay_clients         default yes
  soft_reject, defer_greylist  see above (yes; no)
  subject_prefix             default "***SPAM***"
  add_headers                always, sometimes (default) or never
  milter_headers             apply rspamd's milter block (default yes)
  size_limit                 largest message scanned, octets (default 52428800)
  on_failure, call_timeout   see above (tempfail; 10 s)
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[rspamd]]
      url = http://127.0.0.1:11333
      settings_id_authenticated = authenticated
      on_failure = accept
"""

import http.client
import json
import urllib.parse

from qpgevent import external, scanner
from qpgevent.plugin import DECLINED, DENYSOFT, Plugin

MAX_ANSWER = 4 << 20
OUR_HEADERS = ("X-Rspamd-Score", "X-Rspamd-Bar", "X-Rspamd-Report", "X-Spam-Flag")


class Rspamd(Plugin):
    configspec = [
        'url = string(default="http://127.0.0.1:11333")',
        'settings_id = string(default="")',
        'settings_id_authenticated = string(default="")',
        'settings_id_relay = string(default="")',
        "scan_relay_clients = boolean(default=yes)",
        "soft_reject = boolean(default=yes)",
        "defer_greylist = boolean(default=no)",
        'subject_prefix = string(default="***SPAM***")',
        'add_headers = option("always", "sometimes", "never", default="sometimes")',
        "milter_headers = boolean(default=yes)",
        "size_limit = integer(min=0, default=52428800)",
        *external.CONFIGSPEC,
    ]

    def setup(self):
        url = urllib.parse.urlsplit(self.config["url"])
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"url: {self.config['url']!r} is not http://host[:port]")
        self.host, self.port = url.hostname, url.port or 11333
        self.path = (url.path.rstrip("/") or "") + "/checkv2"
        if self.timeout is None:
            self.timeout = self.config["call_timeout"] + 5  # our own deadline fires first

    def hook_data_post(self, session):
        transaction = session.transaction
        if session.connection.relay_client and not self.config["scan_relay_clients"]:
            return DECLINED
        if transaction.data_size > self.config["size_limit"]:
            self.log.info("not scanned: %d octets is over size_limit %d", transaction.data_size,
                          self.config["size_limit"])
            return DECLINED
        try:
            with scanner.scan_deadline(self.config["call_timeout"], "rspamd"):
                answer = self._check(session)
            verdict = parse_answer(answer)
        except (scanner.ScannerError, http.client.HTTPException) as error:
            return external.failed(self, "rspamd", error)
        transaction.notes["rspamd"] = verdict
        self.log.info("action=%r score=%s/%s symbols=%s", verdict["action"], verdict["score"],
                      verdict["required_score"], ",".join(verdict["symbols"]))
        return self._act(session, verdict)

    def _check(self, session):
        transaction = session.transaction
        chunks = transaction.message_chunks()
        head = next(chunks)  # the header and the empty line; the body follows from the spool
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.config["call_timeout"])
        try:
            conn.putrequest("POST", self.path, skip_accept_encoding=True)
            for name, value in self._envelope(session):
                conn.putheader(name, value.encode("utf-8"))
            conn.putheader("Content-Length", str(len(head) + transaction.body_size))
            conn.endheaders(head)
            for chunk in chunks:
                conn.send(chunk)
            response = conn.getresponse()
            body = response.read(MAX_ANSWER + 1)
        finally:
            conn.close()
        if response.status != 200:
            raise scanner.ScannerError(f"HTTP {response.status} {response.reason}: {body[:200]!r}")
        if len(body) > MAX_ANSWER:
            raise scanner.ScannerError(f"answer longer than {MAX_ANSWER} octets")
        return body

    def _envelope(self, session):
        transaction, connection = session.transaction, session.connection
        sender = transaction.sender
        fields = [("IP", connection.remote_ip), ("Hostname", connection.remote_host or "unknown"),
                  ("Helo", connection.hello_host or ""), ("Queue-Id", transaction.id),
                  ("From", sender.address if sender and not sender.is_null else "")]
        fields += [("Rcpt", recipient.address) for recipient in transaction.recipients]
        user = connection.notes.get("auth_user")
        if user:
            fields.append(("User", user))
        if connection.tls:
            fields += [("TLS-Version", connection.notes.get("tls_version") or ""),
                       ("TLS-Cipher", connection.notes.get("tls_cipher") or "")]
        settings_id = (self.config["settings_id_authenticated"] if user else
                       self.config["settings_id_relay"] if connection.relay_client else
                       self.config["settings_id"])
        if settings_id:
            fields.append(("Settings-ID", settings_id))
        # http.client refuses CR/LF in values; an envelope never has them, but be sure.
        return [(name, " ".join(str(value).split())) for name, value in fields]

    def _act(self, session, verdict):
        headers, action = session.transaction.headers, verdict["action"]
        text = verdict["smtp_message"]
        if action == "reject":
            return self.reject(_with_status(text or "Spam message rejected", "5.7.1"), session)
        if action == "soft reject" and self.config["soft_reject"]:
            return DENYSOFT, _with_status(text or "Try again later", "4.7.1")
        if action == "greylist" and self.config["defer_greylist"]:
            return DENYSOFT, "4.7.1 Greylisted, try again later"
        for name in OUR_HEADERS:
            headers.remove(name)
        if self.config["milter_headers"]:
            apply_milter_block(headers, verdict["milter"])
        spam = action in ("add header", "rewrite subject")
        if action == "rewrite subject":
            subject = verdict["subject"] or f"{self.config['subject_prefix']} {headers.get('Subject') or ''}"
            headers.replace("Subject", subject.strip())
        if spam:
            headers.add("X-Spam-Flag", "YES")
        mode = self.config["add_headers"]
        if mode == "always" or (mode == "sometimes" and spam):
            score = verdict["score"]
            headers.add("X-Rspamd-Score", f"{score} / {verdict['required_score']}")
            headers.add("X-Rspamd-Bar", ("+" if score >= 0 else "-") * min(50, int(abs(score))) or "/")
            headers.add("X-Rspamd-Report", " ".join(verdict["symbols"]) or "none")
        return DECLINED


def _with_status(text, status):
    """rspamd's text as a reply text: with an enhanced status code, unless it has one."""
    first = text.split(" ", 1)[0]
    if first[:1] in "245" and first.count(".") == 2:
        return text
    return f"{status} {text}"


def parse_answer(answer: bytes) -> dict:
    """The JSON of /checkv2 -> the verdict we keep; ScannerError when it is not that JSON."""
    try:
        data = json.loads(answer)
        action, score, required = data["action"], float(data["score"]), float(data["required_score"])
        if not isinstance(action, str):
            raise TypeError("action is not a string")
        symbols = sorted(data.get("symbols") or {})
        messages = data.get("messages") or {}
        milter = data.get("milter") or {}
        if not isinstance(messages, dict) or not isinstance(milter, dict):
            raise TypeError("messages or milter is not an object")
    except (ValueError, KeyError, TypeError) as error:
        raise scanner.ScannerError(f"not rspamd's answer ({error}): {answer[:200]!r}") from None
    return {"action": action, "score": score, "required_score": required, "symbols": symbols,
            "smtp_message": str(messages.get("smtp_message") or ""), "subject": str(data.get("subject") or ""),
            "milter": milter}


def apply_milter_block(headers, milter):
    """Apply ``remove_headers`` then ``add_headers`` of rspamd's milter block to ``headers``."""
    for name, which in (milter.get("remove_headers") or {}).items():
        _remove_nth(headers, str(name), int(which) if isinstance(which, (int, float)) else 0)
    for name, values in (milter.get("add_headers") or {}).items():
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, dict):
                text, order = str(value.get("value", "")), value.get("order", -1)
            else:
                text, order = str(value), -1
            (headers.prepend if order == 0 else headers.add)(str(name), text)


def _remove_nth(headers, name, which):
    """0: every ``name`` field; n > 0: the n-th; n < 0: the n-th from the end."""
    if which == 0:
        headers.remove(name)
        return
    count = len(headers.get_all(name))
    target = which - 1 if which > 0 else count + which
    seen = iter(range(count))
    headers.remove_if(name, lambda _value: next(seen) == target)

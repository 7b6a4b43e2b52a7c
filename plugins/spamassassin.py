"""spamassassin: ask SpamAssassin's spamd about each message; add X-Spam-* headers, refuse spam.

After the message is received (data_post), the whole message — our Received line
included — is streamed to spamd with the SPAMC/1.5 ``SYMBOLS`` command (never held in
memory: the Content-length comes from the spooled size). The verdict is recorded:

- headers ``X-Spam-Flag: YES`` (spam only), ``X-Spam-Status: Yes, score=12.3
  required=5.0 tests=GTUBE,...`` and ``X-Spam-Level: ************`` (one star per point,
  at most 50). X-Spam-* headers the message came with are dropped first
  (``leave_old_headers``), so a sender cannot forge a clean verdict;
- ``transaction.results.get("spamassassin")``: fail ``spam`` or pass ``ham``, with the
  evidence ``is_spam``, ``score``, ``threshold`` and ``tests``;
- a score at or above ``reject_score`` refuses the message (``554 5.7.1 spam score 12.3
  exceeds 10.0``; ``reject`` / ``reject_type`` apply as usual);
- a score at or above ``munge_subject_threshold`` prefixes the Subject with
  ``subject_prefix``.

Messages larger than ``size_limit`` octets are not scanned (spamc's own default is
500 kB; big messages are rarely spam and slow to scan); that is logged and recorded
(skip ``size``). Relay clients are not scanned unless
``scan_relay_clients``.

When spamd is down, hangs or answers nonsense, ``on_error`` decides: ``defer`` (451) or
``accept`` with ``X-Spam-Checker-Error: not scanned (spamd unavailable: ...)``; the
whole scan runs within ``scan_timeout`` seconds (keep it below ``timeout``).

Options:
  spamd_socket             host:port, [v6]:port or a unix socket path (default 127.0.0.1:783)
  spamd_user               the User: spamd scans as (default nobody)
  reject_score             refuse at this score; none: never refuse (default none)
  munge_subject_threshold  tag the Subject at this score; none: never (default none)
  subject_prefix           default "*** SPAM ***"
  size_limit               largest message scanned, octets (default 500000)
  leave_old_headers        drop, rename (to X-Old-Spam-*) or keep (default drop)
  scan_relay_clients       scan mail from relay clients too (default no)
  on_error, scan_timeout   see above (defer; 20 s)
  plus the standard reject, reject_type, loglevel, timeout

Example::

    [[spamassassin]]
      spamd_socket = 127.0.0.1:783
      reject_score = 10
      on_error = accept
"""

import socket

from qpgevent import scanner
from qpgevent.plugin import DECLINED, Plugin

PROTOCOL = "SPAMC/1.5"
MAX_ANSWER = 1 << 20


class SpamAssassin(Plugin):
    reject_options = ("reject", "reject_type")
    configspec = [
        'spamd_socket = string(default="127.0.0.1:783")',
        'spamd_user = string(default="nobody")',
        "reject_score = float(default=None)",
        "munge_subject_threshold = float(default=None)",
        'subject_prefix = string(default="*** SPAM ***")',
        "size_limit = integer(min=0, default=500000)",
        'leave_old_headers = option("drop", "rename", "keep", default="drop")',
        "scan_relay_clients = boolean(default=no)",
        *scanner.CONFIGSPEC,
    ]

    def setup(self):
        scanner.check_address(self.config["spamd_socket"])

    def hook_data_post(self, session):
        transaction = session.transaction
        if session.connection.relay_client and not self.config["scan_relay_clients"]:
            return DECLINED
        self._old_headers(transaction.headers)
        if transaction.data_size > self.config["size_limit"]:
            self.log.info("not scanned: %d octets is over size_limit %d", transaction.data_size,
                          self.config["size_limit"])
            transaction.results.add(self, skip="size")
            return DECLINED
        try:
            with scanner.scan_deadline(self.config["scan_timeout"], "spamd"):
                verdict = self._scan(transaction)
        except scanner.ScannerError as error:
            return scanner.unavailable(self, session, "spamd", error, "X-Spam-Checker-Error")
        spam = verdict["is_spam"]
        transaction.results.record(self, "fail" if spam else "pass", "spam" if spam else "ham", **verdict)
        self._add_headers(transaction, verdict)
        score, reject_score = verdict["score"], self.config["reject_score"]
        self.log.info("spam=%s score=%s/%s tests=%s", verdict["is_spam"], score, verdict["threshold"],
                      ",".join(verdict["tests"]))
        if reject_score is not None and score >= reject_score:
            return self.reject(f"spam score {score} exceeds {reject_score}", session)
        return DECLINED

    def _scan(self, transaction):
        chunks = transaction.message_chunks()
        head = next(chunks)  # the header and the empty line; the body follows from the spool
        length = len(head) + transaction.body_size
        request = (f"SYMBOLS {PROTOCOL}\r\nContent-length: {length}\r\n"
                   f"User: {self.config['spamd_user']}\r\n\r\n").encode("ascii")
        with scanner.connect(self.config["spamd_socket"], self.config["scan_timeout"]) as sock:
            sock.sendall(request + head)
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            answer = scanner.read_all(sock, MAX_ANSWER)
        return parse_answer(answer)

    def _old_headers(self, headers):
        mode = self.config["leave_old_headers"]
        if mode == "keep":
            return
        old = [(name, value) for name, value in headers if name.lower().startswith("x-spam-")]
        for name in {name for name, _ in old}:
            headers.remove(name)
        if mode == "rename":
            for name, value in old:
                headers.add("X-Old-" + name[2:], value)

    def _add_headers(self, transaction, verdict):
        headers, score = transaction.headers, verdict["score"]
        if verdict["is_spam"]:
            headers.add("X-Spam-Flag", "YES")
        headers.add("X-Spam-Status", "%s, score=%s required=%s tests=%s" % (
            "Yes" if verdict["is_spam"] else "No", score, verdict["threshold"],
            ",".join(verdict["tests"]) or "none"))
        headers.add("X-Spam-Level", "*" * min(50, max(0, int(score))))
        munge = self.config["munge_subject_threshold"]
        if munge is not None and score >= munge:
            subject = headers.get("Subject") or ""
            headers.replace("Subject", f"{self.config['subject_prefix']} {subject}".strip())


def parse_answer(answer: bytes) -> dict:
    """``SPAMD/1.1 0 EX_OK`` + ``Spam: True ; 1000.0 / 5.0`` + the rule names -> the verdict."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("ascii", "replace").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 3 or not status[0].startswith("SPAMD/") or status[1] != "0":
        raise scanner.ScannerError(f"spamd answered {lines[0]!r}")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    try:
        flag, _, numbers = fields["Spam"].partition(";")
        score, _, threshold = numbers.partition("/")
        return {"is_spam": flag.strip().lower() in ("true", "yes"), "score": float(score),
                "threshold": float(threshold),
                "tests": [name for name in body.decode("ascii", "replace").strip().split(",") if name]}
    except (KeyError, ValueError):
        raise scanner.ScannerError(f"spamd answered without a verdict: {head[:200]!r}") from None

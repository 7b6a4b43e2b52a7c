"""Delivery status notifications (RFC 3464): the bounce a sender gets, as bytes.

Owns the composition of a ``multipart/report; report-type=delivery-status`` message:
a human-readable part, the ``message/delivery-status`` part (per-message fields, then
one block per recipient: Final-Recipient, Original-Recipient when ORCPT was given,
Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date), and the original
message (``message/rfc822``), or only its header (``text/rfc822-headers``) when the
sender asked ``RET=HDRS`` (RFC 3461 4.3). Pure: no I/O; the caller queues the result.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from email.utils import format_datetime, formatdate
from datetime import datetime, timezone

__all__ = ["Failure", "bounce", "status_of"]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
#: The original message is cut past this many octets (RFC 3462 allows returning part of it).
MAX_RETURNED = 1 << 20


@dataclass(frozen=True)
class Failure:
    """One recipient in a report."""

    address: str
    reply: str  #: the answer that decided it: "550 5.1.1 no such user", or ours
    remote_mta: str = ""  #: the server that answered, "" when we decided (no route, expired)
    orcpt: str | None = None  #: "rfc822;user@example.test" as the client gave it
    action: str = "failed"  #: failed, delayed, delivered, relayed (RFC 3464 2.3.3)
    last_attempt: float | None = None


def status_of(reply: str, action: str = "failed") -> str:
    """The RFC 3463 status of a reply: its enhanced code, else one from its class."""
    code, _, text = reply.partition(" ")
    match = _ENHANCED.match(text) or _ENHANCED.match(reply)
    if match:
        return ".".join(match.groups())
    first = code[:1]
    if first in "245" and first:
        return f"{first}.0.0"
    return "4.0.0" if action == "delayed" else "5.0.0"


def bounce(reporting_mta: str, to: str, failures: list[Failure], original: bytes, *,
           arrival: float, envid: str | None = None, ret: str | None = None,
           received_from: str = "", now: float | None = None) -> bytes:
    """The report for ``failures``, from MAILER-DAEMON@``reporting_mta`` to ``to``."""
    boundary = f"{secrets.token_hex(8)}/{reporting_mta}"
    delayed = all(f.action == "delayed" for f in failures)
    relayed = all(f.action in ("relayed", "delivered") for f in failures)
    subject = "Delayed Mail (still being retried)" if delayed else \
        "Successful Mail Delivery Report" if relayed else "Undelivered Mail Returned to Sender"
    header = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{to}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: <{secrets.token_hex(12)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: no automatic answers to this
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    human = [f"This is the mail system at {reporting_mta}.", ""]
    if delayed:
        human.append("Your message could not be delivered yet; it will be retried. No action is needed.")
    elif relayed:
        human.append("Your message was handed on to the recipients' mail system, which does not "
                     "send delivery reports: no further notice will come.")
    else:
        human.append("Your message could not be delivered to one or more recipients. It is attached below.")
    human.append("")
    for failure in failures:
        where = f" (said {failure.remote_mta})" if failure.remote_mta else ""
        human.append(f"<{failure.address}>{where}: {_one_line(failure.reply)}")
    per_message = [f"Reporting-MTA: dns; {reporting_mta}"]
    if envid:
        per_message.append(f"Original-Envelope-Id: {envid}")
    if received_from:
        per_message.append(f"Received-From-MTA: dns; {received_from}")
    per_message.append(f"Arrival-Date: {_date(arrival)}")
    blocks = ["\r\n".join(per_message)]
    for failure in failures:
        fields = [f"Final-Recipient: rfc822; {failure.address}"]
        if failure.orcpt:
            kind, _, value = failure.orcpt.partition(";")
            fields.append(f"Original-Recipient: {kind.strip()}; {value.strip()}")
        fields += [f"Action: {failure.action}", f"Status: {status_of(failure.reply, failure.action)}"]
        if failure.remote_mta:
            fields.append(f"Remote-MTA: dns; {failure.remote_mta}")
            fields.append(f"Diagnostic-Code: smtp; {_one_line(failure.reply)}")
        else:
            fields.append(f"Diagnostic-Code: X-qpgevent; {_one_line(failure.reply)}")
        if failure.last_attempt is not None:
            fields.append(f"Last-Attempt-Date: {_date(failure.last_attempt)}")
        blocks.append("\r\n".join(fields))
    headers_only = (ret or "").upper() == "HDRS"
    if headers_only:
        end = original.find(b"\r\n\r\n")
        returned, returned_type = (original[:end + 2] if end >= 0 else original), "text/rfc822-headers"
    else:
        returned, returned_type = original[:MAX_RETURNED], "message/rfc822"
    text = "\r\n".join(header) + "\r\n\r\n"
    text += f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + "\r\n".join(human) + "\r\n\r\n"
    text += f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n" + "\r\n\r\n".join(blocks) + "\r\n\r\n"
    text += f"--{boundary}\r\nContent-Type: {returned_type}\r\n\r\n"
    tail = f"\r\n--{boundary}--\r\n"
    body = returned if returned.endswith(b"\r\n") else returned + b"\r\n"
    return text.encode("utf-8") + body + tail.encode("ascii")


def _date(timestamp: float) -> str:
    return format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))


def _one_line(text: str) -> str:
    return " ".join(text.split())

"""Our Received trace header (RFC 5321 4.4): its text, and the ``received_line`` hook's say.

The protocol names are those of RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA) and RFC 6531
4.3 (UTF8SMTP...). A plugin may replace the whole value (qpsmtpd's ``received_line``):
``(OK, text)`` is written instead of ours; anything else keeps ours. qpsmtpd 0.94 lost
the header altogether when a plugin gave one; here it is always written, once.
"""

from __future__ import annotations

import email.utils
import re
import time

from .. import __version__
from ..connection import Connection
from ..transaction import Transaction


def protocol_name(connection: Connection, smtputf8: bool) -> str:
    """``with`` of the header: SMTP, ESMTP, UTF8SMTP, LMTP, plus S for TLS and A for AUTH (RFC 3848)."""
    esmtp = connection.hello in ("ehlo", "lhlo")
    name = "LMTP" if connection.hello == "lhlo" else "UTF8SMTP" if smtputf8 else "ESMTP" if esmtp else "SMTP"
    if connection.tls:
        name += "S"
    if connection.notes.get("auth_user") and esmtp:
        name += "A"
    return name


def received_line(connection: Connection, transaction: Transaction, me: str, smtputf8: bool) -> str:
    """The value of our Received header for ``transaction``."""
    protocol = protocol_name(connection, smtputf8)
    user = connection.notes.get("auth_user")
    if user and protocol.endswith("A"):
        protocol += f" (authenticated as {printable(user)})"
    helo = connection.hello_host or "unknown"
    if not _ADDRESS_LITERAL.fullmatch(helo):  # "[192.0.2.1]" stays; brackets elsewhere could forge ours
        helo = printable(helo)
    remote = printable(connection.remote_host or "unknown")
    if connection.remote_info:  # the ident answer, as sendmail writes it: user@host
        remote = f"{printable(connection.remote_info)}@{remote}"
    recipients = transaction.recipients
    recipient = f"\n\tfor {recipients[0].format()}" if len(recipients) == 1 else ""
    return (f"from {helo} ({remote} [{connection.remote_ip}])\n"
            f"\tby {me} (qpgevent {__version__}) with {protocol} id {transaction.id}"
            f"{recipient};\n\t{received_date()}")


def printable(text: str) -> str:
    """Client text fit for our Received comment: no control characters, nothing that
    could open or close a comment or an address literal of its own."""
    if text.isprintable() and not _COMMENT_OR_LITERAL.search(text):  # most names: nothing to replace
        return text[:255]
    return "".join(c if c.isprintable() and c not in "()[]" else "?" for c in text)[:255]


_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:)?[0-9A-Fa-f:.]{2,45}\]")
_COMMENT_OR_LITERAL = re.compile(r"[()\[\]]")


_date_second, _date_text = -1, ""  #: the wall-clock second received_date last made, and its text


def received_date() -> str:
    """``email.utils.formatdate(localtime=True)``, made once a second: every message's
    Received header needs it, and it costs more than the rest of the header."""
    global _date_second, _date_text
    now = time.time()
    if int(now) != _date_second:
        _date_second, _date_text = int(now), email.utils.formatdate(now, localtime=True)
    return _date_text

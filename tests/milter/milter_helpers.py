"""What the milter tests share: the ini text, a test message, sending it, reading the Maildir."""

from __future__ import annotations

import time

from qpgevent.testing import maildir_messages

RCPT_AND_QUEUE = """
[[rcpt_ok]]
  domains = example.test, example.org
[[queue/maildir]]
  path = Maildir
"""


def milter_ini(*milters: tuple[str, str], options: str = "", after: str = RCPT_AND_QUEUE) -> str:
    """The [[milter]] section with one sub-section per (name, address), then ``after``."""
    text = "[[milter]]\n"
    for name, address, *extra in milters:
        text += f"  [[[{name}]]]\n    address = {address}\n" + "".join(f"    {line}\n" for line in extra)
    return text + options + after


def message(subject: str = "dkim test", body: str = "Hello DKIM.", sender: str = "alice@example.test",
            extra: str = "") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Date: Tue, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{time.monotonic_ns()}@example.test>\r\n"
            f"{extra}\r\n{body}\r\n").encode()


def send(server, data: bytes, sender: str = "alice@example.test",
         recipients: tuple[str, ...] = ("bob@example.org",)) -> tuple[int, str]:
    with server.smtp(timeout=60) as client:
        client.ehlo("client.example.test")
        code, text = client.mail(sender)
        if code >= 400:
            return code, text.decode()
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code >= 400:
                return code, text.decode()
        code, text = client.data(data)
    return code, text.decode()


def delivered(server) -> list[bytes]:
    return list(maildir_messages(server.maildir).values())

"""Clients shared by the policy plugin tests (test_policy_*.py); the raw client and
``wait_until`` are qpgevent.testing's."""

from __future__ import annotations

import smtplib

from qpgevent.testing import RawClient

MESSAGE = b"Subject: test\r\nFrom: a@client.test\r\n\r\nhello\r\n"
ACCEPT = """
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""


def section(name: str, **options) -> str:
    lines = "".join(f"  {key} = {value}\n" for key, value in options.items())
    return f"[[{name}]]\n{lines}"


def smtp_from(server, source: str | None = None, timeout: float = 10) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, local_hostname="client.example.test",
                        source_address=(source, 0) if source else None, timeout=timeout)


def mail_rcpt(server, sender: str, recipients, source: str | None = None) -> list[tuple[int, bytes]]:
    """MAIL then RCPT for each recipient in one fresh session; the RCPT replies."""
    with smtp_from(server, source) as client:
        client.ehlo()
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        return [client.rcpt(recipient) for recipient in recipients]


def rcpt(server, recipient: str, sender: str = "a@client.test", source: str | None = None) -> tuple[int, bytes]:
    return mail_rcpt(server, sender, [recipient], source)[0]


def send(server, sender: str = "a@client.test", recipients=("bob@example.test",), message: bytes = MESSAGE,
         source: str | None = None) -> tuple[int, bytes]:
    """A whole transaction; the first refusal's reply, or the reply to the end of DATA."""
    with smtp_from(server, source) as client:
        client.ehlo()
        code, text = client.mail(sender)
        if code != 250:
            return code, text
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code != 250:
                return code, text
        try:
            return client.data(message)
        except smtplib.SMTPDataError as error:
            return error.smtp_code, error.smtp_error


def greeting(server, source: str | None = None) -> tuple[int, str]:
    """The first reply a new connection gets (then closed)."""
    client = RawClient(server, source)
    try:
        return client.reply()
    finally:
        client.close()

"""Sending mail through the in-process server for the service plugin tests, from a chosen
client address when a test needs one (through a PROXY header), and reading what was delivered."""

from __future__ import annotations

import smtplib
import socket
import time

from qpgevent.testing import maildir_messages

RCPT_AND_QUEUE = """
[[rcpt_ok]]
  domains = example.test, example.org
[[queue/maildir]]
  path = Maildir
"""


def message(subject: str = "lunch?", body: str = "hello", extra: str = "") -> bytes:
    return (f"From: a@example.test\r\nTo: b@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.monotonic_ns()}@example.test>\r\nDate: Tue, 25 Nov 2026 10:00:00 +0000\r\n"
            f"{extra}\r\n{body}\r\n").encode()


def smtp(server, client_ip: str | None = None, timeout: float = 60) -> smtplib.SMTP:
    """An smtplib client, through a PROXY v1 header naming ``client_ip`` when given (the
    server must trust 127.0.0.1 as a proxy: ``proxy_trusted="127.0.0.1"``)."""
    client = smtplib.SMTP(local_hostname="mail.example.test", timeout=timeout)
    if client_ip is None:
        client.connect(server.host, server.port)
        return client
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.sendall(f"PROXY TCP4 {client_ip} 127.0.0.1 40000 25\r\n".encode())
    client.sock, client.file = sock, None
    code, text = client.getreply()
    assert code == 220, (code, text)
    return client


def send(server, data: bytes, sender: str = "a@example.test", recipients=("b@example.test",),
         client_ip: str | None = None, helo: str = "mail.example.test") -> tuple[int, str]:
    """One message; the reply to the first refused command or to the end of DATA."""
    with smtp(server, client_ip) as client:
        code, text = client.ehlo(helo)
        if code != 250:
            return code, text.decode()
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            if code != 250:
                return code, text.decode()
        code, text = client.data(data)
    return code, text.decode()


def delivered(server) -> list[bytes]:
    return list(maildir_messages(server.maildir).values())


def header_block(data: bytes) -> str:
    """The header fields, each line ending in CRLF."""
    return data.split(b"\r\n\r\n", 1)[0].decode() + "\r\n"

"""Clients and waits shared by the policy plugin tests (test_policy_*.py)."""

from __future__ import annotations

import smtplib
import socket
import time

import gevent

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


class RawClient:
    """A bare SMTP client, for replies smtplib would turn into exceptions (421 at connect)."""

    def __init__(self, server, source: str | None = None) -> None:
        self.sock = socket.create_connection((getattr(server, "host", "127.0.0.1"), server.port), timeout=10,
                                             source_address=(source, 0) if source else None)
        self._buffer = b""

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            end = self._buffer.find(b"\r\n")
            if end < 0:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise EOFError(f"connection closed after {lines!r}")
                self._buffer += chunk
                continue
            line, self._buffer = self._buffer[:end].decode(), self._buffer[end + 2:]
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def command(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def greeting(server, source: str | None = None) -> tuple[int, str]:
    """The first reply a new connection gets (then closed)."""
    client = RawClient(server, source)
    try:
        return client.reply()
    finally:
        client.close()


def wait_for(condition, timeout: float, what: str, step: float = 0.05):
    """Poll ``condition`` until it is truthy; its value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        gevent.sleep(step)

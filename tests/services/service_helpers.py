"""Sending mail through the in-process server for the service plugin tests, from a chosen
client address when a test needs one (through a PROXY header), and reading what was delivered."""

from __future__ import annotations

import smtplib
import socket
import time

import gevent
from gevent.server import StreamServer

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


def proxied(server, client_ip: str, timeout: float = 60) -> socket.socket:
    """A socket to the server that has said, by a PROXY v1 header, that it comes from ``client_ip``."""
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.sendall(f"PROXY TCP4 {client_ip} 127.0.0.1 40000 25\r\n".encode())
    return sock


def greeting(server, client_ip: str) -> str:
    """The first line the server says to a client from ``client_ip``."""
    with proxied(server, client_ip) as sock:
        return sock.makefile("rb").readline().decode().rstrip("\r\n")


def smtp(server, client_ip: str | None = None, timeout: float = 60) -> smtplib.SMTP:
    """An smtplib client, through a PROXY v1 header naming ``client_ip`` when given (the
    server must trust 127.0.0.1 as a proxy: ``proxy_trusted="127.0.0.1"``)."""
    client = smtplib.SMTP(local_hostname="mail.example.test", timeout=timeout)
    client._host = server.host  # what SMTP(host) would have set: starttls() names it
    if client_ip is None:
        client.connect(server.host, server.port)
        return client
    client.sock, client.file = proxied(server, client_ip, timeout), None
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


class CountingProxy:
    """A TCP relay in front of a real daemon that counts the connections made through it
    and can cut them all (a server that closed an idle connection)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.connections = 0
        self._open: list[socket.socket] = []
        self.server = StreamServer(("127.0.0.1", 0), self._relay)
        self.server.start()
        self.address = f"127.0.0.1:{self.server.server_port}"

    def _relay(self, client: socket.socket, _address) -> None:
        self.connections += 1
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=30)
        self._open += [client, upstream]
        pump = gevent.spawn(_pump, upstream, client)
        _pump(client, upstream)
        pump.join()

    def drop_all(self) -> None:
        for sock in self._open:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
        self._open.clear()

    def close(self) -> None:
        self.drop_all()
        self.server.stop(timeout=0)


def _pump(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
        target.shutdown(socket.SHUT_WR)
    except OSError:
        return  # cut by drop_all, or the other side went away

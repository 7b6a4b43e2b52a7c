"""Crash safety of the real ``qpgevent`` command, run as a child process.

Two promises of queue/maildir and the session, checked from the outside:

- a client that vanishes in the middle of DATA (a FIN, or an RST through SO_LINGER 0)
  leaves nothing behind: no file in ``Maildir/new``, none in ``Maildir/tmp``, no spooled
  body; and the server goes on serving the next client;
- ``kill -9`` of the server while 20 clients send mail as fast as they can loses no
  message that was answered 250, duplicates none, and never leaves a partial file in
  ``new/`` (half-written files may only ever sit in ``tmp/``). Every message carries a
  unique id and the sha256 of its body, so completeness is checked byte for byte.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import smtplib
import socket
import struct
import time
from pathlib import Path

import gevent
import gevent.event
import pytest

from qpgevent.testing import maildir_messages, wait_until

RECIPIENT = "bob@example.test"


class RawClient:
    """A bare SMTP client on a socket: lets a test stop anywhere, even mid-message."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._buffer = b""

    def reply(self) -> tuple[int, bytes]:
        while True:
            end = self._buffer.find(b"\r\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end], self._buffer[end + 2:]
                if line[3:4] != b"-":
                    return int(line[:3]), line[4:]
                continue
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(f"connection closed; unread {self._buffer!r}")
            self._buffer += chunk

    def command(self, line: str) -> tuple[int, bytes]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def vanish(self, reset: bool) -> None:
        if reset:  # SO_LINGER on, 0 seconds: close() sends an RST, not a FIN
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


# -- a client vanishing mid-DATA ----------------------------------------------------

@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("cut", ["in_header", "in_body"])
def test_client_vanishing_mid_data_leaves_nothing_and_server_keeps_serving(
        server_process, tmp_path, reset, cut):
    # size_threshold 0: the body is spooled to a file at once, so a leaked spool file shows.
    server = server_process(size_threshold=0)
    spool = tmp_path / "spool" / "tmp"
    client = RawClient(server.port)
    assert client.reply()[0] == 220
    assert client.command("EHLO vanishing.example.test")[0] == 250
    assert client.command("MAIL FROM:<a@client.test>")[0] == 250
    assert client.command(f"RCPT TO:<{RECIPIENT}>")[0] == 250
    assert client.command("DATA")[0] == 354
    if cut == "in_header":
        client.sock.sendall(b"Subject: half a message\r\nX-Half: yes\r\nX-Cut-Here: no end")
        client.vanish(reset)
    else:
        client.sock.sendall(b"Subject: half a message\r\n\r\n" + b"a line of the body\r\n" * 2000
                            + b"and a line cut in the mid")
        # The server has the body in hand (spooled) before the client goes.
        wait_until(lambda: listing(spool), 10, "the body to be spooled")
        client.vanish(reset)
    wait_until(lambda: " disconnect: " in server.log(), 10, "the server to end the session")

    assert listing(server.maildir / "new") == []
    assert listing(server.maildir / "tmp") == []
    assert listing(spool) == []

    body = b"Subject: whole\r\n\r\nthe next client is served\r\n"
    with server.smtp() as next_client:
        assert next_client.sendmail("c@client.test", [RECIPIENT], body) == {}
    (content,) = maildir_messages(server.maildir).values()
    assert content.endswith(b"\r\n\r\nthe next client is served\r\n")
    assert listing(server.maildir / "tmp") == []
    assert listing(spool) == []
    assert server.process.poll() is None


# -- kill -9 under load -----------------------------------------------------------

CLIENTS = 20
ROUNDS = 3  # start, load, kill -9; again on the same Maildir
KILL_AFTER = 60  # messages answered 250 in a round before its kill
SIZES = (300, 4_000, 60_000, 400_000)  # a few large ones: the kill may land mid-write


def message_id(round_: int, client: int, number: int) -> str:
    return f"r{round_}-c{client:02d}-m{number:04d}"


def body_of(message_id: str) -> bytes:
    """A body that depends only on the id, so it can be recomputed when checking."""
    size = SIZES[int(hashlib.sha256(message_id.encode()).hexdigest(), 16) % len(SIZES)]
    line = f"{message_id} " + "0123456789abcdefghijklmnopqrstuvwxyz" * 2
    lines, total, number = [], 0, 0
    while total < size:
        text = f"{number:06d} {line}\r\n".encode()
        lines.append(text)
        total += len(text)
        number += 1
    return b"".join(lines)


def message_of(message_id: str) -> bytes:
    body = body_of(message_id)
    header = (f"Message-Id: <{message_id}@client.test>\r\nX-Test-Id: {message_id}\r\n"
              f"X-Body-SHA256: {hashlib.sha256(body).hexdigest()}\r\nSubject: crash {message_id}\r\n")
    return header.encode() + b"\r\n" + body


def parse_delivered(content: bytes) -> tuple[str, str, bytes]:
    """(id, body hash from the header, body) of a delivered file."""
    header, separator, body = content.partition(b"\r\n\r\n")
    assert separator, "no end of header: the file is truncated"
    fields = {}
    for line in header.split(b"\r\n"):
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().decode()
    return fields[b"x-test-id"], fields[b"x-body-sha256"], body


def run_until_killed(server, round_: int, attempted: set[str], accepted: list[str]) -> None:
    """20 clients send in a loop; SIGKILL the server once KILL_AFTER got a 250 this round."""
    enough = gevent.event.Event()
    accepted_before = len(accepted)

    def send_loop(client: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", server.port, local_hostname="crash.example.test",
                              timeout=30) as smtp:
                for number in range(2000):  # bounded; the kill ends it long before
                    ident = message_id(round_, client, number)
                    attempted.add(ident)
                    smtp.sendmail("crash@client.test", [RECIPIENT], message_of(ident))
                    accepted.append(ident)
                    if len(accepted) - accepted_before >= KILL_AFTER:
                        enough.set()
        except (smtplib.SMTPException, OSError):
            return  # the server died under us: expected

    clients = [gevent.spawn(send_loop, n) for n in range(CLIENTS)]
    assert enough.wait(60), f"only {len(accepted)} messages accepted in 60s:\n{server.log()}"
    # Aim the kill at a delivery in progress (a file in tmp/), if one shows up soon.
    tmp = server.maildir / "tmp"
    deadline = time.monotonic() + 5
    while not listing(tmp) and time.monotonic() < deadline:
        gevent.sleep(0)
    server.process.send_signal(signal.SIGKILL)
    assert server.wait(10) == -signal.SIGKILL
    done = gevent.joinall(clients, timeout=30)
    assert len(done) == CLIENTS, "clients still hanging after the server died"


def test_kill_9_under_load_loses_no_accepted_message_and_leaves_no_partial_file(server_process):
    attempted: set[str] = set()
    accepted: list[str] = []
    maildir = None
    for round_ in range(ROUNDS):  # the same Maildir, killed again and again
        server = server_process()
        maildir = server.maildir
        run_until_killed(server, round_, attempted, accepted)

    new, tmp = maildir / "new", maildir / "tmp"
    delivered = collections.Counter()
    for name, content in maildir_messages(maildir).items():
        ident, claimed_hash, body = parse_delivered(content)
        assert ident in attempted, name
        assert hashlib.sha256(body).hexdigest() == claimed_hash, f"{name} ({ident}) is incomplete"
        assert body == body_of(ident), f"{name} ({ident}) differs from what was sent"
        assert content.startswith(b"Return-Path: <crash@client.test>\r\nReceived: "), name
        delivered[ident] += 1
    assert len(accepted) >= ROUNDS * KILL_AFTER
    assert len(set(accepted)) == len(accepted)
    lost = [ident for ident in accepted if delivered[ident] == 0]
    assert lost == [], f"{len(lost)} message(s) answered 250 but not in new/"
    duplicated = [ident for ident, count in delivered.items() if count > 1]
    assert duplicated == []
    # Half-written files may stay in tmp/ (the Maildir contract), never under new/.
    assert set(listing(tmp)).isdisjoint(listing(new))

    # A restarted server on the same Maildir delivers again; fresh tmp/ files are kept.
    leftovers = listing(tmp)
    restarted = server_process()
    with restarted.smtp() as smtp:
        assert smtp.sendmail("after@client.test", [RECIPIENT], message_of("after-restart")) == {}
    assert len(maildir_messages(maildir)) == sum(delivered.values()) + 1
    assert listing(tmp) == leftovers

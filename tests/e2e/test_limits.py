"""Every limit of the [limits] section, hit by a real client against the real server.

Each test pushes one limit over its edge, checks the exact reply (code and RFC 3463
enhanced code), and then shows that what should go on does go on: the same session
for the limits that refuse one command or one message, the server (a new client) for
the limits that end the session.
"""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from qpgevent.testing import DEFAULT_PLUGINS, maildir_messages, strip_trace

SENDER = "a@client.test"
RECIPIENT = "bob@example.test"


def message_of(size: int, subject: str = "sized") -> bytes:
    """A message of exactly ``size`` octets, CRLF line endings, lines of 80 octets or less."""
    message = bytearray(f"Subject: {subject}\r\n\r\n".encode())
    while len(message) < size:
        room = size - len(message)
        line_length = min(80, room)
        # A line is at least its CRLF; a 1-octet remainder goes on the previous line.
        if room - line_length == 1:
            line_length -= 2
        message += b"y" * (line_length - 2) + b"\r\n"
    assert len(message) == size
    return bytes(message)


def assert_closed(client: smtplib.SMTP) -> None:
    """The server closed the connection cleanly (EOF), with nothing more to say."""
    with pytest.raises(smtplib.SMTPServerDisconnected, match=r"^Connection unexpectedly closed$"):
        client.getreply()


def deliver(server, subject: str) -> None:
    """A whole message from a new client: the server is still serving."""
    body = f"Subject: {subject}\r\n\r\nstill here\r\n".encode()
    with server.smtp() as client:
        assert client.sendmail(SENDER, [RECIPIENT], body) == {}
    assert body in {strip_trace(m) for m in maildir_messages(server.maildir).values()}


def read_to_eof(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_max_connections_refuses_the_extra_client_at_once_then_serves_again(make_server):
    server = make_server(max_connections=2)
    first, second = server.smtp(timeout=5), server.smtp(timeout=5)
    started = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=5) as third:
        refusal = read_to_eof(third)
    # Answered and closed, not left waiting in the backlog until the client gives up.
    assert time.monotonic() - started < 2
    assert refusal.startswith(b"421 4.3.2 ") and refusal.count(b"\r\n") == 1
    assert first.noop()[0] == 250 and second.noop()[0] == 250

    assert first.docmd("QUIT")[0] == 221
    assert first.sock.recv(1) == b""  # the server closed its side: that session is over
    first.close()
    with server.smtp(timeout=5) as fourth:
        assert fourth.sendmail(SENDER, [RECIPIENT], b"Subject: fourth\r\n\r\nin\r\n") == {}
    second.quit()
    assert len(maildir_messages(server.maildir)) == 1


def test_command_timeout_says_421_and_closes(make_server):
    server = make_server(command_timeout=0.3)
    with server.smtp(timeout=5) as client:
        assert client.ehlo()[0] == 250
        started = time.monotonic()
        code, text = client.getreply()  # we say nothing: the server speaks first
        waited = time.monotonic() - started
        assert (code, text) == (421, b"4.4.2 mx.example.test Timeout, closing connection")
        assert 0.2 <= waited < 3
        assert_closed(client)
    deliver(server, "after a timeout")


def test_data_timeout_drops_the_stalled_message(make_server):
    # A long command_timeout: only data_timeout can end this session quickly.
    server = make_server(command_timeout=30, data_timeout=0.3)
    with server.smtp(timeout=5) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        assert client.docmd("DATA")[0] == 354
        client.send(b"Subject: stalled\r\n\r\nhalf a li")
        started = time.monotonic()
        code, text = client.getreply()
        assert time.monotonic() - started < 3
        assert code == 421 and text.startswith(b"4.4.2 ") and b"Timeout" in text
        assert_closed(client)
    assert maildir_messages(server.maildir) == {}
    assert list((server.maildir / "tmp").iterdir()) == []
    deliver(server, "after a data timeout")
    assert len(maildir_messages(server.maildir)) == 1


def test_max_message_size_refuses_at_mail_and_after_the_dot_then_delivers(make_server):
    limit = 10_000
    server = make_server(max_message_size=limit)
    exact = message_of(limit, "exactly the limit")
    with server.smtp(timeout=5) as client:
        client.ehlo()
        assert client.esmtp_features["size"] == str(limit)  # RFC 1870 4: SIZE advertises it
        # RFC 1870 6.1: a declared size over the limit is refused at MAIL.
        code, text = client.mail(SENDER, [f"SIZE={limit + 1}"])
        assert code == 552 and text.startswith(b"5.3.4 ")
        for size in (limit + 1, 10 * limit):
            # No SIZE: the message streams past the limit; RFC 1870 6.3: 552 after the dot.
            assert client.mail(SENDER)[0] == 250
            assert client.rcpt(RECIPIENT)[0] == 250
            code, text = client.data(message_of(size, "too big"))
            assert code == 552 and text.startswith(b"5.3.4 "), size
        assert client.mail(SENDER, [f"SIZE={limit}"])[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        assert client.data(exact)[0] == 250
    (delivered,) = maildir_messages(server.maildir).values()
    assert strip_trace(delivered) == exact


def test_max_recipients_default_takes_100_and_refuses_the_101st(make_server):
    # RFC 5321 4.5.3.1.8: at least 100 recipients; 4.5.3.1.10: past the limit, 452.
    server = make_server()
    recipients = [f"user{n}@example.test" for n in range(101)]
    with server.smtp(timeout=5) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        for recipient in recipients[:100]:
            assert client.rcpt(recipient)[0] == 250, recipient
        code, text = client.rcpt(recipients[100])
        assert code == 452 and text.startswith(b"4.5.3 ")
        assert client.data(b"Subject: to 100\r\n\r\nhi\r\n")[0] == 250
        # The count is per transaction: the next one starts from zero.
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(recipients[100])[0] == 250
        assert client.data(b"Subject: to the 101st\r\n\r\nhi\r\n")[0] == 250
    assert len(maildir_messages(server.maildir)) == 2


@pytest.mark.parametrize("limit", [None, 1024])
def test_max_command_line_refuses_one_octet_more_and_goes_on(make_server, limit):
    server = make_server() if limit is None else make_server(max_command_line=limit)
    limit = limit or 512  # RFC 5321 4.5.3.1.4: 512 octets, CRLF included
    padding = limit - len("NOOP \r\n")
    with server.smtp(timeout=5) as client:
        client.ehlo()
        assert client.docmd("NOOP", "x" * padding)[0] == 250
        assert client.docmd("NOOP", "x" * (padding + 1)) == (500, b"5.5.2 Line too long")
        # A line far past the limit, in many pieces: one reply, and no buffering without end.
        for _ in range(20):
            client.send(b"x" * 10_000)
        assert client.docmd("NOOP") == (500, b"5.5.2 Line too long")  # this NOOP only ends that line
        assert client.noop()[0] == 250
        assert client.sendmail(SENDER, [RECIPIENT], b"Subject: after\r\n\r\nlong lines\r\n") == {}
    assert len(maildir_messages(server.maildir)) == 1


@pytest.mark.parametrize("limit", [None, 4000])
def test_max_text_line_refuses_the_message_and_delivers_the_next(make_server, limit):
    server = make_server() if limit is None else make_server(max_text_line=limit)
    limit = limit or 1000  # RFC 5321 4.5.3.1.6: 1000 octets, CRLF included
    longest = b"Subject: longest\r\n\r\n" + b"z" * (limit - 2) + b"\r\nend\r\n"
    too_long = b"Subject: too long\r\n\r\n" + b"z" * (limit - 1) + b"\r\nend\r\n"
    with server.smtp(timeout=5) as client:
        client.ehlo()
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        code, text = client.data(too_long)
        assert (code, text[:6]) == (500, b"5.5.2 ")
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt(RECIPIENT)[0] == 250
        assert client.data(longest)[0] == 250
    (delivered,) = maildir_messages(server.maildir).values()
    assert strip_trace(delivered) == longest


def test_max_bad_commands_closes_with_421(make_server):
    server = make_server(max_bad_commands=3)
    with server.smtp(timeout=5) as client:
        assert client.docmd("MAIL FROM:<a@client.test>")[0] == 503  # 1: no EHLO yet
        assert client.ehlo()[0] == 250  # good commands do not wipe the slate
        assert client.docmd("RCPT TO:<bob@example.test>")[0] == 503  # 2: no MAIL yet
        assert client.docmd("VRFY")[0] == 501  # 3: VRFY needs an argument
        code, text = client.getreply()
        assert code == 421 and text.startswith(b"4.7.0 ")
        assert_closed(client)
    # The budget belongs to the session: a new client starts with all of it.
    with server.smtp(timeout=5) as client:
        assert client.docmd("MAIL FROM:<a@client.test>")[0] == 503
        assert client.docmd("VRFY")[0] == 501
        assert client.sendmail(SENDER, [RECIPIENT], b"Subject: two mistakes\r\n\r\nok\r\n") == {}
    assert len(maildir_messages(server.maildir)) == 1


def test_count_unrecognized_commands_says_521_at_the_fourth(make_server):
    server = make_server("[[count_unrecognized_commands]]\n" + DEFAULT_PLUGINS)
    with server.smtp(timeout=5) as client:
        client.ehlo()
        for verb in ("XYZZY", "PLUGH", "FROBOZZ"):
            assert client.docmd(verb) == (500, b"5.5.1 Unrecognized command"), verb
        code, text = client.docmd("GRUE")
        assert code == 521
        assert text.startswith(b"5.5.1 Closing connection, 4 unrecognized commands.")
        assert_closed(client)
    # The count lives in the connection notes: a new client starts again from zero.
    with server.smtp(timeout=5) as client:
        assert client.docmd("XYZZY")[0] == 500
        assert client.sendmail(SENDER, [RECIPIENT], b"Subject: one unknown\r\n\r\nok\r\n") == {}
    assert len(maildir_messages(server.maildir)) == 1

"""SMTP smuggling, over a real socket to the real server (rcpt_ok + queue/maildir).

The attack: a message holding a fake end of data (``\\n.\\n``, ``\\r.\\r\\n``, ...) followed
by a second MAIL/RCPT/DATA. A receiver that takes the fake end for the real one (RFC
5321 4.1.1.4 says only CRLF.CRLF ends the data) delivers two messages where the
sending server saw one, the second with a forged envelope. Here each variant must get
exactly ONE reply after the real CRLF.CRLF, the 550 5.6.0 refusal by default
(``allow_bare_lf = no``), nothing in the Maildir, and the session must go on. With
``allow_bare_lf = yes`` the bytes are message text: one message, delivered once.
Over-long lines (RFC 5321 4.5.3.1.4 and .6) get 500 5.5.2 and the session goes on.
"""

from __future__ import annotations

import pytest

from qpgevent.testing import maildir_messages, strip_trace

# tests/ is on sys.path (tests/conftest.py lives there; see transcript_replay's docstring).
from transcript_replay import SocketPeer

SMUGGLED = (b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n")
#: fake end of data -> what it is as message text. After a CRLF, a line that starts
#: with a dot loses that dot (RFC 5321 4.5.2); nothing else changes.
VARIANTS = {
    "LF.LF": (b"\n.\n", b"\n.\n"),
    "LF.CRLF": (b"\n.\r\n", b"\n.\r\n"),
    "CR.CRLF": (b"\r.\r\n", b"\r.\r\n"),
    "CRLF.LF": (b"\r\n.\n", b"\r\n\n"),
    "CRLF.CR": (b"\r\n.\r", b"\r\n\r"),
    "CR.LF": (b"\r.\n", b"\r.\n"),
    "CRLF.CRCRLF": (b"\r\n.\r\r\n", b"\r\n\r\r\n"),
    "LF..LF": (b"\n..\n", b"\n..\n"),
}
OUTER = b"Subject: outer\r\n\r\nhello"
CLEAN = b"Subject: clean\r\n\r\nnothing odd here\r\n"


def read_reply(peer: SocketPeer) -> list[str]:
    """The lines of one (possibly multi-line) reply."""
    lines = []
    while True:
        line = peer.read_line()
        assert line is not None, f"connection closed after {lines}"
        lines.append(line)
        if line[3:4] != "-":
            return lines


def command(peer: SocketPeer, line: bytes) -> list[str]:
    peer.send(line + b"\r\n")
    return read_reply(peer)


@pytest.fixture
def connect():
    peers = []

    def open_session(server) -> SocketPeer:
        """A raw client, greeted and past EHLO."""
        peer = SocketPeer(server.host, server.port)
        peers.append(peer)
        assert read_reply(peer)[0].startswith("220 ")
        assert command(peer, b"EHLO client.example.test")[-1] == "250 DSN"
        return peer

    yield open_session
    for peer in peers:
        peer.close()


def start_data(peer: SocketPeer) -> None:
    assert command(peer, b"MAIL FROM:<alice@client.test>")[0].startswith("250 2.1.0 ")
    assert command(peer, b"RCPT TO:<bob@example.test>")[0].startswith("250 2.1.5 ")
    assert command(peer, b"DATA") == ["354 go ahead"]


def deliver_clean_message_and_quit(peer: SocketPeer) -> None:
    """Proof that the session goes on: a normal message is accepted, QUIT is answered."""
    start_data(peer)
    peer.send(CLEAN + b".\r\n")
    assert read_reply(peer)[0].startswith("250 2.0.0 Queued as ")
    assert command(peer, b"QUIT")[0].startswith("221 ")
    assert peer.read_line() is None


def delivered(server) -> list[bytes]:
    return [strip_trace(m) for m in maildir_messages(server.maildir).values()]


@pytest.mark.parametrize("fake_end", [v[0] for v in VARIANTS.values()], ids=list(VARIANTS))
def test_smuggling_is_refused_whole_by_default(make_server, connect, fake_end):
    server = make_server()
    peer = connect(server)
    start_data(peer)
    peer.send(OUTER + fake_end + SMUGGLED + b".\r\n")
    assert read_reply(peer) == [
        "550 5.6.0 Message refused: bare LF or CR line ending; SMTP uses CRLF (RFC 5321 2.3.8)"]
    # Exactly one reply: had the fake end counted, the replies to the smuggled
    # MAIL/RCPT/DATA/end would come before this NOOP's.
    assert command(peer, b"NOOP") == ["250 2.0.0 OK"]
    assert delivered(server) == []
    deliver_clean_message_and_quit(peer)
    assert delivered(server) == [CLEAN]


@pytest.mark.parametrize("fake_end, as_text", list(VARIANTS.values()), ids=list(VARIANTS))
def test_with_allow_bare_lf_the_fake_end_is_just_text(make_server, connect, fake_end, as_text):
    server = make_server(allow_bare_lf="yes")
    peer = connect(server)
    start_data(peer)
    peer.send(OUTER + fake_end + SMUGGLED + b".\r\n")
    assert read_reply(peer)[0].startswith("250 2.0.0 Queued as ")
    assert command(peer, b"NOOP") == ["250 2.0.0 OK"]  # and no second message's replies
    assert delivered(server) == [OUTER + as_text + SMUGGLED]
    assert command(peer, b"QUIT")[0].startswith("221 ")


def test_fake_end_split_across_writes_is_still_refused(make_server, connect):
    # The reader keeps state between reads: a fake end cut in two changes nothing.
    server = make_server()
    peer = connect(server)
    start_data(peer)
    for piece in (OUTER + b"\r\n.", b"\n" + SMUGGLED[:20], SMUGGLED[20:] + b".", b"\r\n"):
        peer.send(piece)
    assert read_reply(peer)[0].startswith("550 5.6.0 ")
    assert command(peer, b"NOOP") == ["250 2.0.0 OK"]
    assert delivered(server) == []


def test_1001_octet_text_line_refuses_the_message_and_the_session_goes_on(make_server, connect):
    # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets with its CRLF.
    server = make_server()
    peer = connect(server)
    start_data(peer)
    line = b"x" * 999 + b"\r\n"
    assert len(line) == 1001
    peer.send(b"Subject: long\r\n\r\n" + line + b".\r\n")
    assert read_reply(peer) == ["500 5.5.2 Message line too long"]
    assert command(peer, b"NOOP") == ["250 2.0.0 OK"]
    assert delivered(server) == []
    deliver_clean_message_and_quit(peer)
    assert delivered(server) == [CLEAN]


def test_1000_octet_text_line_is_delivered(make_server, connect):
    server = make_server()
    peer = connect(server)
    start_data(peer)
    message = b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n"
    peer.send(message + b".\r\n")
    assert read_reply(peer)[0].startswith("250 2.0.0 Queued as ")
    assert delivered(server) == [message]


def test_513_octet_command_gets_500_and_the_session_goes_on(make_server, connect):
    # RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
    server = make_server()
    peer = connect(server)
    too_long = b"NOOP " + b"x" * 506
    assert len(too_long + b"\r\n") == 513
    assert command(peer, too_long) == ["500 5.5.2 Line too long"]
    assert command(peer, too_long[:-1]) == ["250 2.0.0 OK"]  # 512 octets: fine
    deliver_clean_message_and_quit(peer)
    assert delivered(server) == [CLEAN]


def test_overlong_mail_command_does_not_start_a_transaction(make_server, connect):
    # The dropped line must not be half-read: its tail is not taken for a command.
    server = make_server()
    peer = connect(server)
    padding = b"x" * 600
    assert command(peer, b"MAIL FROM:<" + padding + b"@client.test>") == ["500 5.5.2 Line too long"]
    assert command(peer, b"RCPT TO:<bob@example.test>") == ["503 5.5.1 MAIL first"]
    deliver_clean_message_and_quit(peer)

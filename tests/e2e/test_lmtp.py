"""LMTP server mode (RFC 2033) on a ``HOST:PORT/lmtp`` listener, over real sockets.

Python's smtplib.LMTP is the client: LHLO is the greeting (HELO and EHLO are 500), and
the end of the data gets one reply per accepted recipient, in RCPT order, each the
queue stage's outcome for that recipient (tests/data/plugins/refuse_recipient.py marks
some; queue/maildir delivers the rest). An SMTP listener of the same server is unchanged.
"""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest

from qpgevent.testing import InProcessServer, maildir_messages, write_ini
from qpgevent.testing.mta import Postfix, free_port, wait_until

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")
PLUGINS = "[[rcpt_ok]]\n  domains = example.test\n[[refuse_recipient]]\n[[queue/maildir]]\n  path = Maildir\n  mailbox = %l\n"
MESSAGE = b"From: a@client.test\r\nTo: bob@example.test\r\nSubject: lmtp\r\n\r\nHello over LMTP.\r\n"


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lmtp, smtp = free_port(), free_port()
    ini = write_ini(tmp_path, PLUGINS, plugin_dirs=PLUGIN_DIR,
                    listen=[f"127.0.0.1:{lmtp}/lmtp", f"127.0.0.1:{smtp}"])
    instance = InProcessServer(ini)
    try:
        yield instance, lmtp, smtp, tmp_path / "Maildir"  # one Maildir per local part
    finally:
        instance.stop(0.5)


def lmtp_client(port: int) -> smtplib.LMTP:
    client = smtplib.LMTP("127.0.0.1", port, local_hostname="client.example.test")
    client.sock.settimeout(30)
    return client


def end_of_data(client: smtplib.LMTP, sender: str, recipients: list[str]) -> list[tuple[int, bytes]]:
    """MAIL, RCPT for each, DATA, the message; then the replies to the final dot, one per recipient."""
    assert client.mail(sender)[0] == 250
    for recipient in recipients:
        assert client.rcpt(recipient)[0] == 250
    assert client.putcmd("data") is None and client.getreply()[0] == 354
    client.send(MESSAGE + b".\r\n")
    return [client.getreply() for _ in recipients]


def test_lhlo_then_two_recipients_get_two_replies_and_one_delivery(server):
    _, lmtp, _, maildir = server
    with lmtp_client(lmtp) as client:
        code, text = client.ehlo()  # smtplib.LMTP sends LHLO here
        assert code == 250 and b"PIPELINING" in text
        replies = end_of_data(client, "a@client.test", ["bob@example.test", "carol@example.test"])
        assert [code for code, _ in replies] == [250, 250]
        assert client.noop()[0] == 250  # nothing left unread: exactly two replies came
    for user in ("bob", "carol"):
        messages = maildir_messages(maildir / user)
        assert len(messages) == 1
        content = next(iter(messages.values()))
        assert b"Hello over LMTP." in content and b"with LMTP" in content


def test_one_refused_recipient_gets_its_own_reply_in_rcpt_order(server):
    _, lmtp, _, maildir = server
    with lmtp_client(lmtp) as client:
        client.ehlo()
        recipients = ["bob@example.test", "full@example.test", "gone@example.test", "carol@example.test"]
        replies = end_of_data(client, "a@client.test", recipients)
        assert [code for code, _ in replies] == [250, 452, 550, 250]
        assert b"4.2.2 mailbox full" in replies[1][1] and b"5.1.1" in replies[2][1]
    assert [len(maildir_messages(maildir / user)) for user in ("bob", "carol")] == [1, 1]
    assert not (maildir / "full").exists() and not (maildir / "gone").exists()


def test_a_broken_maildir_fails_its_recipient_only(server):
    """queue/maildir on LMTP: each Maildir on its own; carol's cannot be made (its new/ is a
    file), so carol gets 451 and bob, before and after her in RCPT order, 250."""
    _, lmtp, _, maildir = server
    (maildir / "carol").mkdir(parents=True)
    (maildir / "carol" / "new").write_bytes(b"not a folder")
    with lmtp_client(lmtp) as client:
        client.ehlo()
        replies = end_of_data(client, "a@client.test", ["bob@example.test", "carol@example.test",
                                                        "dave@example.test"])
        assert [code for code, _ in replies] == [250, 451, 250]
        assert b"4.3.0" in replies[1][1]
    assert [len(maildir_messages(maildir / user)) for user in ("bob", "dave")] == [1, 1]
    assert list((maildir / "carol" / "tmp").iterdir()) == []  # nothing left half-written


def test_every_recipient_refused_leaves_the_maildir_empty(server):
    _, lmtp, _, maildir = server
    with lmtp_client(lmtp) as client:
        client.ehlo()
        replies = end_of_data(client, "a@client.test", ["full@example.test", "gone@example.test"])
        assert [code for code, _ in replies] == [452, 550]
    assert not maildir.exists() or maildir_messages(maildir) == {}


def test_bdat_last_gets_one_reply_per_recipient(server):
    """RFC 3030 with LMTP: the LAST chunk ends the message as the dot does, so its replies
    are per recipient too; the chunk before it gets the one 250 of a chunk."""
    _, lmtp, _, maildir = server
    with lmtp_client(lmtp) as client:
        client.ehlo()
        assert client.has_extn("chunking")
        assert client.mail("a@client.test")[0] == 250
        for recipient in ("bob@example.test", "gone@example.test"):
            assert client.rcpt(recipient)[0] == 250
        head, tail = MESSAGE[:20], MESSAGE[20:]
        client.send(b"BDAT %d\r\n" % len(head) + head)
        assert client.getreply()[0] == 250
        client.send(b"BDAT %d LAST\r\n" % len(tail) + tail)
        assert [client.getreply()[0] for _ in range(2)] == [250, 550]
        assert client.noop()[0] == 250
    assert b"Hello over LMTP." in next(iter(maildir_messages(maildir / "bob").values()))


def test_helo_and_ehlo_are_refused_on_lmtp(server):
    _, lmtp, _, _ = server
    with socket.create_connection(("127.0.0.1", lmtp), timeout=30) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        for verb in (b"HELO", b"EHLO"):
            sock.sendall(verb + b" client.example.test\r\n")
            assert reader.readline().startswith(b"500")
        sock.sendall(b"LHLO client.example.test\r\n")
        line = reader.readline()
        while line.startswith(b"250-"):
            line = reader.readline()
        assert line.startswith(b"250 ")


def test_smtp_listener_of_the_same_server_is_unchanged(server):
    _, _, smtp, maildir = server
    with smtplib.SMTP("127.0.0.1", smtp, local_hostname="client.example.test", timeout=30) as client:
        assert client.docmd("LHLO", "client.example.test")[0] == 500
        assert client.ehlo()[0] == 250
        assert client.mail("a@client.test")[0] == 250
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.rcpt("full@example.test")[0] == 250
        code, _ = client.data(MESSAGE)
        assert code == 250  # one reply for the message, which every recipient then gets
        assert client.noop()[0] == 250
    assert [len(maildir_messages(maildir / user)) for user in ("bob", "full")] == [1, 1]
    assert b"with ESMTP" in next(iter(maildir_messages(maildir / "bob").values()))


def test_postfix_lmtp_client_delivers_into_our_maildirs(server):
    """Postfix's ``lmtp`` delivery agent hands example.test's mail to our /lmtp listener:
    one LMTP transaction, three recipients, three outcomes (sent, deferred, bounced)."""
    _, lmtp, _, maildir = server
    postfix = Postfix(["nobody@upstream.test"], main={
        "relay_domains": "example.test", "relay_transport": f"lmtp:inet:127.0.0.1:{lmtp}",
        "lmtp_lhlo_name": "relay.upstream.test", "debug_peer_list": "127.0.0.1"})
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="client.upstream.test", timeout=60) as client:
            refused = client.sendmail("nobody@upstream.test",
                                      ["bob@example.test", "full@example.test", "gone@example.test"], MESSAGE)
            assert refused == {}
        delivered = wait_until(lambda: list(maildir_messages(maildir / "bob").values()), 60,
                               f"bob's message in {maildir}\n{postfix.log()}")
        wait_until(lambda: "status=bounced" in postfix.log() and "status=deferred" in postfix.log(), 60,
                   f"Postfix's verdicts for full@ and gone@\n{postfix.log()}")
        log = postfix.log()
    finally:
        postfix.cleanup()
    [message] = delivered
    assert b"Hello over LMTP." in message and b"with LMTP" in message
    assert ": LHLO relay.upstream.test" in log, log[-3000:]
    lines = {who: next(line for line in log.splitlines() if f"to=<{who}@example.test>" in line and "status=" in line)
             for who in ("bob", "full", "gone")}
    assert "status=sent" in lines["bob"] and "250" in lines["bob"]
    assert "status=deferred" in lines["full"] and "452 4.2.2 mailbox full" in lines["full"]
    assert "status=bounced" in lines["gone"] and "550 5.1.1 no such mailbox" in lines["gone"]
    assert not (maildir / "full").exists() and not (maildir / "gone").exists()

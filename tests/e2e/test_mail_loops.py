"""Mail loops over real sockets: too many Received hops (``[limits] max_received``), and a
``Delivered-To:`` naming a recipient (``queue/maildir`` with ``delivered_to``).

The real server runs in this process, smtplib talks to it; what reached the Maildirs is
read from disk. A refused loop must leave nothing delivered, and the session goes on.
"""

from __future__ import annotations

from pathlib import Path

from qpgevent.testing import maildir_messages

SENDER, RECIPIENT = "a@client.test", "bob@example.test"


def hops(count: int) -> bytes:
    received = b"".join(b"Received: from hop%d.test by hop%d.test; Mon, 7 Dec 2026 04:00:00 +0000\r\n" % (i, i + 1)
                        for i in range(count))
    return received + b"Subject: loop?\r\n\r\nround and round\r\n"


def send(client, message: bytes, recipients=(RECIPIENT,)) -> tuple[int, bytes]:
    assert client.mail(SENDER)[0] == 250
    for recipient in recipients:
        assert client.rcpt(recipient)[0] == 250
    return client.data(message)


def test_the_default_hop_limit_is_postfix_s_100(make_server):
    server = make_server()
    with server.smtp(timeout=30) as client:
        client.ehlo()
        code, text = send(client, hops(101))
        assert code == 554 and text.startswith(b"5.4.6 ")
        assert maildir_messages(server.maildir) == {}
        assert send(client, hops(100))[0] == 250  # the session goes on; 100 hops are fine
    assert len(maildir_messages(server.maildir)) == 1


def test_max_received_is_configurable_and_zero_turns_it_off(make_server):
    server = make_server(max_received=3)
    with server.smtp(timeout=30) as client:
        client.ehlo()
        assert send(client, hops(4))[0] == 554
        assert send(client, hops(3))[0] == 250
    assert len(maildir_messages(server.maildir)) == 1
    unlimited = make_server(max_received=0)
    with unlimited.smtp(timeout=30) as client:
        client.ehlo()
        assert send(client, hops(300))[0] == 250


def maildirs(delivered_to: str = "yes") -> str:
    return ("[[rcpt_ok]]\n  domains = example.test\n"
            f"[[queue/maildir]]\n  path = mail\n  mailbox = %l\n  delivered_to = {delivered_to}\n")


def files(folder: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(folder.iterdir())] if folder.is_dir() else []


def test_delivered_to_is_added_per_maildir_and_a_message_naming_a_recipient_is_a_loop(make_server, tmp_path):
    server = make_server(maildirs())
    message = b"Subject: hello\r\n\r\nhi\r\n"
    with server.smtp(timeout=30) as client:
        client.ehlo()
        assert send(client, message, ("bob@example.test", "carol@example.test"))[0] == 250
        (bob,), (carol,) = files(tmp_path / "mail/bob/new"), files(tmp_path / "mail/carol/new")
        # Each Maildir names its own recipient only (no Bcc leaks through the header).
        assert bob.startswith(b"Return-Path: <a@client.test>\r\nDelivered-To: bob@example.test\r\nReceived: ")
        assert carol.startswith(b"Return-Path: <a@client.test>\r\nDelivered-To: carol@example.test\r\nReceived: ")
        # The same message comes back (a forward to itself): refused, nobody gets it again.
        code, text = send(client, b"Delivered-To: Carol@example.test\r\n" + message,
                          ("bob@example.test", "carol@example.test"))
        assert code == 554 and text.startswith(b"5.4.6 ") and b"carol@example.test" in text.lower()
        # Another recipient's Delivered-To is no loop for bob.
        assert send(client, b"Delivered-To: dave@example.test\r\n" + message)[0] == 250
    assert len(files(tmp_path / "mail/bob/new")) == 2 and len(files(tmp_path / "mail/carol/new")) == 1


def test_without_the_option_no_header_is_added_and_none_is_checked(make_server, tmp_path):
    server = make_server(maildirs("no"))
    with server.smtp(timeout=30) as client:
        client.ehlo()
        assert send(client, b"Delivered-To: bob@example.test\r\nSubject: x\r\n\r\nx\r\n")[0] == 250
    (bob,) = files(tmp_path / "mail/bob/new")
    assert bob.startswith(b"Return-Path: <a@client.test>\r\nReceived: ")

"""A real client (smtplib) against the real server: mail in, Maildir out."""

from email.message import EmailMessage

from qpgevent.testing import maildir_messages, strip_trace


def test_message_is_delivered_byte_exact_after_received(server):
    body = b"Subject: hello\r\nFrom: a@client.test\r\n\r\nline one\r\n.leading dot\r\nlast\r\n"
    with server.smtp() as client:
        client.sendmail("a@client.test", ["bob@example.test"], body)
    (content,) = maildir_messages(server.maildir).values()
    assert strip_trace(content) == body
    assert content.startswith(b"Return-Path: <a@client.test>\r\nReceived: from client.example.test")


def test_relaying_elsewhere_is_refused(server):
    with server.smtp() as client:
        client.ehlo()
        client.mail("a@client.test")
        code, text = client.rcpt("victim@elsewhere.test")
    assert (code, text) == (550, b"5.7.1 Relaying denied")
    assert maildir_messages(server.maildir) == {}


def test_email_message_with_several_recipients_is_one_file(server):
    message = EmailMessage()
    message["Subject"] = "two"
    message.set_content("hi\n")
    with server.smtp() as client:
        refused = client.send_message(message, "a@client.test", ["x@example.test", "y@example.test"])
    assert refused == {}
    assert len(maildir_messages(server.maildir)) == 1


def test_ehlo_advertises_extensions(server):
    with server.smtp() as client:
        code, _ = client.ehlo()
        assert code == 250
        for extension in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8"):
            assert client.has_extn(extension), extension


def test_smtputf8_address_is_accepted(server):
    with server.smtp() as client:
        client.ehlo()
        code, _ = client.mail("José@client.test", ["SMTPUTF8"])
        assert code == 250
        code, _ = client.rcpt("用户@example.test")
        assert code == 250
        code, _ = client.data(b"Subject: utf8\r\n\r\nbody\r\n")
        assert code == 250


def test_non_ascii_without_smtputf8_is_refused(server):
    with server.smtp() as client:
        client.ehlo()
        client.command_encoding = "utf-8"
        code, text = client.docmd("MAIL FROM:<José@client.test>")
    assert code == 553 and text.startswith(b"5.6.7")

"""queue/lmtp against a real LMTP server: Dovecot (Debian's dovecot-lmtpd), unprivileged.

Dovecot runs with a config of its own, every process as ``nobody``, LMTP on a loopback
port and on a unix socket. Its users are bob@ and alice@example.test, full@, whose quota
is 1 KiB: a real "mailbox full" that Dovecot reports after DATA, for that recipient only,
which is the case LMTP's per-recipient replies exist for; and one@, whose quota is one
message. LMTP answers 250 only
once the message is stored, so there is nothing to wait for afterwards.
"""

from __future__ import annotations

import smtplib

import pytest

from qpgevent.testing.mta import Dovecot

USERS = {"bob@example.test": "x", "alice@example.test": "x", "full@example.test": "x", "one@example.test": "x"}
QUOTA = {"full@example.test": "storage=1K", "one@example.test": "messages=1"}
FOUR_KB = (b"x" * 78 + b"\r\n") * 50


@pytest.fixture
def dovecot():
    started = []

    def start(**kwargs):
        instance = Dovecot(USERS, QUOTA, **kwargs)
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.cleanup()


def lmtp(target: str, *options: str) -> str:
    lines = "".join(f"  {option}\n" for option in options)
    return f"[[queue/lmtp]]\n  routes = *:{target}\n{lines}[[rcpt_ok]]\n  domains = example.test\n"


def tcp(instance: Dovecot) -> str:
    return f"127.0.0.1:{instance.lmtp_port}"


def send(server, recipients, message, sender="sender@client.test"):
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        for recipient in recipients:
            code, text = smtp.rcpt(recipient)
            if code != 250:
                return code, text
        return smtp.data(message)


def message(subject: str, body: bytes = b"hello\r\n.dot\r\n") -> bytes:
    return f"Subject: {subject}\r\nFrom: sender@client.test\r\n\r\n".encode() + body


def stored(instance: Dovecot, address: str) -> list[bytes]:
    """The messages in a mailbox, from our client's Subject on (Dovecot adds trace headers)."""
    return [m[m.index(b"Subject: "):].replace(b"\r\n", b"\n") for m in instance.messages(address)]


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


def test_delivers_over_tcp_with_every_recipient_accepted(make_server, dovecot):
    instance = dovecot()
    server = make_server(lmtp(tcp(instance)))
    code, text = send(server, ["bob@example.test", "alice@example.test"], message("tcp"))
    assert code == 250
    assert text.startswith(b"2.0.0 <bob@example.test> ") and text.endswith(b" Saved")
    assert stored(instance, "bob@example.test") == stored(instance, "alice@example.test") == [lf(message("tcp"))]
    (raw,) = instance.messages("bob@example.test")
    assert raw.startswith(b"Return-Path: <sender@client.test>\n")


def test_delivers_over_a_unix_socket_and_reuses_the_connection(make_server, dovecot):
    instance = dovecot()
    server = make_server(lmtp(str(instance.lmtp_socket)))
    big = message("big", b"".join(b"line %06d\r\n" % n for n in range(200000)))  # 2.4 MB, spooled
    for item in (message("one"), message("two"), big):
        assert send(server, ["alice@example.test"], item)[0] == 250
    # Each exactly once; Dovecot's file names do not keep the order within one second.
    assert sorted(stored(instance, "alice@example.test")) == sorted(lf(m) for m in (message("one"), message("two"), big))
    (plugin,) = [p for p in server.server.runner.plugins if p.name == "queue/lmtp"]
    assert plugin.relay.pool.opened == 1


def test_unknown_user_without_callahead(make_server, dovecot):
    instance = dovecot()
    server = make_server(lmtp(tcp(instance)))
    # Alone, refused for good: Dovecot's 5xx, passed on after DATA.
    assert send(server, ["nobody@example.test"], message("nobody")) == (
        554, b"5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test")
    # With a good recipient: nothing is sent (RSET before DATA), 4xx for the retry.
    code, text = send(server, ["bob@example.test", "nobody@example.test"], message("mixed"))
    assert code == 451
    assert text.startswith(b"4.3.0 <nobody@example.test> was refused by the next hop (550 ")
    assert instance.messages("bob@example.test") == []


def test_callahead_refuses_unknown_users_at_rcpt(make_server, dovecot):
    instance = dovecot()
    server = make_server(lmtp(tcp(instance), "callahead = yes"))
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        assert smtp.rcpt("nobody@example.test") == (
            550, b"5.1.1 <nobody@example.test> User doesn't exist: nobody@example.test")
        assert smtp.rcpt("bob@example.test")[0] == 250
        assert smtp.data(message("checked"))[0] == 250
    assert stored(instance, "bob@example.test") == [lf(message("checked"))]


def test_a_full_mailbox_after_data_makes_a_4xx_and_the_others_have_it(make_server, dovecot):
    """Mixed LMTP replies: the policy is 451 (a duplicate on retry, never a loss)."""
    instance = dovecot()
    server = make_server(lmtp(tcp(instance)))
    code, text = send(server, ["bob@example.test", "full@example.test"], message("mixed", FOUR_KB))
    assert code == 451
    assert text == (b"4.3.0 not delivered to <full@example.test>: <full@example.test> Quota exceeded "
                    b"(mailbox for user is full)")
    assert len(instance.messages("bob@example.test")) == 1  # bob has it: the retry duplicates it
    assert instance.messages("full@example.test") == []
    # Alone, the full mailbox's refusal is passed on as it is: permanent.
    code, text = send(server, ["full@example.test"], message("full", FOUR_KB))
    assert (code, text[:6]) == (554, b"5.2.2 ")


def test_callahead_with_quota_checked_at_rcpt_avoids_the_duplicate(make_server, dovecot):
    instance = dovecot(rcpt_check_quota=True)
    server = make_server(lmtp(tcp(instance), "callahead = yes"))
    with smtplib.SMTP(server.host, server.port, local_hostname="client.example.test", timeout=60) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        assert smtp.rcpt("bob@example.test")[0] == 250
        assert smtp.rcpt("one@example.test")[0] == 250  # its one message fits
        assert smtp.data(message("fills it"))[0] == 250
        smtp.mail("sender@client.test")
        assert smtp.rcpt("bob@example.test")[0] == 250
        code, text = smtp.rcpt("one@example.test")  # full now: refused here, to it alone
        assert (code, text[:6]) == (550, b"5.2.2 ")
        assert smtp.data(message("second"))[0] == 250
    assert sorted(stored(instance, "bob@example.test")) == sorted([lf(message("fills it")), lf(message("second"))])
    assert stored(instance, "one@example.test") == [lf(message("fills it"))]


def test_dovecot_stopped_is_a_4xx_and_the_retry_works(make_server, dovecot):
    instance = dovecot()
    server = make_server(lmtp(tcp(instance)))
    assert send(server, ["bob@example.test"], message("before"))[0] == 250
    instance.stop()
    assert send(server, ["bob@example.test"], message("during")) == (
        451, b"4.4.1 the next hop is not available, try again later")
    instance.start()
    assert send(server, ["bob@example.test"], message("during"))[0] == 250
    assert sorted(stored(instance, "bob@example.test")) == sorted([lf(message("before")), lf(message("during"))])


def test_bad_routes_are_load_errors(make_server):
    from qpgevent.core.errors import PluginLoadError
    with pytest.raises(PluginLoadError, match=r"queue/lmtp.*routes is empty"):
        make_server("[[queue/lmtp]]\n")
    with pytest.raises(PluginLoadError, match=r"route 'example\.test' is not DOMAIN:HOST"):
        make_server("[[queue/lmtp]]\n  routes = example.test\n")
    with pytest.raises(PluginLoadError, match=r"unix socket routes are for LMTP"):
        make_server("[[queue/smtp_forward]]\n  routes = *:/run/socket\n")

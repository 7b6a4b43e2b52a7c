"""queue/smtp_forward against a real Postfix on loopback (Debian's postfix, private config).

Each Postfix is started by the test from a folder of its own (``postfix -c DIR start-fg``),
listens on a free loopback port, and delivers with its ``virtual`` agent into Maildirs;
its mailboxes are bob@ and alice@example.test, busy@ is refused with a 450 and anyone
else with Postfix's own ``550 5.1.1 User unknown``. qpgevent runs in this process
(``make_server``) and real smtplib clients talk to it. Postfix delivers after its 250, in
the background, so tests wait for the Maildir file (bounded) rather than sleep.
"""

from __future__ import annotations

import re
import smtplib

import gevent
import pytest

from qpgevent.testing.mta import Dovecot, Postfix, free_port, make_certificates, wait_until

MAILBOXES = ["bob@example.test", "alice@example.test"]
ACCESS = {"busy@example.test": "450 4.2.1 busy@example.test: mailbox busy, try later"}


def forward(postfix: Postfix, *options: str, host: str = "127.0.0.1", domain: str = "example.test",
            port: int | None = None) -> str:
    """[plugins] with smtp_forward (before rcpt_ok, as its docs ask) to ``postfix``."""
    lines = "".join(f"  {option}\n" for option in options)
    return (f"[[queue/smtp_forward]]\n  routes = {domain}:{host}:{port or postfix.port}\n{lines}"
            "[[rcpt_ok]]\n  domains = example.test, other.test\n")


@pytest.fixture(scope="module")
def postfix():
    instance = Postfix(MAILBOXES, access=ACCESS)
    try:
        yield instance.start()
    finally:
        instance.cleanup()


@pytest.fixture
def fresh_postfix():
    """A Postfix of the test's own, for tests that stop it or count its connections."""
    started = []

    def start(**kwargs):
        instance = Postfix(kwargs.pop("mailboxes", MAILBOXES), access=ACCESS, **kwargs)
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.cleanup()


def client(server, source: str = "127.0.0.2") -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, local_hostname="client.example.test",
                        source_address=(source, 0), timeout=60)


def send(server, recipients: list[str], message: bytes, sender: str = "sender@client.test"):
    """One transaction; (code, text) of DATA, or of the first refused step."""
    with client(server) as smtp:
        smtp.ehlo()
        smtp.mail(sender)
        for recipient in recipients:
            code, text = smtp.rcpt(recipient)
            if code != 250:
                return code, text
        return smtp.data(message)


def body_of(delivered: bytes) -> bytes:
    """What our client sent, from a Postfix Maildir file (LF line ends, its trace headers
    and our Received header on top)."""
    marker = delivered.index(b"\nSubject: ")
    return delivered[marker + 1:]


def lf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return f"Subject: {subject}\r\nFrom: sender@client.test\r\nTo: bob@example.test\r\n\r\n".encode() + body


def test_forwarded_messages_arrive_complete(make_server, postfix):
    server = make_server(forward(postfix), size_threshold=4096)
    small = message("small")
    # Dots at line starts (stuffed twice over the wire), 8-bit text, a body spilled to disk.
    tricky = message("tricky", b".\r\n..two dots\r\n.a\r\n" + "h\u00e9h\u00e9\r\n".encode() * 3)
    big = message("big", b"".join(b"%07d " % n + b"x" * 70 + b"\r\n" + (b".dot\r\n" if n % 100 == 0 else b"")
                                  for n in range(30000)))
    for item in (small, tricky, big):
        code, text = send(server, ["bob@example.test"], item)
        assert code == 250, text
        assert re.search(rb"^2\.0\.0 Ok: queued as \w+$", text), text
    delivered = postfix.wait_for_messages("bob@example.test", 3)
    bodies = sorted(body_of(m) for m in delivered)
    assert bodies == sorted(lf(m) for m in (small, tricky, big))
    assert all(b"by mx.example.test (qpgevent" in m for m in delivered)  # our Received went along


def test_several_recipients_one_transaction(make_server, postfix):
    server = make_server(forward(postfix))
    before = {a: len(postfix.messages(a)) for a in MAILBOXES}
    assert send(server, MAILBOXES, message("both"))[0] == 250
    for address in MAILBOXES:
        delivered = postfix.wait_for_messages(address, before[address] + 1)
        assert body_of(delivered[-1]) == lf(message("both"))


def test_postfix_stopped_gives_4xx_nothing_lost_and_the_retry_succeeds(make_server, fresh_postfix):
    postfix = fresh_postfix()
    server = make_server(forward(postfix))
    assert send(server, ["bob@example.test"], message("before"))[0] == 250
    postfix.stop()
    # The pooled connection is dead now, and nothing listens: a 4xx, so the client keeps it.
    assert send(server, ["bob@example.test"], message("during")) == (
        451, b"4.4.1 the next hop is not available, try again later")
    postfix.start()
    assert send(server, ["bob@example.test"], message("during"))[0] == 250
    delivered = postfix.wait_for_messages("bob@example.test", 2)
    assert sorted(body_of(m) for m in delivered) == sorted(lf(message(s)) for s in ("before", "during"))


def test_postfix_stopping_mid_session_answers_4xx(make_server, fresh_postfix):
    """Postfix goes away between our client's RCPT and the end of its DATA."""
    postfix = fresh_postfix()
    server = make_server(forward(postfix))
    with client(server) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        assert smtp.rcpt("bob@example.test")[0] == 250
        postfix.stop()
        assert smtp.data(message("lost?"))[0] == 451
    postfix.start()
    assert postfix.messages("bob@example.test") == []


def test_callahead_refuses_what_postfix_refuses_word_for_word(make_server, postfix):
    server = make_server(forward(postfix, "callahead = yes"))
    before = len(postfix.messages("bob@example.test"))
    with client(server) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        assert smtp.rcpt("nobody@example.test") == (
            550, b"5.1.1 <nobody@example.test>: Recipient address rejected: "
                 b"User unknown in virtual mailbox table")
        assert smtp.rcpt("busy@example.test") == (
            450, b"4.2.1 <busy@example.test>: Recipient address rejected: "
                 b"busy@example.test: mailbox busy, try later")
        assert smtp.rcpt("bob@example.test")[0] == 250
        assert smtp.data(message("callahead"))[0] == 250
    delivered = postfix.wait_for_messages("bob@example.test", before + 1)
    assert body_of(delivered[-1]) == lf(message("callahead"))


def test_callahead_does_not_grant_relaying(make_server, postfix):
    # Postfix would take mail for elsewhere.test from us (mynetworks); rcpt_ok still says no.
    server = make_server(forward(postfix, "callahead = yes", domain="*"))
    with client(server) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        assert smtp.rcpt("someone@elsewhere.test")[0] == 550


def test_without_callahead_a_refused_recipient_fails_the_whole_message(make_server, postfix):
    server = make_server(forward(postfix))
    before = len(postfix.messages("bob@example.test"))
    code, text = send(server, ["bob@example.test", "nobody@example.test"], message("mixed"))
    assert code == 451
    assert text.startswith(b"4.3.0 <nobody@example.test> was refused by the next hop (550 ")
    # Only nobody@ refused, for good: Postfix's 5xx, passed on.
    code, text = send(server, ["nobody@example.test"], message("nobody"))
    assert (code, text[:6]) == (554, b"5.1.1 ")
    assert b"User unknown in virtual mailbox table" in text
    # Nothing reached bob: the mixed message was not sent at all (RSET, not DATA).
    assert send(server, ["bob@example.test"], message("marker"))[0] == 250
    delivered = postfix.wait_for_messages("bob@example.test", before + 1)
    assert [body_of(m) for m in delivered[before:]] == [lf(message("marker"))]


def test_xforward_tells_postfix_who_the_client_was(make_server, postfix):
    server = make_server(forward(postfix))
    code, text = send(server, ["alice@example.test"], message("xforward"))
    queue_id = text.rsplit(b" ", 1)[1].decode()
    line = wait_until(lambda: re.search(rf"{queue_id}: client=\S+, orig_queue_id=\S+, orig_client=(\S+)", postfix.log()),
                      30, "Postfix's log line for the forwarded message")
    assert line.group(1) == "unknown[127.0.0.2]"


def test_xclient_makes_postfix_see_the_client(make_server, fresh_postfix):
    postfix = fresh_postfix()
    server = make_server(forward(postfix, "forward_client = xclient, xforward"))
    ids = []
    for n in range(2):  # XCLIENT allows no reuse: a new connection each time, both work
        code, text = send(server, ["bob@example.test"], message(f"xclient {n}"))
        assert code == 250, text
        ids.append(text.rsplit(b" ", 1)[1].decode())
    for queue_id in ids:
        line = wait_until(lambda: re.search(rf"{queue_id}: client=(\S+)", postfix.log()), 30, "log line")
        assert line.group(1) == "unknown[127.0.0.2]"
    postfix.wait_for_messages("bob@example.test", 2)


def plugin_of(server):
    (plugin,) = [p for p in server.server.runner.plugins if p.name == "queue/smtp_forward"]
    return plugin


def test_pool_reuses_connections_and_stays_bounded(make_server, fresh_postfix):
    postfix = fresh_postfix()
    server = make_server(forward(postfix, "pool_size = 4"))
    pool = plugin_of(server).relay.pool
    for n in range(5):
        assert send(server, ["bob@example.test"], message(f"serial {n}"))[0] == 250
    assert pool.opened == 1  # one connection, reset and reused
    jobs = [gevent.spawn(send, server, ["alice@example.test"], message(f"parallel {n}")) for n in range(40)]
    gevent.joinall(jobs, timeout=120, raise_error=True)
    assert [job.value[0] for job in jobs] == [250] * 40
    assert pool.opened <= 4
    assert len(postfix.wait_for_messages("alice@example.test", 40)) == 40


def test_starttls_with_verification(make_server, fresh_postfix, tmp_path):
    ca, cert, key = make_certificates(tmp_path / "tls")
    postfix = fresh_postfix(tls=(cert, key))
    # "localhost" is the name in the certificate; 127.0.0.1 is in it too.
    server = make_server(forward(postfix, f"tls_ca_file = {ca}", "starttls = required", host="localhost"))
    assert send(server, ["bob@example.test"], message("tls"))[0] == 250
    (delivered,) = postfix.wait_for_messages("bob@example.test", 1)
    assert re.search(rb"\(using TLSv1\.[23] with cipher ", delivered)
    assert b"with ESMTPS id" in delivered


def test_starttls_that_cannot_be_verified_is_a_4xx_unless_told_otherwise(make_server, fresh_postfix, tmp_path):
    _, cert, key = make_certificates(tmp_path / "tls")
    postfix = fresh_postfix(tls=(cert, key))
    strict = make_server(forward(postfix))  # the system's CAs do not know our test CA
    assert send(strict, ["bob@example.test"], message("unverified")) == (
        451, b"4.4.1 the next hop is not available, try again later")
    assert postfix.messages("bob@example.test") == []
    relaxed = make_server(forward(postfix, "tls_verify = no"))
    assert send(relaxed, ["bob@example.test"], message("unverified but encrypted"))[0] == 250
    (delivered,) = postfix.wait_for_messages("bob@example.test", 1)
    assert b"with ESMTPS id" in delivered


def test_auth_to_a_postfix_that_requires_it(make_server, fresh_postfix, tmp_path):
    """Postfix's submission-style port takes mail only after AUTH (checked by a real
    Dovecot auth service) over STARTTLS."""
    dovecot = Dovecot({"relay@example.test": "s3cret"})
    try:
        dovecot.start()
        ca, cert, key = make_certificates(tmp_path / "tls")
        submission = free_port()
        postfix = fresh_postfix(tls=(cert, key), submission_port=submission, sasl=("127.0.0.1", dovecot.auth_port),
                                main={"smtpd_sasl_authenticated_header": "yes"})
        common = (f"tls_ca_file = {ca}", "auth_user = relay@example.test")
        good = make_server(forward(postfix, *common, "auth_password = s3cret", host="localhost", port=submission))
        assert send(good, ["bob@example.test"], message("authenticated"))[0] == 250
        (delivered,) = postfix.wait_for_messages("bob@example.test", 1)
        assert b"(Authenticated sender: relay@example.test)" in delivered
        # A wrong password is our configuration problem, not the client's: 4xx, keep it.
        bad = make_server(forward(postfix, *common, "auth_password = wrong", host="localhost", port=submission))
        assert send(bad, ["bob@example.test"], message("bad password")) == (
            451, b"4.4.1 the next hop is not available, try again later")
        # Without AUTH at all, Postfix refuses the recipient for good: its 5xx, passed on.
        anonymous = make_server(forward(postfix, f"tls_ca_file = {ca}", host="localhost", port=submission))
        code, text = send(anonymous, ["bob@example.test"], message("anonymous"))
        assert (code, text[:6]) == (554, b"5.7.1 ")
        assert postfix.messages("bob@example.test") == [delivered]
    finally:
        dovecot.cleanup()


def test_one_next_hop_per_transaction(make_server, fresh_postfix):
    here = fresh_postfix()
    there = fresh_postfix(mailboxes=["carol@other.test"])
    server = make_server(f"""
[[queue/smtp_forward]]
  routes = example.test:127.0.0.1:{here.port}, other.test:127.0.0.1:{there.port}
[[rcpt_ok]]
  domains = example.test, other.test
""")
    with client(server) as smtp:
        smtp.ehlo()
        smtp.mail("sender@client.test")
        assert smtp.rcpt("bob@example.test")[0] == 250
        assert smtp.rcpt("carol@other.test") == (
            450, b"4.5.3 this recipient goes to another next hop than the ones before it; "
                 b"send it in a separate transaction")
        assert smtp.data(message("here"))[0] == 250
    assert send(server, ["carol@other.test"], message("there"))[0] == 250
    assert [body_of(m) for m in here.wait_for_messages("bob@example.test", 1)] == [lf(message("here"))]
    assert [body_of(m) for m in there.wait_for_messages("carol@other.test", 1)] == [lf(message("there"))]


def test_failover_to_the_next_server_of_a_route(make_server, postfix):
    dead = free_port()  # nothing listens there
    server = make_server(f"""
[[queue/smtp_forward]]
  routes = example.test:127.0.0.1:{dead}|127.0.0.1:{postfix.port}
[[rcpt_ok]]
  domains = example.test
""")
    before = len(postfix.messages("alice@example.test"))
    assert send(server, ["alice@example.test"], message("failover"))[0] == 250
    delivered = postfix.wait_for_messages("alice@example.test", before + 1)
    assert body_of(delivered[-1]) == lf(message("failover"))


def test_dsn_parameters_are_passed_on_to_postfix(make_server, fresh_postfix):
    """RFC 3461: what the client asked (RET, ENVID, NOTIFY, ORCPT) reaches the next hop,
    shown by the commands Postfix's smtpd logs for a peer in debug_peer_list."""
    postfix = fresh_postfix(main={"debug_peer_list": "127.0.0.0/8"})
    server = make_server(forward(postfix))
    with client(server) as smtp:
        code, features = smtp.ehlo()
        assert code == 250 and smtp.has_extn("dsn")
        assert smtp.mail("sender@client.test", ["RET=HDRS", "ENVID=QQ314+2B1"])[0] == 250
        assert smtp.rcpt("bob@example.test", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;b+2Bob@example.test"])[0] == 250
        assert smtp.rcpt("alice@example.test", ["NOTIFY=NEVER"])[0] == 250
        assert smtp.rcpt("alice@example.test", ["NOTIFY=NEVER,SUCCESS"])[0] == 501
        assert smtp.data(message("dsn"))[0] == 250
    postfix.wait_for_messages("bob@example.test", 1)
    log = wait_until(lambda: "NOTIFY=NEVER" in postfix.log() and postfix.log(), 30, "postfix's debug log")
    assert re.search(r"MAIL FROM:<sender@client\.test>.* RET=HDRS ENVID=QQ314\+2B1", log), log
    assert "RCPT TO:<bob@example.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;b+2Bob@example.test" in log, log
    assert "RCPT TO:<alice@example.test> NOTIFY=NEVER" in log


def test_dsn_parameters_are_left_out_when_the_next_hop_does_not_offer_dsn(make_server, fresh_postfix):
    postfix = fresh_postfix(main={"debug_peer_list": "127.0.0.0/8", "smtpd_discard_ehlo_keywords": "dsn"})
    server = make_server(forward(postfix))
    with client(server) as smtp:
        smtp.ehlo()
        assert smtp.mail("sender@client.test", ["RET=FULL", "ENVID=none"])[0] == 250
        assert smtp.rcpt("bob@example.test", ["NOTIFY=SUCCESS"])[0] == 250
        assert smtp.data(message("no dsn"))[0] == 250
    postfix.wait_for_messages("bob@example.test", 1)
    log = wait_until(lambda: "RCPT TO:<bob@example.test>" in postfix.log() and postfix.log(), 30, "the log")
    assert "NOTIFY=" not in log and "RET=" not in log and "ENVID=" not in log, log

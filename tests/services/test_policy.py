"""policy: Postfix policy delegation through the real server and smtplib, against Debian's
policy servers: policyd-spf (SPF through a test NSD), postfwd (rules that give back every
action of access(5)) and postgrey (greylisting); one connection per session, reconnected
once; a server killed, hung, or answering garbage in the middle of a session.

The client address the servers judge comes from a PROXY header (the server trusts
127.0.0.1 as a proxy): policyd-spf does not check loopback clients at all."""

from __future__ import annotations

import os
import re
import signal
import ssl

import gevent
import pytest
from gevent.server import StreamServer

from qpgevent.testing import maildir_messages, wait_until
from qpgevent.testing.mta import make_certificates
from qpgevent.testing.scanners import HungScanner, dead_port
from service_daemons import Postgrey, SpfPolicy
from service_helpers import RCPT_AND_QUEUE, CountingProxy, delivered, greeting, header_block, message, send, smtp

PASSING = "192.0.2.25"  #: example.test's SPF allows 192.0.2.0/24
FAILING = "203.0.113.5"  #: ... and not this one


def start(make_server, address, options="", queue=RCPT_AND_QUEUE):
    plugins = f"[[policy]]\n  server = {address}\n{options}\n{queue}"
    return make_server(plugins=plugins, proxy_trusted="127.0.0.1")


# -- policyd-spf -------------------------------------------------------------------------

def test_spf_pass_prepends_received_spf(make_server, spf_policy):
    server = start(make_server, spf_policy.address)
    assert send(server, message(), "alice@example.test", ["bob@example.org"], client_ip=PASSING)[0] == 250
    head = header_block(delivered(server)[0])
    assert "Received-SPF: Pass (mailfrom) identity=mailfrom; client-ip=192.0.2.25; helo=mail.example.test;" \
           " envelope-from=alice@example.test;" in head


def test_spf_fail_is_refused_with_the_daemons_code_and_text(make_server, spf_policy):
    server = start(make_server, spf_policy.address)
    code, text = send(server, message(), "alice@example.test", ["bob@example.org"], client_ip=FAILING)
    assert code == 550 and text.startswith("5.7.23 Message rejected due to: SPF fail - not authorized."), text
    assert "s=mfrom;id=alice@example.test;ip=203.0.113.5" in text
    assert delivered(server) == []


def test_spf_helo_fail_at_the_helo_hook(make_server, spf_policy):
    server = start(make_server, spf_policy.address, "  hooks = helo, rcpt")
    code, text = send(server, message(), "", ["bob@example.org"], client_ip=PASSING, helo="client.example.test")
    assert code == 550 and "s=helo;id=client.example.test;ip=192.0.2.25" in text, text


def test_one_connection_per_session_reused_for_every_question(make_server, spf_policy):
    proxy = CountingProxy(spf_policy.port)
    try:
        server = start(make_server, proxy.address, "  hooks = mail, rcpt, data_post")
        recipients = ["bob@example.org", "carol@example.org", "dave@example.org"]
        assert send(server, message(), "alice@example.test", recipients, client_ip=PASSING)[0] == 250
        assert proxy.connections == 1  # MAIL, three RCPTs and the end of message on one
        assert send(server, message(), "alice@example.test", recipients, client_ip=PASSING)[0] == 250
        assert proxy.connections == 2
    finally:
        proxy.close()


def test_a_connection_the_server_closed_is_reopened_once(make_server, spf_policy):
    proxy = CountingProxy(spf_policy.port)
    try:
        server = start(make_server, proxy.address)
        with smtp(server, PASSING) as client:
            client.ehlo("mail.example.test")
            client.mail("alice@example.test")
            assert client.rcpt("bob@example.org")[0] == 250
            proxy.drop_all()
            assert client.rcpt("carol@example.org")[0] == 250
            assert client.data(message())[0] == 250
        assert proxy.connections == 2
    finally:
        proxy.close()


# -- postfwd: every action ----------------------------------------------------------------

@pytest.mark.parametrize("recipient,reply", [
    ("reject@example.test", (554, "5.7.1 refused by postfwd")),
    ("code@example.test", (521, "5.7.0 not here")),
    ("defer@example.test", (450, "4.7.1 busy now")),
    ("garbage@example.test", (451, "4.3.0 policy server unavailable, try again later")),
])
def test_refusals_reach_the_client_with_the_servers_code_and_text(make_server, postfwd, recipient, reply):
    server = start(make_server, postfwd.address)
    assert send(server, message(), recipients=[recipient], client_ip=PASSING) == reply


def test_refusals_at_connect_helo_mail_and_end_of_message(make_server, postfwd):
    server = start(make_server, postfwd.address, "  hooks = connect, helo, mail, rcpt, data, data_post")
    assert greeting(server, "192.0.2.66") == "554 5.7.1 no connections from you"
    assert send(server, message(), client_ip=PASSING, helo="bad.example.test") == (554, "5.7.1 bad HELO")
    assert send(server, message(), "spammer@example.test", client_ip=PASSING) == (554, "5.7.1 bad sender")
    big = message(body="x" * 998 + "\r\n" + ("x" * 78 + "\r\n") * 1500)  # 120 kB
    assert send(server, big, client_ip=PASSING) == (554, "5.7.1 too big for postfwd")
    assert send(server, message(), client_ip=PASSING)[0] == 250
    assert len(delivered(server)) == 1


def test_prepend_adds_the_header_to_the_delivered_message(make_server, postfwd):
    server = start(make_server, postfwd.address)
    assert send(server, message(), recipients=["prepend@example.test"], client_ip=PASSING)[0] == 250
    assert "X-Postfwd: seen 192.0.2.25\r\n" in header_block(delivered(server)[0])


PER_RECIPIENT = "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n  mailbox = %l\n"


def test_redirect_replaces_the_recipients_and_bcc_adds_one(make_server, postfwd):
    server = start(make_server, postfwd.address, queue=PER_RECIPIENT)
    assert send(server, message(), recipients=["bob@example.test", "redirect@example.test"],
                client_ip=PASSING)[0] == 250
    assert send(server, message(), recipients=["bcc@example.test"], client_ip=PASSING)[0] == 250
    boxes = {box: len(maildir_messages(server.maildir / box)) for box in ("other", "bob", "redirect", "bcc", "archive")}
    assert boxes == {"other": 1, "bob": 0, "redirect": 0, "bcc": 1, "archive": 1}


def test_discard_accepts_and_drops_hold_and_filter_are_noted(make_server, postfwd):
    server = start(make_server, postfwd.address)
    code, text = send(server, message(), recipients=["discard@example.test"], client_ip=PASSING)
    assert (code, text) == (250, "2.0.0 Discarded") and delivered(server) == []
    for recipient in ("hold@example.test", "filter@example.test", "warn@example.test", "ok@example.test"):
        assert send(server, message(), recipients=[recipient], client_ip=PASSING)[0] == 250
    assert len(delivered(server)) == 4


def test_hold_filter_and_every_answer_are_noted_on_the_transaction(plugin_harness, postfwd):
    harness = plugin_harness("policy", server=postfwd.address, hooks=["mail", "rcpt", "data_post"])
    session = harness.session(ip=PASSING, helo="mail.example.test")
    assert harness.run_hook("mail", "<a@example.test>", session=session).verdict.code.name == "DECLINED"
    for recipient in ("hold@example.test", "filter@example.test"):
        assert harness.run_hook("rcpt", recipient, session=session).verdict.code.name == "DECLINED"
    harness.run_hook("data_post", session=session)
    harness.run_hook("disconnect", session=session)  # closes the session's policy connection
    notes = session.transaction.notes
    assert notes["hold"] == "held by postfwd" and notes["filter"] == "smtp:[127.0.0.1]:10025"
    assert notes["policy"] == [("MAIL", "DUNNO"), ("RCPT", "HOLD held by postfwd"),
                               ("RCPT", "FILTER smtp:[127.0.0.1]:10025"), ("END-OF-MESSAGE", "DUNNO")]


# -- postgrey: greylisting ----------------------------------------------------------------

def test_postgrey_defers_the_first_attempt_and_marks_the_retry(make_server):
    with Postgrey(delay=2) as postgrey:
        server = start(make_server, postgrey.address)
        code, text = send(server, message(), client_ip=PASSING)
        assert code == 450 and text.startswith("4.2.0 Greylisted, see "), text
        # the client retries until the greylisting delay has passed (bounded)
        wait_until(lambda: send(server, message(), client_ip=PASSING)[0] == 250, 30, "the retry accepted")
        [mail] = delivered(server)
        assert "X-Greylist: delayed " in header_block(mail)


# -- down, hung, garbage, killed mid-session ------------------------------------------------

@pytest.mark.parametrize("mode,reply", [("tempfail", (451, "4.3.0 policy server unavailable, try again later")),
                                        ("reject", (554, "5.3.0 policy server unavailable")),
                                        ("accept", (250, None))])
def test_a_closed_port_gives_the_configured_reply(make_server, mode, reply):
    server = start(make_server, f"127.0.0.1:{dead_port()}", f"  on_failure = {mode}")
    code, text = send(server, message(), client_ip=PASSING)
    assert code == reply[0] and (reply[1] is None or text == reply[1])
    assert len(delivered(server)) == (1 if mode == "accept" else 0)


@pytest.fixture
def garbage_policy():
    def answer(sock, _address):
        sock.recv(65536)
        sock.sendall(b"I am not a policy server\n\n")
    server = StreamServer(("127.0.0.1", 0), answer)
    server.start()
    yield f"127.0.0.1:{server.server_port}"
    server.stop(timeout=0)


def test_garbage_is_a_failure(make_server, garbage_policy):
    server = start(make_server, garbage_policy)
    assert send(server, message(), client_ip=PASSING) == (451, "4.3.0 policy server unavailable, try again later")


def test_a_hung_server_meets_call_timeout_and_other_sessions_go_on(make_server):
    with HungScanner() as hung:
        server = start(make_server, f"127.0.0.1:{hung.port}", "  call_timeout = 2")
        waiting = gevent.spawn(send, server, message(), client_ip=PASSING)
        gevent.wait([waiting], timeout=1.0)
        with smtp(server, PASSING) as other:
            assert other.noop()[0] == 250
        assert waiting.get(timeout=30) == (451, "4.3.0 policy server unavailable, try again later")
    assert delivered(server) == []


def test_the_server_killed_mid_session_gives_the_fallback(make_server, spf_dns):
    own = SpfPolicy(spf_dns.port)
    try:
        server = start(make_server, own.address)
        with smtp(server, PASSING) as client:
            client.ehlo("mail.example.test")
            client.mail("alice@example.test")
            assert client.rcpt("bob@example.org")[0] == 250
            own.stop()  # socat and the policyd-spf of this connection
            assert client.rcpt("carol@example.org") == (451, b"4.3.0 policy server unavailable, try again later")
            assert client.data(message())[0] == 250  # bob was accepted before: his copy is queued
    finally:
        own.close()
    assert len(delivered(server)) == 1


def test_postgrey_stopped_mid_session_meets_call_timeout(make_server):
    # SIGSTOP: the real daemon hangs with the connection open, after answering once
    with Postgrey(whitelist_clients=[PASSING]) as postgrey:
        server = start(make_server, postgrey.address, "  call_timeout = 2")
        with smtp(server, PASSING) as client:
            client.ehlo("mail.example.test")
            client.mail("a@example.test")
            assert client.rcpt("b@example.test")[0] == 250
            os.killpg(postgrey.process.pid, signal.SIGSTOP)
            try:
                assert client.rcpt("c@example.test") == (451, b"4.3.0 policy server unavailable, try again later")
                with smtp(server, PASSING) as other:  # the worker goes on meanwhile
                    assert other.noop()[0] == 250
            finally:
                os.killpg(postgrey.process.pid, signal.SIGCONT)
            assert client.data(message())[0] == 250  # b was accepted before
    assert len(delivered(server)) == 1


@pytest.fixture
def dripping_policy():
    """Answers one byte of a reply every half second, never reaching its end."""
    def answer(sock, _address):
        sock.recv(65536)
        for _ in range(120):  # bounded: a minute at most
            sock.sendall(b"x")
            gevent.sleep(0.5)  # the hostile peer's pace, not a synchronisation
    server = StreamServer(("127.0.0.1", 0), answer)
    server.start()
    yield f"127.0.0.1:{server.server_port}"
    server.stop(timeout=0)


def test_a_server_that_drips_bytes_meets_call_timeout_for_the_whole_answer(make_server, dripping_policy):
    server = start(make_server, dripping_policy, "  call_timeout = 2")
    assert send(server, message(), client_ip=PASSING) == (451, "4.3.0 policy server unavailable, try again later")


def test_the_attributes_postfix_sends(make_server, postfwd):
    server = start(make_server, postfwd.address, "  hooks = rcpt, data_post\n  context = qpg-test")
    assert send(server, message(body="x" * 500), "attrs@example.test", ["bob@example.test", "attrs@example.test"],
                client_ip=PASSING, helo="mail.example.test")[0] == 250
    head = header_block(delivered(server)[0])
    rcpt = re.search(r"X-Policy-Attributes: (.*)\r\n", head).group(1)
    assert rcpt == ("request=smtpd_access_policy state=RCPT name=ESMTP helo=mail.example.test"
                    " sender=attrs@example.test recipient=attrs@example.test count=1 client=192.0.2.25"
                    " cname=unknown rname=unknown size=0 context=qpg-test")
    end = dict(item.split("=", 1) for item in re.search(r"X-Policy-End: (.*)\r\n", head).group(1).split())
    assert end["state"] == "END-OF-MESSAGE" and end["count"] == "2" and end["recipient"] == ""
    assert int(end["size"]) > 500 and end["queue"] and end["instance"].endswith(end["queue"])


def test_ok_is_dunno_unless_ok_accepts(make_server, postfwd):
    # rcpt_ok does not accept elsewhere.test: only the policy server's OK can
    cautious = start(make_server, postfwd.address)
    assert send(cautious, message(), recipients=["ok@elsewhere.test"], client_ip=PASSING)[0] == 550
    trusting = start(make_server, postfwd.address, "  ok_accepts = yes")
    assert send(trusting, message(), recipients=["ok@elsewhere.test"], client_ip=PASSING)[0] == 250


def test_an_action_at_connect_applies_to_every_message_of_the_connection(make_server, postfwd):
    server = start(make_server, postfwd.address, "  hooks = connect, rcpt")
    with smtp(server, "192.0.2.77") as client:
        client.ehlo("mail.example.test")
        for _ in range(2):
            assert client.sendmail("a@example.test", ["b@example.test"], message()) == {}
    mails = delivered(server)
    assert len(mails) == 2 and all("X-Connect-Policy: seen at connect\r\n" in header_block(m) for m in mails)


def test_an_encrypted_session_is_told_to_the_policy_server(make_server, postfwd, tmp_path):
    _, cert, key = make_certificates(tmp_path / "tls")
    server = make_server(plugins=f"[[policy]]\n  server = {postfwd.address}\n{RCPT_AND_QUEUE}", certificate=cert,
                         key=key, proxy_trusted="127.0.0.1")
    with smtp(server, PASSING) as client:
        client.ehlo("mail.example.test")
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("mail.example.test")
        assert client.sendmail("a@example.test", ["tls@example.test"], message()) == {}
    header = re.search(r"X-Policy-TLS: (.*)\r\n", header_block(delivered(server)[0])).group(1)
    assert re.fullmatch(r"protocol=TLSv1\.[23] cipher=\S+", header), header

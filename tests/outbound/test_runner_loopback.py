"""The delivery runner in this process against servers on loopback: one transaction per domain,
expiry, and next hops that stop talking (every timeout met by a hostile peer)."""

from __future__ import annotations

import email
import time

import gevent
import pytest

from outbound_helpers import SilentServer, message
from qpgevent.backends.delivery import Options, Runner
from qpgevent.outqueue import Queue, Recipient, State
from qpgevent.smtp_client import ClientOptions, parse_routes
from qpgevent.testing import wait_until
from qpgevent.testing.mta import Dovecot, Postfix, free_port, make_certificates
from qpgevent.tls_policy import TlsPolicies


@pytest.fixture(scope="module")
def postfix():
    server = Postfix(["a@one.test", "b@one.test", "c@two.test", "sender@sender.test"]).start()
    yield server
    server.cleanup()


def runner_for(tmp_path, routes, **options):
    client = ClientOptions(helo="mta.test", connect_timeout=2, command_timeout=options.pop("command_timeout", 5),
                           data_timeout=options.pop("data_timeout", 5))
    queue = Queue(str(tmp_path / "queue"), fsync=False)  # the test enqueues on the hub: no fsync stalls
    return queue, Runner(queue, Options(me="mta.test", routes=parse_routes(routes, 25), client=client,
                                        minimal_backoff=60, maximal_backoff=60, **options))


def test_one_transaction_per_domain_carries_all_its_recipients(tmp_path, postfix):
    queue, runner = runner_for(tmp_path, [f"*:127.0.0.1:{postfix.port}"])
    envelope = queue.enqueue("sender@sender.test", [Recipient("a@one.test"), Recipient("c@two.test"),
                                                    Recipient("b@one.test")], [message("grouped")])
    runner.attempt(envelope.id)
    assert queue.ids() == []
    for address in ("a@one.test", "b@one.test", "c@two.test"):
        assert postfix.wait_for_messages(address, 1)
    # Postfix logs each transaction's recipient count: one with 2 (one.test), one with 1.
    log = wait_until(lambda: postfix.log().count("nrcpt=") >= 2 and postfix.log(), 30, "postfix's qmgr lines")
    counts = sorted(line.split("nrcpt=")[1].split()[0] for line in log.splitlines()
                    if "nrcpt=" in line and "sender@sender.test" in line)
    assert counts == ["1", "2"]


def test_a_message_past_its_lifetime_fails_its_pending_recipients_with_a_bounce(tmp_path, postfix):
    dead = free_port()  # nothing listens there: connection refused
    queue, runner = runner_for(tmp_path, [f"late.test:127.0.0.1:{dead}", f"*:127.0.0.1:{postfix.port}"],
                               lifetime=0)
    envelope = queue.enqueue("sender@sender.test", [Recipient("x@late.test")], [message("expired")])
    runner.attempt(envelope.id)
    assert queue.ids() != [envelope.id] and envelope.id not in queue.ids()
    [notice_id] = queue.ids()
    runner.attempt(notice_id)  # the bounce goes to sender.test, at Postfix
    report = email.message_from_bytes(postfix.wait_for_messages("sender@sender.test", 1)[-1])
    _, status, _ = report.get_payload()
    [block] = status.get_payload()[1:]
    assert block["Final-Recipient"] == "rfc822; x@late.test"
    assert block["Status"] == "4.4.7" and block["Action"] == "failed"
    assert "expired" in block["Diagnostic-Code"]


@pytest.mark.parametrize("script", [
    [],  # no greeting at all
    [b"220 hello\r\n"],  # greets, never answers EHLO
    [b"220 hello\r\n", b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"],  # silent after the dot
], ids=["greeting", "ehlo", "after-data"])
def test_a_next_hop_that_stops_talking_defers_the_message_within_the_timeouts(tmp_path, script):
    silent = SilentServer(script)
    try:
        queue, runner = runner_for(tmp_path, [f"*:127.0.0.1:{silent.port}"], command_timeout=1, data_timeout=1)
        envelope = queue.enqueue("sender@sender.test", [Recipient("a@one.test")], [message("stuck")])
        started = time.monotonic()
        with gevent.Timeout(30):
            runner.attempt(envelope.id)
        assert time.monotonic() - started < 30
        again = queue.load(envelope.id)
        [recipient] = again.recipients
        assert recipient.state is State.PENDING and "timed out" in recipient.reply
        assert again.next_attempt > time.time() + 30  # rescheduled, not spinning
    finally:
        silent.stop()


def test_a_smarthost_route_with_auth_over_verified_tls(tmp_path):
    dovecot = Dovecot({"relay@example.test": "s3cret"}).start()
    ca, cert, key = make_certificates(tmp_path / "tls")
    submission = free_port()
    smarthost = Postfix(["bob@example.test"], tls=(cert, key), submission_port=submission,
                        sasl=("127.0.0.1", dovecot.auth_port), main={"smtpd_sasl_authenticated_header": "yes"})
    try:
        smarthost.start()

        def runner(password):
            client = ClientOptions(helo="mta.test", auth_user="relay@example.test", auth_password=password,
                                   forward_client=())
            queue = Queue(str(tmp_path / password), fsync=False)
            tls = TlsPolicies(client, {}, "verify", mta_sts=False, dane=False, ca_file=str(ca))
            return queue, Runner(queue, Options(me="mta.test", routes=parse_routes([f"*:localhost:{submission}"], 25),
                                                client=client, tls=tls, minimal_backoff=60))

        queue, good = runner("s3cret")
        envelope = queue.enqueue("sender@sender.test", [Recipient("bob@example.test")], [message("smarthost")])
        good.attempt(envelope.id)
        assert queue.ids() == []
        [delivered] = smarthost.wait_for_messages("bob@example.test", 1)
        assert b"(Authenticated sender: relay@example.test)" in delivered
        assert b"ESMTPSA" in delivered  # over TLS, authenticated
        queue, bad = runner("wrong")
        envelope = queue.enqueue("sender@sender.test", [Recipient("bob@example.test")], [message("refused")])
        bad.attempt(envelope.id)
        [recipient] = queue.load(envelope.id).recipients
        assert recipient.state is State.PENDING and "refused our AUTH" in recipient.reply
    finally:
        smarthost.cleanup()
        dovecot.cleanup()


def test_a_message_delayed_past_delay_warning_gets_one_still_trying_notice(tmp_path):
    dead = free_port()  # nothing listens there: every attempt is deferred
    queue, runner = runner_for(tmp_path, [f"*:127.0.0.1:{dead}"], delay_warning=3600)
    envelope = queue.enqueue("sender@sender.test", [Recipient("x@late.test"), Recipient("y@late.test", notify="FAILURE")],
                             [message("slow")])
    runner.attempt(envelope.id)
    assert queue.ids() == [envelope.id]  # not an hour old yet: no notice
    envelope = queue.load(envelope.id)
    envelope.arrived -= 3600  # as if queued an hour ago
    queue.save(envelope)
    runner.attempt(envelope.id)
    [notice_id] = [i for i in queue.ids() if i != envelope.id]
    report = email.message_from_bytes(b"".join(queue.message_chunks(notice_id)))
    assert report["Subject"] == "Delayed Mail (still being retried)"
    _, status, _ = report.get_payload()
    [block] = status.get_payload()[1:]  # y asked for failure notices only
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == ("rfc822; x@late.test", "delayed", "4.4.1")
    assert queue.load(notice_id).sender == "" and queue.load(envelope.id).delay_warned
    runner.attempt(envelope.id)
    assert len(queue.ids()) == 2  # once only
    assert [r.state for r in queue.load(envelope.id).recipients] == [State.PENDING, State.PENDING]

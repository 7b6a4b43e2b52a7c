"""End to end: qpgevent's outbound queue in a lab internet, real Postfix MXs, NSD for the MX records."""

from __future__ import annotations

import email
import os
import signal

from outbound_helpers import bounces_about, message, queued, runner_pids, send, with_subject
from qpgevent.testing.outbound_lab import LabPostfix
from qpgevent.testing import wait_until


def test_delivery_by_mx_preference_and_fallback_when_the_first_refuses(internet, start_mta, tmp_path):
    start_mta()
    send(internet, "sender@sender.test", ["b@pref.test", "c@fallback.test", "d@six.test", "e@implicit.test"],
         message("first"))
    # pref.test: MX 10 mx1, MX 20 mx2: the better one takes it.
    with_subject(internet.mx1, "b@pref.test", "first")
    # fallback.test: MX 10 mx3 refuses connections; MX 20 mx2 takes it.
    with_subject(internet.mx2, "c@fallback.test", "first")
    # six.test: its MX host has only an AAAA record; implicit.test: no MX, an A record.
    with_subject(internet.mx2, "d@six.test", "first")
    with_subject(internet.mx2, "e@implicit.test", "first")
    wait_until(lambda: not queued(tmp_path / "queue"), 30, "the queue empty")
    assert internet.mx2.messages("b@pref.test") == []  # the backup MX was not needed


def test_a_5xx_recipient_bounces_to_the_sender_and_the_others_are_delivered(internet, start_mta, tmp_path):
    start_mta()
    send(internet, "sender@sender.test", ["a@pref.test", "nobody@pref.test", "x@nullmx.test", "c@fallback.test"],
         message("partly"))
    with_subject(internet.mx1, "a@pref.test", "partly")
    with_subject(internet.mx2, "c@fallback.test", "partly")
    bounces = wait_until(lambda: bounces_about(internet.mx1, "partly"), 30, "the bounce")
    report = email.message_from_bytes(bounces[0])
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["Return-Path"] == "<>"
    text, status, original = report.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_recipient = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.lab.test"
    failed = {block["Final-Recipient"]: block for block in per_recipient}
    assert set(failed) == {"rfc822; nobody@pref.test", "rfc822; x@nullmx.test"}
    assert failed["rfc822; nobody@pref.test"]["Action"] == "failed"
    assert failed["rfc822; nobody@pref.test"]["Status"] == "5.1.1"
    assert failed["rfc822; nobody@pref.test"]["Remote-MTA"] == "dns; 198.18.0.21"
    assert "550" in failed["rfc822; nobody@pref.test"]["Diagnostic-Code"]
    assert failed["rfc822; x@nullmx.test"]["Status"] == "5.1.10"
    assert original.get_content_type() == "message/rfc822"
    assert original.get_payload()[0]["Subject"] == "partly"
    wait_until(lambda: not queued(tmp_path / "queue"), 30, "the queue empty")
    # Only the failed ones were reported, each once.
    assert len(bounces_about(internet.mx1, "partly")) == 1


def test_a_receiving_mx_down_for_a_while_is_retried_until_it_takes_the_message(internet, start_mta, tmp_path):
    server = start_mta()
    send(internet, "sender@sender.test", ["late@late.test"], message("late"))
    wait_until(lambda: server.log().count("deferred, next attempt") >= 2, 60, "two deferred attempts")
    assert queued(tmp_path / "queue")
    mx4 = LabPostfix(internet.lab, "mx4", "198.18.0.24", ["late@late.test"])
    try:
        mx4.start()
        [got] = mx4.wait_for_messages("late@late.test", 1, timeout=60)
        assert b"Subject: late" in got
        wait_until(lambda: not queued(tmp_path / "queue"), 30, "the queue empty")
        assert bounces_about(internet.mx1, "late") == []  # deferred, never bounced
    finally:
        mx4.cleanup()


def test_kill_9_of_the_queue_runner_mid_delivery_loses_nothing(internet, start_mta, tmp_path):
    # Every DATA takes a second at this MX: the runner is killed while transactions are open.
    mx4 = LabPostfix(internet.lab, "mx4", "198.18.0.24", ["slow@slow.test"],
                     main={"smtpd_end_of_data_restrictions": "sleep 1"})
    mx4.start()
    try:
        server = start_mta(destination_concurrency=3)
        count = 12
        for i in range(count):
            send(internet, "sender@sender.test", ["slow@slow.test"], message(f"crash {i}"))
        wait_until(lambda: len(mx4.messages("slow@slow.test")) >= 2, 60, "the first deliveries")
        [first] = runner_pids(server)
        assert len(queued(tmp_path / "queue")) > 0, "everything was delivered before the kill"
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(runner_pids(server)) == 2, 30, "a new runner")
        assert "queue runner killed by signal SIGKILL" in server.log()
        wait_until(lambda: not queued(tmp_path / "queue"), 90, "the queue empty")

        def subjects() -> list[str]:
            return [email.message_from_bytes(m)["Subject"] for m in mx4.messages("slow@slow.test")]

        # Postfix answers 250 once its queue file is on disk and delivers to the mailbox after:
        # the last ones may reach it a moment after our queue is empty.
        wait_until(lambda: all(f"crash {i}" in subjects() for i in range(count)), 60, "every message in the mailbox")
        subjects = subjects()
        for i in range(count):
            # Never lost; at most once more (the transactions open at the kill, and those
            # answered 250 whose outcome was not yet on disk).
            assert 1 <= subjects.count(f"crash {i}") <= 2, subjects
    finally:
        mx4.cleanup()

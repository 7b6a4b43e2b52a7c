"""``qpgevent queue`` against a running server (master, worker, queue runner) on loopback."""

from __future__ import annotations

import email
import json
import re
import urllib.request

from outbound_helpers import deferred_message, listing, message, queue
from qpgevent.testing import wait_until
from qpgevent.testing.mta import Postfix


def test_list_and_show_tell_what_waits_and_why(mta):
    row = deferred_message(mta, "waiting")
    assert row["sender"] == "sender@sender.test" and row["pending"] == ["late@late.test"]
    assert "4.4.1" in row["last_reply"] and not row["held"]
    code, out, _ = queue(mta, "--json", "show", row["id"])
    shown = json.loads(out)
    assert code == 0 and shown["recipients"][0]["state"] == "pending"
    assert "Subject: waiting" in shown["header"]
    code, out, _ = queue(mta, "list")
    assert code == 0 and row["id"] in out and "late@late.test" in out and "1 message(s)" in out
    assert queue(mta, "show", "NOSUCHID")[0] == 1


def test_hold_release_and_flush(mta, postfix):
    row = deferred_message(mta, "flushed")
    assert queue(mta, "hold", row["id"])[0] == 0
    assert listing(mta)[0]["held"]
    late = Postfix(["late@late.test"], port=mta.late_port).start()
    try:
        assert queue(mta, "flush")[0] == 0  # a held message stays
        assert queue(mta, "release", row["id"])[0] == 0  # released: tried now, not in an hour
        [got] = late.wait_for_messages("late@late.test", 1)
        assert email.message_from_bytes(got)["Subject"] == "flushed"
        wait_until(lambda: listing(mta) == [], 30, "the queue empty")
    finally:
        late.cleanup()


def test_bounce_returns_the_message_to_its_sender_and_delete_forgets_one(mta, postfix):
    first = deferred_message(mta, "returned")
    assert queue(mta, "bounce", first["id"])[0] == 0
    [report] = postfix.wait_for_messages("sender@sender.test", 1)
    parsed = email.message_from_bytes(report)
    assert parsed.get_content_type() == "multipart/report"
    assert "Final-Recipient: rfc822; late@late.test" in report.decode()
    assert "5.0.0" in report.decode()
    second = deferred_message(mta, "deleted")
    assert queue(mta, "delete", second["id"])[0] == 0
    wait_until(lambda: listing(mta) == [], 30, "the queue empty")
    assert len(postfix.messages("sender@sender.test")) == 1  # no notice for a deleted message
    assert queue(mta, "delete", "NOSUCHID")[0] == 1


def test_prometheus_metrics_show_the_queue(mta, postfix):
    deferred_message(mta, "counted")
    with mta.smtp() as client:
        client.sendmail("sender@sender.test", ["sender@sender.test"], message("delivered"))
    postfix.wait_for_messages("sender@sender.test", 1)

    def scraped():
        with urllib.request.urlopen(f"{mta.admin_url}/metrics", timeout=10) as response:
            text = response.read().decode()
        values = dict(re.findall(r"^(qpgevent_outbound_\S+) (\S+)$", text, re.M))
        wanted = {'qpgevent_outbound_deliveries_total{outcome="delivered"}': 1.0,
                  'qpgevent_outbound_queue_messages': 1.0,
                  'qpgevent_outbound_destination_failures_total{domain="late.test"}': 1.0}
        return all(float(values.get(k, -1)) >= v for k, v in wanted.items()) and values

    values = wait_until(scraped, 30, "the queue's series in /metrics")
    assert float(values['qpgevent_outbound_deliveries_total{outcome="deferred"}']) >= 1
    assert float(values["qpgevent_outbound_queue_oldest_seconds"]) > 0

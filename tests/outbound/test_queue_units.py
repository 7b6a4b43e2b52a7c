"""The pieces of the outbound queue on their own: the queue folder, backoff, routing, bounces."""

from __future__ import annotations

import email
import json
import os
import time

import pytest

from qpgevent import dns
from qpgevent.backends.delivery import Options, Runner, backoff
from qpgevent.core.dsn import Failure, bounce, status_of
from qpgevent.backends.mxroute import RoutingError, destination
from qpgevent.outqueue import Envelope, Queue, QueueError, Recipient, State
from qpgevent.smtp_client import parse_routes
from qpgevent.testing import wait_until
from qpgevent.testing.dns import LoopbackDns


# -- the queue folder ------------------------------------------------------------------------
def test_enqueue_writes_the_message_and_its_envelope_and_leaves_nothing_in_tmp(tmp_path):
    queue = Queue(str(tmp_path / "q"))
    envelope = queue.enqueue("s@a.test", [Recipient("r@b.test", notify="FAILURE", orcpt="rfc822;r@b.test")],
                             [b"Subject: x\r\n", b"\r\nbody\r\n"], ret="HDRS", envid="E1")
    assert queue.ids() == [envelope.id]
    assert os.listdir(queue.tmp) == []
    assert b"".join(queue.message_chunks(envelope.id)) == b"Subject: x\r\n\r\nbody\r\n"
    on_disk = json.loads((tmp_path / "q" / "env" / f"{envelope.id}.json").read_text())
    assert on_disk["sender"] == "s@a.test" and on_disk["ret"] == "HDRS" and on_disk["envid"] == "E1"
    assert on_disk["recipients"][0] | {"updated": 0} == {
        "address": "r@b.test", "state": "pending", "notify": "FAILURE", "orcpt": "rfc822;r@b.test",
        "reply": "", "remote_mta": "", "notified": False, "relayed": False, "updated": 0}
    assert on_disk["size"] == len(b"Subject: x\r\n\r\nbody\r\n")
    loaded = queue.load(envelope.id)
    assert loaded == envelope
    assert queue.message_head(envelope.id) == b"Subject: x\r\n"


def test_ids_are_in_arrival_order_and_unique(tmp_path):
    queue = Queue(str(tmp_path))
    ids = [queue.enqueue("", [Recipient("r@b.test")], [b"x"]).id for _ in range(20)]
    assert len(set(ids)) == 20
    assert queue.ids() == sorted(ids)


def test_state_changes_survive_a_reload_and_remove_forgets_the_message(tmp_path):
    queue = Queue(str(tmp_path))
    envelope = queue.enqueue("s@a.test", [Recipient("r1@b.test"), Recipient("r2@c.test")], [b"x"])
    envelope.recipients[0].state = State.DELIVERED
    envelope.recipients[1].state = State.FAILED
    queue.save(envelope)
    again = Queue(str(tmp_path)).load(envelope.id)
    assert [r.state for r in again.recipients] == [State.DELIVERED, State.FAILED]
    assert again.pending() == [] and again.unnotified_failures() == [again.recipients[1]]
    assert not again.done
    again.recipients[1].notified = True
    assert again.done
    queue.remove(envelope.id)
    assert queue.ids() == [] and os.listdir(queue.msg) == []


def test_a_message_without_recipients_is_refused(tmp_path):
    with pytest.raises(QueueError):
        Queue(str(tmp_path)).enqueue("s@a.test", [], [b"x"])


def test_clean_removes_crash_left_overs_but_not_queued_messages(tmp_path):
    queue = Queue(str(tmp_path))
    kept = queue.enqueue("s@a.test", [Recipient("r@b.test")], [b"x"])
    orphan = tmp_path / "msg" / "ORPHAN"
    orphan.write_bytes(b"x")  # a crash between the two renames: no 250 was given
    half = tmp_path / "tmp" / "HALF.msg"
    half.write_bytes(b"x")
    old = time.time() - 7200
    for path in (orphan, half, tmp_path / "msg" / kept.id):
        os.utime(path, (old, old))
    assert sorted(queue.clean()) == sorted([str(orphan), str(half)])
    assert queue.ids() == [kept.id] and (tmp_path / "msg" / kept.id).exists()


def test_an_unreadable_envelope_is_a_queue_error(tmp_path):
    queue = Queue(str(tmp_path))
    (tmp_path / "env" / "BAD.json").write_text("{not json")
    with pytest.raises(QueueError):
        queue.load("BAD")


# -- backoff -------------------------------------------------------------------------------------
def test_backoff_doubles_from_the_minimum_up_to_the_maximum():
    assert [backoff(n, 300, 4000) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]


# -- routing ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resolver():
    zones = {
        "route.test": {
            "pref": [("MX", "20 b.route.test."), ("MX", "10 a.route.test.")],
            "a": [("A", "192.0.2.1"), ("AAAA", "2001:db8::1")],
            "b": [("A", "192.0.2.2")],
            "nullmx": [("MX", "0 .")],
            "implicit": [("A", "192.0.2.9")],
            "nowhere": [("TXT", '"nothing"')],
            "dangling": [("MX", "10 missing.route.test.")],
        }
    }
    with LoopbackDns(zones) as server:
        yield dns.Resolver(["127.0.0.1"], port=server.port, timeout=3)


def test_mx_hosts_in_preference_order_every_address_of_each(resolver):
    route = destination("pref.route.test", [], resolver=resolver)
    assert [(hop.host, hop.port) for hop in route.hops] == [("192.0.2.1", 25), ("2001:db8::1", 25), ("192.0.2.2", 25)]
    route = destination("pref.route.test", [], port=2525, families="ipv4", resolver=resolver)
    assert [(hop.host, hop.port) for hop in route.hops] == [("192.0.2.1", 2525), ("192.0.2.2", 2525)]


def test_no_mx_means_the_domain_itself(resolver):
    assert [hop.host for hop in destination("implicit.route.test", [], resolver=resolver).hops] == ["192.0.2.9"]


@pytest.mark.parametrize("domain, status", [("nullmx.route.test", "5.1.10"), ("nowhere.route.test", "5.1.2"),
                                            ("dangling.route.test", "5.4.4"), ("nxdomain.route.test", "5.1.2")])
def test_domains_that_take_no_mail_fail_for_good(resolver, domain, status):
    with pytest.raises(RoutingError) as error:
        destination(domain, [], resolver=resolver)
    assert error.value.permanent and str(error.value).startswith(status)


def test_a_dns_that_does_not_answer_defers():
    dead = dns.Resolver(["127.0.0.1"], port=9, timeout=0.5, cache=False)
    with pytest.raises(RoutingError) as error:
        destination("pref.route.test", [], resolver=dead)
    assert not error.value.permanent


def test_a_static_route_wins_over_the_mx_records(resolver):
    routes = parse_routes(["pref.route.test:[2001:db8::7]:587", "*:smarthost.test:2525"], 25)
    assert [(h.host, h.port) for h in destination("pref.route.test", routes, resolver=resolver).hops] == [
        ("2001:db8::7", 587)]
    assert destination("other.test", routes, resolver=resolver).hops[0].host == "smarthost.test"


# -- bounces --------------------------------------------------------------------------------------
ORIGINAL = b"From: <s@a.test>\r\nSubject: hello\r\nMessage-ID: <1@a.test>\r\n\r\nthe body\r\n"


def test_a_bounce_is_an_rfc3464_report_with_one_block_per_recipient():
    raw = bounce("mta.test", "s@a.test", [
        Failure("r1@b.test", "550 5.1.1 <r1@b.test>: User unknown", "mx.b.test", "rfc822;R1@b.test", last_attempt=0),
        Failure("r2@c.test", "5.1.10 c.test accepts no mail (null MX, RFC 7505)")],
        ORIGINAL, arrival=0, envid="ENV-42", received_from="client.test [192.0.2.5]")
    report = email.message_from_bytes(raw)
    assert report["To"] == "<s@a.test>" and report["From"].endswith("<MAILER-DAEMON@mta.test>")
    assert report["Auto-Submitted"] == "auto-replied"
    assert report.get_content_type() == "multipart/report" and report.get_param("report-type") == "delivery-status"
    human, status, returned = report.get_payload()
    assert "r1@b.test" in human.get_payload() and "User unknown" in human.get_payload()
    per_message, first, second = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.test"
    assert per_message["Original-Envelope-Id"] == "ENV-42"
    assert per_message["Arrival-Date"] == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert dict(first) == {
        "Final-Recipient": "rfc822; r1@b.test", "Original-Recipient": "rfc822; R1@b.test", "Action": "failed",
        "Status": "5.1.1", "Remote-MTA": "dns; mx.b.test",
        "Diagnostic-Code": "smtp; 550 5.1.1 <r1@b.test>: User unknown",
        "Last-Attempt-Date": "Thu, 01 Jan 1970 00:00:00 +0000"}
    assert second["Status"] == "5.1.10" and "Remote-MTA" not in second
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0]["Subject"] == "hello"
    assert returned.get_payload()[0].get_payload() == "the body\r\n"


def test_ret_hdrs_returns_only_the_header():
    raw = bounce("mta.test", "s@a.test", [Failure("r@b.test", "550 no")], ORIGINAL, arrival=0, ret="HDRS")
    _, _, returned = email.message_from_bytes(raw).get_payload()
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"the body" not in raw and b"Subject: hello" in raw


@pytest.mark.parametrize("reply, status", [("550 5.7.1 no relay", "5.7.1"), ("554 go away", "5.0.0"),
                                           ("4.4.7 expired", "4.4.7"), ("450 busy", "4.0.0")])
def test_status_comes_from_the_enhanced_code_or_the_reply_class(reply, status):
    assert status_of(reply) == status


# -- the runner's decisions without a network ------------------------------------------------------
def test_a_failure_for_the_null_sender_goes_to_postmaster_and_a_failed_double_bounce_is_dropped(tmp_path):
    queue = Queue(str(tmp_path), fsync=False)
    runner = Runner(queue, Options(me="mta.test", routes=parse_routes(["*:127.0.0.1:9"], 25)),
                    blocking=lambda function, *args, **kwargs: function(*args, **kwargs))
    envelope = queue.enqueue("", [Recipient("r@b.test")], [ORIGINAL])
    envelope.recipients[0].state = State.FAILED
    envelope.recipients[0].reply = "550 5.1.1 unknown"
    runner._notify(envelope)
    [notice_id] = [i for i in queue.ids() if i != envelope.id]
    notice = queue.load(notice_id)
    assert (notice.sender, [r.address for r in notice.recipients], notice.kind) == (
        "", ["postmaster@mta.test"], "double-bounce")
    notice.recipients[0].state = State.FAILED
    runner._notify(notice)
    assert sorted(queue.ids()) == sorted([envelope.id, notice_id])  # no third notice
    assert notice.done


def test_notify_never_gets_no_bounce(tmp_path):
    queue = Queue(str(tmp_path), fsync=False)
    runner = Runner(queue, Options(me="mta.test"), blocking=lambda f, *a, **k: f(*a, **k))
    envelope = queue.enqueue("s@a.test", [Recipient("r@b.test", notify="NEVER")], [ORIGINAL])
    envelope.recipients[0].state = State.FAILED
    runner._notify(envelope)
    assert queue.ids() == [envelope.id] and envelope.done


def test_envelope_json_round_trip():
    envelope = Envelope("ID", "s@a.test", [Recipient("r@b.test", state=State.DELIVERED)], arrived=1.0)
    assert Envelope.from_json(envelope.to_json()) == envelope


# -- the schedule ----------------------------------------------------------------------------------
def test_the_schedule_gives_due_ids_soonest_first_and_forgets_stale_times():
    from qpgevent.core.schedule import Schedule

    schedule = Schedule()
    for message_id, when in (("c", 30.0), ("a", 10.0), ("b", 20.0), ("held", None)):
        schedule.set(message_id, when)
    schedule.set("c", 5.0)  # rescheduled: its old time is stale
    schedule.pop("b")
    assert schedule.next_time() == 5.0
    assert schedule.take_due(now=15.0, limit=10) == ["c", "a"]
    assert schedule.take_due(now=100.0, limit=10) == []  # taken, b removed, held never due
    assert len(schedule) == 3 and "held" in schedule and schedule.get("held") is None
    schedule.set("a", 50.0)
    assert schedule.take_due(now=100.0, limit=0) == [] and schedule.take_due(now=100.0, limit=1) == ["a"]


def test_a_relayed_report_says_so_and_returns_only_the_header():
    raw = bounce("mta.test", "s@a.test", [
        Failure("r1@b.test", "250 2.0.0 Ok: queued as 1A2B", "mx.b.test", "rfc822;first@b.test", "relayed", 0),
        Failure("r2@b.test", "250 2.0.0 Ok: queued as 1A2B", "mx.b.test", None, "relayed", 0)],
        ORIGINAL, arrival=0, envid="E-1", ret="HDRS")
    report = email.message_from_bytes(raw)
    assert report["Subject"] == "Successful Mail Delivery Report"
    human, status, returned = report.get_payload()
    assert "does not send delivery reports" in human.get_payload()
    per_message, first, second = status.get_payload()
    assert per_message["Original-Envelope-Id"] == "E-1"
    assert (first["Action"], first["Status"], first["Original-Recipient"]) == ("relayed", "2.0.0", "rfc822; first@b.test")
    assert (second["Action"], second["Status"]) == ("relayed", "2.0.0") and "Original-Recipient" not in second
    assert returned.get_content_type() == "text/rfc822-headers" and b"the body" not in raw


def _inline_runner(queue):
    return Runner(queue, Options(me="mta.test"), blocking=lambda f, *a, **k: f(*a, **k))


def test_relayed_recipients_of_a_message_get_one_report_once_and_the_null_sender_none(tmp_path):
    queue = Queue(str(tmp_path), fsync=False)
    runner = _inline_runner(queue)
    envelope = queue.enqueue("s@a.test", [Recipient("r1@b.test", notify="SUCCESS"),
                                          Recipient("r2@b.test", notify="SUCCESS,FAILURE"),
                                          Recipient("r3@b.test")], [ORIGINAL], ret="FULL")
    for recipient in envelope.recipients:
        recipient.state, recipient.reply = State.DELIVERED, "250 2.0.0 Ok"
    envelope.recipients[0].relayed = envelope.recipients[1].relayed = True
    assert not envelope.done  # the report is still due
    runner._notify(envelope)
    [notice_id] = [i for i in queue.ids() if i != envelope.id]
    status = email.message_from_bytes(b"".join(queue.message_chunks(notice_id))).get_payload()[1]
    assert [b["Final-Recipient"] for b in status.get_payload()[1:]] == ["rfc822; r1@b.test", "rfc822; r2@b.test"]
    assert envelope.done
    runner._notify(envelope)
    assert len(queue.ids()) == 2  # once
    # A bounce (the null sender) asks nothing: the runner never marks its recipients relayed.
    assert Envelope("x", "", [Recipient("r@b.test", State.DELIVERED, notify="SUCCESS")]).done


def test_the_notice_about_a_requiretls_message_goes_with_requiretls_and_without_the_body(tmp_path):
    queue = Queue(str(tmp_path), fsync=False)
    envelope = queue.enqueue("s@a.test", [Recipient("r@b.test")], [ORIGINAL], requiretls=True, ret="FULL")
    envelope.recipients[0].state = State.FAILED
    envelope.recipients[0].reply = "5.7.10 REQUIRETLS: mx.b.test does not offer REQUIRETLS"
    _inline_runner(queue)._notify(envelope)
    [notice_id] = [i for i in queue.ids() if i != envelope.id]
    assert queue.load(notice_id).requiretls
    raw = b"".join(queue.message_chunks(notice_id))
    assert b"Subject: hello" in raw and b"the body" not in raw


def test_a_relayed_report_still_due_after_a_crash_is_sent_by_the_next_runner(tmp_path):
    """The relayed mark is saved with the delivery; if the runner died before queueing the
    report, the next attempt (no recipient pending) queues it and only then forgets the message."""
    queue = Queue(str(tmp_path), fsync=False)
    envelope = queue.enqueue("s@a.test", [Recipient("r@b.test", notify="SUCCESS")], [ORIGINAL], envid="E-9")
    envelope.recipients[0].state, envelope.recipients[0].relayed = State.DELIVERED, True
    envelope.recipients[0].reply = "250 2.0.0 Ok"
    queue.save(envelope)  # what was on disk when the runner died
    _inline_runner(queue).attempt(envelope.id)
    [notice_id] = queue.ids()
    assert notice_id != envelope.id
    report = email.message_from_bytes(b"".join(queue.message_chunks(notice_id)))
    per_message, block = report.get_payload()[1].get_payload()
    assert per_message["Original-Envelope-Id"] == "E-9" and block["Action"] == "relayed"


def test_the_runner_leaves_a_message_alone_until_its_client_has_its_answer(tmp_path):
    # queue/outbound enqueues "settling": on a sick disk the envelope can be in env/ while the
    # fsync of env/ is still held, and the client may yet hear 4xx (and send it again).
    queue = Queue(str(tmp_path), fsync=False)
    runner = Runner(queue, Options(me="mta.test", routes=parse_routes(["*:127.0.0.1:9"], 25)),
                    blocking=lambda function, *args, **kwargs: function(*args, **kwargs))
    envelope = queue.enqueue("s@a.test", [Recipient("r@b.test")], [ORIGINAL], settling=True)
    runner.scan()  # a periodic scan finds it meanwhile
    assert Queue(str(tmp_path)).settled(envelope.id) is False  # as the runner's process sees it
    runner.attempt(envelope.id)
    assert queue.load(envelope.id).attempts == 0  # not tried
    assert time.time() < runner.schedule.get(envelope.id) <= time.time() + 5  # but looked at again soon
    queue.settle(envelope)  # the client got its 250
    assert Queue(str(tmp_path)).settled(envelope.id) is True
    runner.attempt(envelope.id)
    assert queue.load(envelope.id).attempts == 1  # tried (port 9 refuses: deferred)


def test_a_settling_message_taken_back_is_gone_for_the_runner(tmp_path):
    queue = Queue(str(tmp_path), fsync=False)
    runner = _inline_runner(queue)
    envelope = queue.enqueue("s@a.test", [Recipient("r@b.test")], [ORIGINAL], settling=True)
    runner.scan()
    queue.take_back(envelope)  # the client hears 4xx
    with pytest.raises(FileNotFoundError):
        Queue(str(tmp_path)).settled(envelope.id)
    runner.attempt(envelope.id)
    assert runner.schedule.get(envelope.id) is None and queue.ids() == []


def test_an_enqueue_without_settling_is_the_runners_at_once(tmp_path):
    queue = Queue(str(tmp_path), fsync=False)
    envelope = queue.enqueue("s@a.test", [Recipient("r@b.test")], [ORIGINAL])
    assert Queue(str(tmp_path)).settled(envelope.id) is True


def test_the_runners_disk_work_leaves_the_reserved_threads_to_name_lookups(tmp_path):
    # A sick disk holding every fsync of the runner must not hold the threads that gevent's
    # resolver needs for each connection to a next hop (even to an IP address).
    import socket

    import gevent
    from gevent import monkey

    from qpgevent.backends import disk_threads

    disk_lets_go = monkey.get_original("_thread", "allocate_lock")()  # blocks a real thread, as an fsync
    disk_lets_go.acquire()
    started = []

    def held_save() -> str:
        started.append(1)
        disk_lets_go.acquire(True, 60)
        disk_lets_go.release()
        return "saved"

    runner = Runner(Queue(str(tmp_path), fsync=False), Options(me="mta.test"))  # its own way of writing
    threads = gevent.get_hub().threadpool.maxsize
    saves = [gevent.spawn(runner.blocking, held_save) for _ in range(threads)]  # more than there are threads
    try:
        share = threads - disk_threads.RESERVED
        wait_until(lambda: len(started) >= share, 30, "the disk's share of the threads held")
        with gevent.Timeout(10, AssertionError("a name look-up found no thread")):
            assert socket.getaddrinfo("127.0.0.1", 25, type=socket.SOCK_STREAM)
        assert len(started) == share  # the other saves wait for one of the disk's threads
    finally:
        disk_lets_go.release()
    assert [save.get(timeout=30) for save in saves] == ["saved"] * threads

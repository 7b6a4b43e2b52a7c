"""The outbound queue for operators, on a real server (master, worker, queue runner) on loopback:
the queue on the status page and in /status.json, a reload (SIGHUP) that replaces the runner,
and the lock that keeps two runners off one queue folder."""

from __future__ import annotations

import email
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import gevent
import pytest
from gevent.event import Event

from outbound_helpers import SilentServer, deferred_message, listing, loopback_ini, message, queue
from qpgevent.testing import ServerProcess, wait_until, write_ini
from qpgevent.server import queue_runner
from qpgevent.testing.mta import Postfix


def fetch(mta, path):
    with urllib.request.urlopen(f"{mta.admin_url}{path}", timeout=10) as response:
        return response.read().decode()


def metric_values(mta):
    return {name: float(value) for name, value in
            re.findall(r"^(qpgevent_outbound_\S+) (\S+)$", fetch(mta, "/metrics"), re.M)}


def test_the_status_page_and_its_json_show_the_queue_as_the_metrics_do(mta, postfix):
    held = deferred_message(mta, "held")
    assert queue(mta, "hold", held["id"])[0] == 0
    deferred_message(mta, "deferred")
    with mta.smtp() as client:
        client.sendmail("sender@sender.test", ["sender@sender.test"], message("delivered"))
    postfix.wait_for_messages("sender@sender.test", 1)

    def settled():
        shown = json.loads(fetch(mta, "/status.json"))["outbound_queue"]
        # The counters move at once, the census is published once a second: an attempt seen
        # as over in the listing or the counters may still be "active" in the census; wait
        # for the census to show every attempt over.
        return (shown and shown["held"] == 1 and shown["deliveries"]["delivered"] == 1
                and shown["messages"] == 2 and shown["active"] == 0 and shown)

    shown = wait_until(settled, 30, "the queue on /status.json: 2 messages, 1 held, 1 delivered, none active")
    assert shown["recipients"] == 2
    assert shown["deferred"] == 1
    assert shown["oldest_seconds"] > 0
    assert shown["deliveries"]["deferred"] == 2 and shown["deliveries"]["failed"] == 0
    assert shown["destination_failures"] == {"late.test": 2}
    # The same numbers as Prometheus (nothing moves: the next attempts are an hour away).
    values = metric_values(mta)
    assert values["qpgevent_outbound_queue_messages"] == shown["messages"]
    assert values["qpgevent_outbound_queue_recipients"] == shown["recipients"]
    assert values["qpgevent_outbound_queue_held_messages"] == 1
    assert values["qpgevent_outbound_queue_deferred_messages"] == 1
    assert values['qpgevent_outbound_deliveries_total{outcome="delivered"}'] == 1
    assert values['qpgevent_outbound_destination_failures_total{domain="late.test"}'] == 2
    page = fetch(mta, "/status")
    assert "<h2>Outbound queue</h2>" in page
    assert "<b>2</b> messages (2 recipients pending):\n1 deferred, 1 held, 0 being tried" in page
    assert "1 delivered, 2 deferred, 0 failed, 0 bounced" in page
    assert '<td>late.test</td><td class="num">2</td>' in page


def test_a_server_without_an_outbound_queue_shows_none(tmp_path):
    ini = write_ini(tmp_path, workers=1, admin_listen="127.0.0.1:0", run_dir=str(tmp_path / "run"))
    server = ServerProcess(ini)
    try:
        assert json.loads(fetch(server, "/status.json"))["outbound_queue"] is None
        assert "Outbound queue" not in fetch(server, "/status")
    finally:
        server.terminate()


@pytest.fixture
def two_mxs():
    """The old route's MX (each DATA takes a second: deliveries are in flight at the reload) and the new one's."""
    old = Postfix(["r@dest.test"], main={"smtpd_end_of_data_restrictions": "sleep 1"}).start()
    new = Postfix(["r@dest.test"]).start()
    yield old, new
    old.cleanup()
    new.cleanup()


def subjects(*postfixes):
    return [email.message_from_bytes(m)["Subject"] for p in postfixes for m in p.messages("r@dest.test")]


def test_sighup_restarts_the_runner_with_new_routes_and_delivers_nothing_twice(tmp_path, two_mxs):
    old, new = two_mxs
    options = {"destination_concurrency": 2, "minimal_backoff": 1, "maximal_backoff": 2}
    mta = ServerProcess(loopback_ini(tmp_path, routes=[f"*:127.0.0.1:{old.port}"], **options))
    try:
        count = 8
        for i in range(count):
            with mta.smtp() as client:
                client.sendmail("s@sender.test", ["r@dest.test"], message(f"before {i}", to="r@dest.test"))
        wait_until(lambda: old.messages("r@dest.test"), 60, "the first delivery at the old route")
        loopback_ini(tmp_path, routes=[f"*:127.0.0.1:{new.port}"], **options)
        mta.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "starting it with the new config" in mta.log(), 60, "the old runner stopped")
        wait_until(lambda: mta.log().count("queue runner started (pid") == 2, 30, "the new runner")
        assert re.search(r"queue runner \(pid \d+\) stopped", mta.log())  # it finished, was not killed
        with mta.smtp() as client:
            client.sendmail("s@sender.test", ["r@dest.test"], message("after", to="r@dest.test"))
        wait_until(lambda: "after" in subjects(new), 30, "the message after the reload at the new route")
        wait_until(lambda: listing(mta) == [], 60, "the queue empty")
        assert "after" not in subjects(old)
        delivered = subjects(old, new)
        for i in range(count):  # a graceful stop: each exactly once, whichever runner sent it
            assert delivered.count(f"before {i}") == 1, delivered
        assert delivered.count("after") == 1
        assert "SIGKILL" not in mta.log()
    finally:
        mta.terminate()


def test_a_runner_stuck_in_a_delivery_at_a_reload_is_killed_after_the_grace_and_replaced(tmp_path, postfix):
    # The old route's MX takes the message and never answers the final dot; the timeouts are an hour.
    stuck = SilentServer([b"220 hello\r\n", b"250 hi\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"])
    options = {"command_timeout": 3600, "data_timeout": 3600, "minimal_backoff": 1, "maximal_backoff": 2}
    mta = ServerProcess(loopback_ini(tmp_path, routes=[f"*:127.0.0.1:{stuck.port}"], **options))
    try:
        with mta.smtp() as client:
            client.sendmail("s@sender.test", ["sender@sender.test"], message("stuck"))
        assert stuck.reached.wait(30), "the message never reached the stuck MX"
        loopback_ini(tmp_path, routes=[f"*:127.0.0.1:{postfix.port}"], **options)
        mta.process.send_signal(signal.SIGHUP)
        grace = queue_runner.STOP_GRACE
        wait_until(lambda: f"still running {grace:.0f}s after TERM: SIGKILL" in mta.log(), grace + 60, "the kill")
        wait_until(lambda: "killed by signal SIGKILL for the reload" in mta.log(), 30, "the restart")
        # The new runner delivers it by the new route (the stuck MX never said 250: no duplicate there).
        [got] = postfix.wait_for_messages("sender@sender.test", 1, timeout=60)
        assert email.message_from_bytes(got)["Subject"] == "stuck"
        wait_until(lambda: listing(mta) == [], 30, "the queue empty")
    finally:
        mta.terminate()
        stuck.stop()


def test_a_second_runner_waits_for_the_queue_folder_until_the_first_is_gone(mta, postfix, tmp_path):
    wait_until(lambda: ") running on " in mta.log(), 30, "the server's runner holding the folder")
    log_path = tmp_path / "second-runner.log"
    with open(log_path, "wb") as log:
        second = subprocess.Popen([sys.executable, "-m", "qpgevent", "queue-runner", "-c", mta.ini,
                                   "--log-level", "info"], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        wait_until(lambda: "waiting for the runner before it" in log_path.read_text(), 30, "the second waiting")
        [first] = [int(p) for p in re.findall(r"queue runner started \(pid (\d+)\)", mta.log())]
        os.kill(first, signal.SIGKILL)
        # The kernel let go of the dead one's lock: the second runs; the supervisor's new one waits.
        wait_until(lambda: "running on" in log_path.read_text(), 30, "the second running")
        wait_until(lambda: mta.log().count("queue runner started (pid") == 2, 30, "a respawned runner")
        wait_until(lambda: "waiting for the runner before it" in mta.log(), 30, "the respawned one waiting")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
        # The respawned runner takes over and delivers.
        wait_until(lambda: mta.log().count(") running on ") == 2, 30, "the respawned one running")
        with mta.smtp() as client:
            client.sendmail("sender@sender.test", ["sender@sender.test"], message("taken over"))
        [got] = postfix.wait_for_messages("sender@sender.test", 1)
        assert email.message_from_bytes(got)["Subject"] == "taken over"
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(10)


def test_the_runner_lock_is_exclusive_until_its_descriptor_is_closed(tmp_path):
    first = queue_runner.lock_queue(str(tmp_path))
    assert first is not None
    try:
        assert queue_runner.lock_queue(str(tmp_path)) is None  # held: at once, without a stop event
        stop = Event()
        gevent.spawn_later(0.3, stop.set)
        assert queue_runner.lock_queue(str(tmp_path), stop) is None  # waited until told to stop
    finally:
        os.close(first)
    again = queue_runner.lock_queue(str(tmp_path))
    assert again is not None
    os.close(again)

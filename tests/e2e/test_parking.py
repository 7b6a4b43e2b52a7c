"""Idle sessions park without a greenlet, and wake where they stopped (qpgevent.server.parking).

Each test runs the real server with a short ``park_after`` and waits, by the server's
own account, until the session is parked (no greenlet holds it) before the client
goes on; what the client then gets must be what an unparked session would give.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import gevent
import pytest

from qpgevent.engine.session import Session
from qpgevent.testing import DEFAULT_PLUGINS, RawClient, maildir_messages, wait_until
from tls_helpers import Certs

PLUGIN_DIR = str(Path(__file__).resolve().parent.parent / "data" / "plugins")
PROBES = DEFAULT_PLUGINS + "[[context_probe]]\n[[recorder]]\n"


@pytest.fixture
def parking_server(make_server):
    def start(**settings):
        settings.setdefault("park_after", 0.05)
        return make_server(PROBES, plugin_dirs=PLUGIN_DIR, **settings)
    return start


def plugins_module(name: str):
    """A test plugin's module as the loader imported it."""
    return sys.modules["qpgevent_plugins." + name]


def parked(server, count: int = 1) -> None:
    """Wait until ``count`` sessions are parked and no greenlet serves any session."""
    def all_parked():
        holders = server.server.sessions
        return len(server.server.parking) == count and all(isinstance(h, Session) for h in holders)
    wait_until(all_parked, 5, f"{count} session(s) to park")


def test_a_session_parks_between_commands_and_goes_on_where_it_stopped(parking_server):
    server = parking_server()
    calls = plugins_module("context_probe").CALLS
    calls.clear()
    with server.smtp(timeout=10) as client:
        assert client.ehlo()[0] == 250
        parked(server)
        assert client.mail("a@client.test")[0] == 250
        parked(server)
        assert client.rcpt("bob@example.test")[0] == 250
        parked(server)
        assert client.data(b"Subject: parked\r\n\r\nthree times\r\n")[0] == 250
        parked(server)
        assert client.noop()[0] == 250
    # Woken in new greenlets, the session kept its context: log ids and DNS budget.
    ((conn, logged_conn, budget_left),) = calls
    assert logged_conn == conn and budget_left is not None and budget_left > 0
    (message,) = maildir_messages(server.maildir).values()
    assert message.endswith(b"Subject: parked\r\n\r\nthree times\r\n")
    wait_until(lambda: not server.server.sessions, 5, "the session to end")
    assert server.server.counters.count("127.0.0.1") == 0  # its place under the limits is free


def test_a_parked_session_holds_its_place_under_max_connections(parking_server):
    server = parking_server(max_connections=1)
    first = RawClient(server)
    assert first.reply()[0] == 220
    parked(server)
    second = RawClient(server)
    assert second.reply()[0] == 421  # the parked session is still one of the 1 allowed
    second.close()
    assert first.command("QUIT")[0] == 221
    first.close()
    wait_until(lambda: not server.server.sessions, 5, "the first session to end")
    third = RawClient(server)
    assert third.reply()[0] == 220
    third.close()


def test_a_parked_session_times_out_at_command_timeout(parking_server):
    server = parking_server(command_timeout=0.8)
    client = RawClient(server)
    assert client.reply()[0] == 220
    assert client.command("EHLO client.test")[0] == 250
    spoke = time.monotonic()
    parked(server)
    assert client.reply() == (421, "4.4.2 mx.example.test Timeout, closing connection")
    # Parking does not shorten (or stretch) the wait the client was promised.
    assert 0.75 <= time.monotonic() - spoke < 5
    assert client.is_closed_by_server()
    client.close()
    wait_until(lambda: not server.server.sessions, 5, "the session to end")
    assert server.server.counters.count("127.0.0.1") == 0


def test_a_client_that_leaves_while_parked_ends_its_session(parking_server):
    server = parking_server()
    recorder = plugins_module("recorder")
    client = RawClient(server)
    assert client.reply()[0] == 220
    parked(server)
    conn = next(iter(server.server.sessions)).connection.id
    client.close()
    recorder.wait_for(lambda events: ("post_connection", conn, None) in events)
    assert ("disconnect", conn, None) in recorder.EVENTS
    assert not server.server.sessions and len(server.server.parking) == 0


def test_stopping_wakes_parked_sessions_to_end_as_usual(parking_server):
    """An idle one says 421 at once (issue 21 item 8); one in a transaction may finish."""
    server = parking_server()
    leaving, idle = RawClient(server), RawClient(server)
    assert leaving.reply()[0] == 220 and idle.reply()[0] == 220
    assert leaving.command("EHLO client.test")[0] == 250
    assert leaving.command("MAIL FROM:<a@client.test>")[0] == 250
    parked(server, 2)
    stopper = gevent.spawn(server.stop, 30.0)
    # While the server waits for them, the parked sessions are served again, and do not park.
    wait_until(lambda: len(server.server.parking) == 0, 5, "the stop to wake the parked sessions")
    assert idle.reply() == (421, "4.3.2 Service shutting down, try again later")
    assert leaving.command("QUIT")[0] == 221
    stopper.get(timeout=10)  # well before the 30 s: nobody held the stop
    leaving.close()
    idle.close()


def test_a_session_about_to_park_when_the_stop_begins_waits_on_in_its_greenlet(parking_server):
    server = parking_server(park_after=0.3)
    client = RawClient(server)
    assert client.reply()[0] == 220
    assert client.command("EHLO client.test")[0] == 250
    assert client.command("MAIL FROM:<a@client.test>")[0] == 250  # in a transaction: not idle
    stopper = gevent.spawn(server.stop, 1.0)  # before the session has been silent 0.3 s
    started = time.monotonic()
    assert client.reply() == (421, "4.3.2 Service shutting down, try again later")
    assert time.monotonic() - started >= 0.9  # it was waited for, then told: never parked away
    assert len(server.server.parking) == 0
    stopper.get(timeout=10)
    client.close()


def test_an_idle_session_about_to_park_when_the_stop_begins_ends_at_once(parking_server):
    server = parking_server(park_after=0.3)
    client = RawClient(server)
    assert client.reply()[0] == 220
    assert client.command("EHLO client.test")[0] == 250
    stopper = gevent.spawn(server.stop, 30.0)
    assert client.reply() == (421, "4.3.2 Service shutting down, try again later")
    assert len(server.server.parking) == 0
    stopper.get(timeout=10)  # well before the 30 s
    client.close()


def test_park_after_zero_never_parks(parking_server):
    server = parking_server(park_after=0, command_timeout=0.6)
    assert server.server.parking.after is None
    client = RawClient(server)
    assert client.reply()[0] == 220
    assert client.command("EHLO client.test")[0] == 250
    seen = []  # how many sessions were parked, looked at every 20 ms while the client is silent
    watcher = gevent.spawn(lambda: [seen.append(len(server.server.parking)) or gevent.sleep(0.02)
                                    for _ in range(1000)])
    assert client.reply() == (421, "4.4.2 mx.example.test Timeout, closing connection")
    watcher.kill()
    assert len(seen) > 10 and not any(seen)  # idle 0.6 s in its greenlet, never parked
    client.close()


def test_a_tls_session_parks_and_wakes(parking_server, tmp_path):
    certs = Certs(tmp_path)
    server = parking_server(certificate=certs.issue())
    with server.smtp(timeout=10) as client:
        client.starttls(context=certs.client_context())
        assert client.ehlo()[0] == 250
        parked(server)
        client.sendmail("a@client.test", ["bob@example.test"], b"Subject: tls\r\n\r\nparked\r\n")
    (message,) = maildir_messages(server.maildir).values()
    assert b"with ESMTPS" in message and message.endswith(b"parked\r\n")


def test_many_parked_sessions_are_woken_by_their_own_input(parking_server):
    server = parking_server(max_connections=200)
    clients = [RawClient(server) for _ in range(100)]
    for client in clients:
        assert client.reply()[0] == 220
    parked(server, 100)
    for n, client in enumerate(clients):
        if n % 2:
            client.sock.sendall(b"NOOP\r\n")
    for n, client in enumerate(clients):
        if n % 2:
            assert client.reply()[0] == 250
    parked(server, 100)  # each answered, each parked again; the silent ones never woke
    for client in clients:
        client.sock.shutdown(socket.SHUT_WR)
        client.close()
    wait_until(lambda: not server.server.sessions, 10, "every session to end")

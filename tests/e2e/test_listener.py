"""The server's own accept loop and crew (``qpgevent.server.listener``), on real loopback sockets.

A greenlet serves one connection after another, each in a fresh context; at most
``capacity`` at once (the kernel queues the rest until one ends); at most ``spares`` wait
between connections; a session that raises does not stop the serving; a worker out of
descriptors pauses accepting and serves again once it has some; the operator's kick of a
session that ended never reaches the next connection its greenlet took; and a timer a session
left running, firing after it ended, costs no later connection.
"""

from __future__ import annotations

import contextvars
import socket

import gevent
import gevent.socket
import pytest

from qpgevent.core.reply import Canned
from qpgevent.server.listener import Crew, Listener
from qpgevent.server.steering import Kicked
from qpgevent.testing import DEFAULT_PLUGINS, RawClient, ServerProcess, wait_until, write_ini

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen")


class Harness:
    """A Listener and its Crew on a loopback socket; ``handle`` says "ok <n>" and holds the
    connection until the client closes."""

    def __init__(self, capacity: int = 100, spares: int = 8, fail_first: bool = False,
                 timer_seconds: float | None = None) -> None:
        self.records: list[tuple[object, str | None]] = []
        self.fail_first = fail_first
        self.timer_seconds = timer_seconds  #: each session starts a gevent.Timeout and never cancels it
        self.timers: list[gevent.Timeout] = []
        self.crew = Crew(self.handle, capacity, spares)
        sock = gevent.socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self.listener = Listener(sock, self.crew, "extra")
        self.listener.start()

    def handle(self, sock: gevent.socket.socket, address: tuple, extra: str) -> None:
        try:
            assert extra == "extra"
            self.records.append((gevent.getcurrent(), SEEN.get(None)))
            SEEN.set(f"session {len(self.records)}")  # the next session must not see it
            if self.fail_first and len(self.records) == 1:
                raise RuntimeError("a bug in a session")
            if self.timer_seconds is not None:  # a plugin's mistake: started, never cancelled
                self.timers.append(gevent.Timeout.start_new(self.timer_seconds))
            sock.sendall(f"ok {len(self.records)}\r\n".encode())
            while sock.recv(100):
                pass
        finally:
            sock.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def close(self) -> None:
        self.listener.close()
        self.crew.kill()
        assert self.crew.join(5)
        self.crew.close()


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(**kwargs) -> Harness:
        made.append(Harness(**kwargs))
        return made[-1]
    yield make
    for each in made:
        each.close()


def greeting(client: socket.socket) -> bytes:
    return client.recv(100)


def test_one_greenlet_serves_connection_after_connection_each_in_a_fresh_context(harness):
    served = harness(spares=1)
    for n in range(1, 4):
        with served.connect() as client:
            assert greeting(client) == f"ok {n}\r\n".encode()
        wait_until(lambda: not served.crew.busy, 10, "the session ended")
    greenlets = {id(greenlet) for greenlet, _ in served.records}
    assert len(greenlets) == 1  # reused, not one greenlet per connection
    assert [seen for _, seen in served.records] == [None, None, None]


def test_at_most_capacity_sessions_run_and_the_next_client_waits_in_the_kernels_queue(harness):
    served = harness(capacity=2)
    first, second, third = served.connect(), served.connect(), served.connect()
    try:
        assert greeting(first).startswith(b"ok") and greeting(second).startswith(b"ok")
        third.settimeout(0.5)
        with pytest.raises(TimeoutError):  # connected (the kernel's queue), not accepted
            third.recv(100)
        first.close()
        third.settimeout(10)
        assert greeting(third) == b"ok 3\r\n"
    finally:
        for client in (first, second, third):
            client.close()


def test_at_most_spares_greenlets_wait_between_connections(harness):
    served = harness(spares=2)
    clients = [served.connect() for _ in range(6)]
    for client in clients:
        assert greeting(client).startswith(b"ok")
    assert len(served.crew.busy) == 6
    for client in clients:
        client.close()
    wait_until(lambda: not served.crew.busy, 10, "every session ended")
    assert len(served.crew._spare) == 2
    assert sum(not greenlet.dead for greenlet in {greenlet for greenlet, _ in served.records}) == 2


def test_a_session_that_raises_does_not_stop_the_serving(harness):
    served = harness(spares=1, fail_first=True)
    with served.connect() as client:
        assert greeting(client) == b""  # the failed session closed its socket
    with served.connect() as client:
        assert greeting(client) == b"ok 2\r\n"
    assert served.records[0][0] is served.records[1][0]


def test_a_kick_for_a_session_that_ended_does_not_reach_the_next_one(make_server):
    server = make_server(park_after=0)
    crew = server.server.crew
    crew.spares = 1
    first = RawClient(server)
    assert first.reply()[0] == 220
    conn_id, greenlet = wait_until(lambda: next(iter(server.server.holding.items()), None), 10, "a session runs")
    assert first.command("QUIT")[0] == 221
    first.close()
    wait_until(lambda: not crew.busy, 10, "the first session ended")
    second = RawClient(server)
    assert second.reply()[0] == 220
    assert wait_until(lambda: next(iter(server.server.holding.values()), None), 10, "the second runs") is greenlet
    assert not server.server.end_session(conn_id, Kicked(Canned.SHUTTING_DOWN))
    assert second.command("NOOP")[0] == 250
    second.close()


def test_out_of_descriptors_the_worker_pauses_accepting_then_serves_again(tmp_path):
    # 64 descriptors for the whole worker: a few dozen sessions use them up; the next
    # accept fails with EMFILE, and the client waits in the kernel's queue until some close.
    ini = write_ini(tmp_path, DEFAULT_PLUGINS, workers="1", max_connections="500")
    server = ServerProcess(ini, prefix=["/usr/bin/prlimit", "--nofile=64:64", "--"])
    clients: list[RawClient] = []
    try:
        for _ in range(80):
            client = RawClient(server)
            clients.append(client)
        wait_until(lambda: "accept failed" in server.log(), 20, "an accept that fails for want of descriptors")
        for client in clients[:40]:
            client.close()
        for client in clients[40:]:
            # every queued client is served once descriptors are free (first the 220 or a 421)
            assert client.reply()[0] in (220, 421)
        with server.smtp() as smtp:
            assert smtp.noop()[0] == 250
    finally:
        for client in clients:
            client.close()
        server.terminate()


def test_a_timer_left_running_by_an_ended_session_costs_no_later_connection(harness):
    # Fired while its greenlet waits as a spare: dropped, and the spare serves the next client.
    served = harness(spares=1, timer_seconds=1)
    with served.connect() as client:
        assert greeting(client) == b"ok 1\r\n"
    wait_until(lambda: not served.crew.busy, 10, "the session ended")
    wait_until(lambda: not served.timers[0].pending, 10, "its timer fired")
    served.timer_seconds = None
    with served.connect() as client:
        assert greeting(client) == b"ok 2\r\n"
    assert served.records[0][0] is served.records[1][0]


def test_a_timer_that_lands_in_a_later_session_ends_that_one_and_the_greenlet_serves_on(harness):
    # Fired into the next session of its greenlet: that session ends (its socket closes), as if
    # its own code had raised; the greenlet is not lost with it.
    served = harness(spares=1, timer_seconds=5)  # the second client is served well before, even loaded
    with served.connect() as client:
        assert greeting(client) == b"ok 1\r\n"
    wait_until(lambda: not served.crew.busy, 10, "the first session ended")
    served.timer_seconds = None
    second = served.connect()
    with second:
        assert greeting(second) == b"ok 2\r\n"
        second.settimeout(30)
        assert second.recv(100) == b""  # the first session's timer ended the second
    with served.connect() as client:
        assert greeting(client) == b"ok 3\r\n"
    assert served.records[0][0] is served.records[1][0] is served.records[2][0]

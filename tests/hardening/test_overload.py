"""Issue 21, "build as well": overload, the way Postfix's stress mode does it.

Near ``max_connections`` the host is in stress (``[limits] stress_at``): idle sessions with
no transaction are shed with 421 (``qpgevent.server.shedding``), command waits shrink to
``stress_command_timeout``, and a fresh client is still served. The real multi-worker
server (``ServerProcess``, two workers) against real sockets; the idle clients are
greenlets of this process, bound to many loopback source addresses. One test runs the
server in this process (``make_server``) to turn its periodic look off, so that only a
client finding no place can make room; one checks the input test on a descriptor past
1023, which a worker with a thousand sessions has.
"""

from __future__ import annotations

import re
import resource
import socket
import time
import urllib.request
from pathlib import Path

import gevent
import gevent.event
import gevent.lock

from qpgevent.server import shedding
from qpgevent.server.driver import has_input
from qpgevent.testing import DEFAULT_PLUGINS, RawClient, ServerProcess, maildir_messages, wait_until, write_ini

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIR = str(ROOT / "tests" / "data" / "plugins")
SHED = "Too busy, closing idle connection"


class IdleClient:
    """Connects from ``source``, reads the greeting, says EHLO, then holds the connection
    and keeps what the server says until it closes (``said``: from the greeting on, if
    refused at once; else from after the EHLO reply)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.port, self.source = port, source
        self.sock: socket.socket | None = None
        self.holding = False  #: greeted and EHLO answered
        self.said = b""
        self.done = gevent.event.Event()  #: the server closed (or the client failed: ``error``)
        self.error: BaseException | None = None

    def run(self, gate: gevent.lock.Semaphore | None = None) -> None:
        try:
            with gate or gevent.lock.DummySemaphore():
                self._greet()
            while self.holding:
                chunk = self.sock.recv(4096)  # type: ignore[union-attr]
                if not chunk:
                    break
                self.said += chunk
        except ConnectionResetError:
            pass  # a close too
        except BaseException as error:  # noqa: B036 - kept for the assertion, not swallowed
            self.error = error
        finally:
            self.done.set()

    def _greet(self) -> None:
        sock = self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(120)
        sock.bind((self.source, 0))
        sock.connect(("127.0.0.1", self.port))
        greeting = self._reply(b"")
        if not greeting.startswith(b"220"):
            self.said = greeting + self._rest()
            return
        sock.sendall(b"EHLO idle.example.test\r\n")
        answer = self._reply(b"")
        if not answer.startswith(b"250"):
            self.said = answer + self._rest()
            return
        self.holding = True

    def _reply(self, data: bytes) -> bytes:
        """One whole reply (every line of a multi-line one)."""
        while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", data):
            chunk = self.sock.recv(4096)  # type: ignore[union-attr]
            if not chunk:
                return data
            data += chunk
        return data

    def _rest(self) -> bytes:
        data = b""
        while chunk := self.sock.recv(4096):  # type: ignore[union-attr]
            data += chunk
        return data

    @property
    def shed(self) -> bool:
        return self.said.startswith(b"421 4.3.2 ") and SHED.encode() in self.said

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def hold(clients: list[IdleClient], gate: gevent.lock.Semaphore | None = None) -> list[gevent.Greenlet]:
    return [gevent.spawn(client.run, gate) for client in clients]


def closed_without_421(clients: list[IdleClient]) -> list[tuple[str, bytes, BaseException | None]]:
    return [(client.source, client.said[:80], client.error) for client in clients
            if client.done.is_set() and (client.error is not None or not client.said.startswith(b"421 "))]


def shipped_ini(directory: Path) -> Path:
    """The shipped qpsmtpd.ini in ``directory`` (so its spool and Maildir are there), on a
    free loopback port, with two workers."""
    text = (ROOT / "qpsmtpd.ini").read_text(encoding="utf-8")
    text, listens = re.subn(r"(?m)^(\s*)listen = .*$", r"\1listen = 127.0.0.1:0", text)
    text, workers = re.subn(r"(?m)^(\s*)workers = 0$", r"\1workers = 2", text)
    assert listens == workers == 1, "the shipped qpsmtpd.ini changed: update this test"
    for expected in ("max_connections = 1000", "max_conn_ip = 20"):
        assert expected in text, f"the issue's scenario is the shipped config's: {expected}"
    path = directory / "qpsmtpd.ini"
    path.write_text(text, encoding="utf-8")
    return path


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= 4500, f"this test needs some 4,000 descriptors, the hard limit is {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def test_2000_idle_connections_do_not_stop_a_new_client(tmp_path):
    raise_fd_limit()  # the server inherits it too
    process = ServerProcess(shipped_ini(tmp_path))
    # 20 per address (the shipped hosts_allow max_conn_ip), from 100 addresses 127.0.1.1..
    clients = [IdleClient(process.port, f"127.0.{1 + n // 200}.{1 + n // 20 % 10}") for n in range(2000)]
    greenlets = hold(clients, gevent.lock.Semaphore(200))  # 200 connecting at a time: the backlog
    try:
        wait_until(lambda: all(c.holding or c.done.is_set() for c in clients), 180, "2,000 clients to connect")
        holding = sum(c.holding and not c.done.is_set() for c in clients)
        started = time.monotonic()
        with gevent.Timeout(5, AssertionError("a new client's transaction took more than 5 s")):
            with process.smtp(timeout=5) as newcomer:
                refused = newcomer.sendmail("a@client.example.test", ["bob@example.test"],
                                            b"Subject: through\r\n\r\nin spite of 2,000 idle connections\r\n")
        took = time.monotonic() - started
        assert refused == {}
        print(f"\n{holding} idle sessions held, {sum(c.shed for c in clients)} shed; "
              f"the new client's transaction took {took:.2f}s")
        (message,) = maildir_messages(tmp_path / "spool" / "Maildir").values()
        assert message.endswith(b"in spite of 2,000 idle connections\r\n")
        # At most 1000 places: the other clients were refused or shed, and each was told so.
        closed = [c for c in clients if c.done.is_set()]
        assert len(closed) >= 1000
        # Shed, not only refused: the sessions that hold the host's 1,000 places park (after
        # park_after) and the shedder takes the host down to its mark (stress_at 90%: 900).
        # Clients that arrive faster than sessions park find them not yet idle: refused.
        wait_until(lambda: sum(c.shed for c in clients) >= 100, 60, "100 idle sessions to be shed")
        assert closed_without_421(clients) == []
    finally:
        for client in clients:
            client.close()
        gevent.killall(greenlets, timeout=10)
        process.terminate(60)
    log = process.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 1000:][:5000]


def stress_lines(process: ServerProcess, what: str) -> set[int]:
    """The pids of the workers that logged ``what`` (``stress:`` or ``stress over:``)."""
    return {int(pid) for pid in re.findall(rf"^\S+ \S+ (\d+) \w+ qpgevent\.server: {what}", process.log(),
                                           re.MULTILINE)}


def small_server(tmp_path: Path, plugins: str = DEFAULT_PLUGINS, **settings: object) -> ServerProcess:
    """Two workers, ten places (so stress from 9 sessions on, until under 8), parking at once."""
    settings = {"workers": 2, "max_connections": 10, "park_after": 0.05, "command_timeout": 120,
                **settings}
    process = ServerProcess(write_ini(tmp_path, plugins, **settings))
    process.maildir = tmp_path / "Maildir"  # type: ignore[attr-defined]
    return process


AUTH_ANY = "[[returns]]\n  hook = auth\n  code = OK\n" + DEFAULT_PLUGINS


def test_sessions_in_a_transaction_or_authenticated_are_never_shed(tmp_path):
    # A long stress timeout: here only shedding may close a session.
    process = small_server(tmp_path, AUTH_ANY, plugin_dirs=PLUGIN_DIR, listen="127.0.0.1:0/plainauth",
                           auth_failure_delay=0, stress_command_timeout=100, admin_listen="127.0.0.1:0")
    sender, user = RawClient(process), RawClient(process)
    idle = [IdleClient(process.port) for _ in range(12)]
    greenlets: list[gevent.Greenlet] = []
    try:
        for client in (sender, user):
            assert client.reply()[0] == 220
            assert client.command("EHLO c.test")[0] == 250
        assert sender.command("MAIL FROM:<a@c.test>")[0] == 250
        assert user.command("AUTH PLAIN AGRhdmUAc2VjcmV0")[0] == 235  # \0dave\0secret
        # Older than every idle client, the two are the first a shedder looks at.
        for client in idle:  # one after the other: the host fills up, then sheds
            greenlets += hold([client])
            wait_until(lambda: client.holding or client.done.is_set(), 30, "an idle client to connect")
        # 14 sessions for 10 places, the host back under its mark of 9: 6 closed, at least 5.
        wait_until(lambda: sum(c.done.is_set() for c in idle) >= 5, 30, "idle sessions to be closed")
        assert closed_without_421(idle) == []
        assert any(c.shed for c in idle)
        assert sender.command("RCPT TO:<bob@example.test>")[0] == 250
        assert sender.command("DATA")[0] == 354
        assert sender.command("Subject: kept\r\n\r\nnot shed\r\n.")[0] == 250
        assert user.command("NOOP")[0] == 250
        assert len(maildir_messages(process.maildir)) == 1  # type: ignore[attr-defined]
        assert re.search(r"conn=\S+ shed: the host is in stress", process.log())
        with urllib.request.urlopen(f"{process.admin_url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        shed = sum(float(n) for n in re.findall(r"^qpgevent_sessions_shed_total (\S+)$", metrics, re.MULTILINE))
        assert shed == sum(c.shed for c in idle)
    finally:
        for client in (sender, user, *idle):
            client.close()
        gevent.killall(greenlets, timeout=10)
        process.terminate(60)


def test_in_stress_idle_clients_are_cut_at_the_stress_timeout_and_after_it_at_command_timeout(tmp_path):
    command_timeout, in_stress = 120, 2
    process = small_server(tmp_path, command_timeout=command_timeout, stress_command_timeout=in_stress)
    workers = set(process.worker_pids())
    idle = [IdleClient(process.port) for _ in range(9)]  # 9: the mark
    greenlets = hold(idle)
    try:
        wait_until(lambda: all(c.done.is_set() for c in idle), command_timeout / 4,
                   "every idle client to be cut well before command_timeout")
        assert closed_without_421(idle) == []
        timed_out = [c for c in idle if c.said.startswith(b"421 4.4.2 ")]
        assert timed_out and all(c.shed for c in idle if c not in timed_out)
        wait_until(lambda: stress_lines(process, "stress:") == workers, 30, "both workers in stress")
        wait_until(lambda: stress_lines(process, "stress over:") == workers, 30, "both workers out of stress")
        # Out of stress, an idle client waits command_timeout again: 3 times the stress
        # timeout later it is still served.
        calm = RawClient(process)
        try:
            assert calm.reply()[0] == 220
            assert calm.command("EHLO c.test")[0] == 250
            calm.sock.settimeout(3 * in_stress)
            try:
                early = calm.sock.recv(100)
            except TimeoutError:
                early = None
            assert early is None, f"cut out of stress: {early!r}"
            calm.sock.settimeout(10)
            assert calm.command("NOOP")[0] == 250
        finally:
            calm.close()
    finally:
        for client in idle:
            client.close()
        gevent.killall(greenlets, timeout=10)
        process.terminate(60)


def test_a_client_that_finds_no_place_makes_room_by_shedding_the_longest_idle(make_server):
    server = make_server(max_connections=10, park_after=0.05, stress_command_timeout=100)
    server.server.shedder.stop()  # no periodic look: only the client that finds no place may shed
    clients = [RawClient(server) for _ in range(10)]
    try:
        for client in clients:  # in this order: the first is the longest idle
            assert client.reply()[0] == 220
            assert client.command("EHLO c.test")[0] == 250
        wait_until(lambda: len(server.server.parking) == 10, 10, "every session to park")
        newcomer = RawClient(server)
        try:
            assert newcomer.reply()[0] == 220
            assert newcomer.command("EHLO new.test")[0] == 250
        finally:
            newcomer.close()
        # 10 sessions and the mark at 9: two shed to get under it, the two idle the longest.
        for client in clients[:2]:
            code, text = client.reply()
            assert (code, text.split()[:2]) == (421, ["4.3.2", "mx.example.test"]) and SHED in text, text
            assert client.is_closed_by_server()
        for client in clients[2:]:
            assert client.command("NOOP")[0] == 250
    finally:
        for client in clients:
            client.close()


def busy_server(make_server, monkeypatch, room_wait: float):
    """Ten places (a reserve of one), each held by a client in a transaction (never shed),
    and no periodic look: no place will be made but by a client leaving."""
    monkeypatch.setattr(shedding, "ROOM_WAIT", room_wait)
    server = make_server(max_connections=10, park_after=0.05, stress_command_timeout=100)
    server.server.shedder.stop()
    clients = [RawClient(server) for _ in range(10)]
    for client in clients:
        assert client.reply()[0] == 220
        assert client.command("EHLO c.test")[0] == 250
        assert client.command("MAIL FROM:<a@c.test>")[0] == 250
    return server, clients


def test_a_newcomer_with_nothing_to_shed_waits_for_a_place_one_more_is_refused_at_once(make_server, monkeypatch):
    # Under a master, the idle sessions may be another worker's, shed at its next look: the
    # newcomer waits for that rather than get 421 while the host has idle sessions to spare.
    server, clients = busy_server(make_server, monkeypatch, room_wait=60)
    waiting = RawClient(server)
    try:
        wait_until(lambda: server.server.shedder.waiting == 1, 10, "the newcomer to wait for a place")
        # The reserve (one place) is how many may wait at once: the next is refused now.
        refused = RawClient(server)
        code, text = refused.reply()
        assert (code, text) == (421, "4.3.2 Too many connections, try again later")
        assert refused.is_closed_by_server()
        assert not has_input(waiting.sock)  # still waiting, not refused
        assert clients[0].command("QUIT")[0] == 221
        assert waiting.reply()[0] == 220  # the place that client left
        assert waiting.command("EHLO new.test")[0] == 250
    finally:
        for client in (*clients, waiting):
            client.close()


def test_a_newcomer_waits_for_a_place_at_most_room_wait_then_gets_421(make_server, monkeypatch):
    server, clients = busy_server(make_server, monkeypatch, room_wait=0.3)
    newcomer = RawClient(server)
    try:
        code, text = newcomer.reply()
        assert (code, text) == (421, "4.3.2 Too many connections, try again later")
        assert newcomer.is_closed_by_server()
        assert server.server.shedder.waiting == 0
        for client in clients:  # untouched by the wait
            assert client.command("RCPT TO:<bob@example.test>")[0] == 250
    finally:
        for client in (*clients, newcomer):
            client.close()


def test_a_newcomer_waiting_for_a_place_when_the_server_stops_gets_421(make_server, monkeypatch):
    server, clients = busy_server(make_server, monkeypatch, room_wait=60)
    waiting = RawClient(server)
    try:
        wait_until(lambda: server.server.shedder.waiting == 1, 10, "the newcomer to wait for a place")
        server.server.stop(timeout=0.5)
        code, text = waiting.reply()
        assert (code, text) == (421, "4.3.2 Service shutting down, try again later")
        assert waiting.is_closed_by_server()
    finally:
        for client in (*clients, waiting):
            client.close()


def test_input_is_seen_on_a_descriptor_past_1023():
    # A worker with a thousand sessions has such descriptors; select() refuses them
    # (FD_SETSIZE), which made idle sessions unsheddable and broke their 421 at stop.
    raise_fd_limit()
    filler = [socket.socket() for _ in range(1100)]
    ours, theirs = socket.socketpair()
    try:
        assert ours.fileno() > 1023
        assert not has_input(ours) and not has_input(ours, 0.05)
        theirs.sendall(b"NOOP\r\n")
        assert has_input(ours, 10)
    finally:
        for sock in (*filler, ours, theirs):
            sock.close()

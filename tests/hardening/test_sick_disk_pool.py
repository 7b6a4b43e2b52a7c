"""queue/maildir on a sick disk holding more deliveries than gevent's hub has worker threads.

The disk is test_sick_disk's (``qpgevent.testing.faulty_disk``: FUSE whose fsyncs a test holds).
Where a delivery needs a worker thread (the Maildir on FUSE: a thread writes, fsyncs and
renames; or fsyncs in threads, where Linux AIO is refused), a disk that holds every file
fsync holds the thread with it, and gevent's hub has only a few (10 by default). The same
threads serve everything else that would block the event loop: gevent's resolver (every
``getaddrinfo``, even of 127.0.0.1, so every ``socket.create_connection``: a virus scanner's,
an ident query's, this test's own clients), auth/flat_file's password hashes, dkim. So:

- more sessions ending DATA at once than there are threads each get 451 at the hook's
  timeout, none later because it waited behind held threads, and none enters ``new/``, not
  even once the disk lets go; ``tmp/`` is emptied;
- meanwhile a session that does not deliver is served, AUTH and a new connection included:
  disk work holds at most all but ``disk_threads.RESERVED`` of the threads;
- once the disk heals, the next message is delivered: the threads came back.
"""

from __future__ import annotations

import base64
import socket

import gevent
import pytest

from hardening_helpers import client_in_data
from qpgevent.backends import disk as disk_backend
from qpgevent.backends import disk_threads, kernel_fsync
from qpgevent.testing import RawClient, wait_until
from test_sick_disk import (PLUGINS, delivered, disk, in_folder, message, nothing_went_wrong_but_the_timeouts,
                            threads_in_uninterruptible_sleep)
from test_thin_spots import flat_file

__all__ = ["disk"]  # the fixture, shared with test_sick_disk

THREADS = gevent.get_hub().threadpool.maxsize  #: gevent's default: 10
SESSIONS = THREADS + 4  #: ending DATA at once, each fsync held by the disk
HELD = 120  #: seconds the disk holds an fsync at most: the tests heal it sooner
PATIENCE = 30  #: seconds a reply may take on a loaded machine: far past the hook's 1 s, far short of HELD
USERS = "[[auth/flat_file]]\n  users = users.auth\n"


@pytest.fixture
def pool_server(disk, tmp_path, make_server):
    """``pool_server()``: the server with its Maildir on ``disk`` (mounted first) and AUTH
    PLAIN for bob, password "secret" (auth/flat_file hashes it in a worker thread)."""
    def start():
        (tmp_path / "users.auth").write_text(f"bob:{flat_file().make_hash('secret', (1 << 4, 1, 1))}\n")
        return make_server(USERS + PLUGINS, listen="127.0.0.1:0/plainauth", auth_failure_delay=0)
    return start


@pytest.fixture(params=["fuse", "fsync-in-threads"])
def server(request, pool_server, monkeypatch):
    """Every delivery needing a worker thread: on FUSE (a thread writes, fsyncs and renames),
    or as on a disk file system without Linux AIO (the loop writes and renames, a thread fsyncs)."""
    if request.param == "fsync-in-threads":
        monkeypatch.setattr(kernel_fsync, "_here", None)
        monkeypatch.setattr(disk_backend, "on_fuse", lambda folder: False)
    return pool_server()


def end_data_at_once(clients: dict[int, RawClient]) -> dict[int, int]:
    """Each client (in DATA, its text sent) ends its message; the reply code to each. A reply
    later than PATIENCE fails (socket.timeout): it waited for the disk, not for the timeout."""
    readers = end_data(clients, PATIENCE)
    gevent.joinall(readers.values(), raise_error=True)
    return {number: reader.value[0] for number, reader in readers.items()}


def end_data(clients: dict[int, RawClient], patience: float) -> dict[int, gevent.Greenlet]:
    """Each client ends its message: a greenlet each, reading its reply (within ``patience``)."""
    for client in clients.values():
        client.sock.settimeout(patience)
        client.sock.sendall(b".\r\n")
    return {number: gevent.spawn(client.reply) for number, client in clients.items()}


def in_data(server, numbers) -> dict[int, RawClient]:
    """One session per message, in DATA with the message's text sent (connected while the
    threads are free: the test's client resolves the address in one)."""
    clients: dict[int, RawClient] = {}
    try:
        for number in numbers:
            clients[number] = client_in_data(server)
            clients[number].sock.sendall(message(number))
    except BaseException:
        for client in clients.values():
            client.close()
        raise
    return clients


def a_session_that_does_not_deliver(server) -> list[int]:
    """A new connection (its address resolved by gevent's resolver, in a worker thread),
    EHLO, AUTH PLAIN (the password hashed in a worker thread), MAIL, RCPT, RSET, NOOP, QUIT:
    the reply codes."""
    client = RawClient(server)
    try:
        codes = [client.reply()[0]]
        plain = base64.b64encode(b"\0bob\0secret").decode()
        for line in ("EHLO bystander.test", f"AUTH PLAIN {plain}", "MAIL FROM:<a@client.test>",
                     "RCPT TO:<bob@example.test>", "RSET", "NOOP", "QUIT"):
            codes.append(client.command(line)[0])
        return codes
    finally:
        client.close()


def test_more_held_deliveries_than_threads_get_4xx_at_the_timeout_and_the_rest_is_served(
        disk, server, caplog, capfd):
    clients = in_data(server, range(SESSIONS))
    try:
        disk.slow("/tmp/*", HELD)
        assert set(end_data_at_once(clients).values()) == {451}
    finally:
        for client in clients.values():
            client.close()
    # Every 451 came while the disk still holds the fsyncs: none waited for it. The disk
    # holds as many as disk work may take threads, and no more.
    held = disk.held()
    assert 0 < len(held) <= THREADS - disk_threads.RESERVED and all(h.startswith("/tmp/") for h in held)

    # The threads left serve what does not write to the disk: names resolved, a password checked.
    with gevent.Timeout(PATIENCE, AssertionError("a session that does not deliver stalled")):
        assert a_session_that_does_not_deliver(server) == [220, 250, 235, 250, 250, 250, 250, 221]
        assert socket.getaddrinfo("localhost", 25, type=socket.SOCK_STREAM)  # gevent's resolver, in a thread
    assert disk.held() == held and in_folder(disk, "new") == []

    disk.heal()  # the held fsyncs complete now, late: their deliveries must stop before new/
    wait_until(lambda: not disk.held() and in_folder(disk, "tmp") == [], 60, "the late fsyncs done, tmp/ emptied")
    assert [e for e in disk.events() if e.call in ("rename", "link")] == []  # nothing entered new/, ever
    # The deliveries that waited for a thread never fsynced: their work never ran once they gave up.
    assert sorted(e.path for e in disk.events() if e.call == "fsync") == sorted(held)
    assert in_folder(disk, "new") == []

    # The threads came back: the next messages are delivered.
    clients = in_data(server, [SESSIONS, SESSIONS + 1])
    try:
        assert set(end_data_at_once(clients).values()) == {250}
    finally:
        for client in clients.values():
            client.close()
    assert delivered(disk) == [SESSIONS, SESSIONS + 1] and in_folder(disk, "tmp") == []
    nothing_went_wrong_but_the_timeouts(caplog, capfd)


def test_more_renames_waiting_for_a_held_fsync_of_new_than_threads_stall_no_other_session(
        disk, pool_server, caplog, capfd):
    """On FUSE, a rename into new/ waits while the kernel locks it for its fsync: each waits in
    a thread, past its point of no return, so its 451 waits for the disk (until the message
    is out of new/ again). With more of them than threads, the sessions that do not deliver
    are served all the same, and each message is taken back out once the disk lets go."""
    server = pool_server()
    disk.slow("/new", HELD, call="fsyncdir", times=1)
    clients = in_data(server, range(SESSIONS))
    try:
        readers = end_data(clients, HELD)
        wait_until(lambda: disk.held() == ["/new"], PATIENCE, "the first message's fsync of new/ held")
        wait_until(lambda: threads_in_uninterruptible_sleep() >= THREADS - disk_threads.RESERVED - 1, PATIENCE,
                   "every other thread disk work may hold waiting to rename into new/")
        with gevent.Timeout(PATIENCE, AssertionError("a session that does not deliver stalled")):
            assert a_session_that_does_not_deliver(server) == [220, 250, 235, 250, 250, 250, 250, 221]
        # The sessions that found no thread free get their 451 at the timeout; the others took
        # a thread before them, so their timeouts have fired too: they wait for the disk now.
        wait_until(lambda: any(reader.ready() for reader in readers.values()), PATIENCE, "a first 451")
        assert disk.held() == ["/new"]  # still: neither the bystander nor those 451s waited for the disk
        disk.heal()
        gevent.joinall(readers.values(), raise_error=True)
        assert {reader.value[0] for reader in readers.values()} == {451}
    finally:
        for client in clients.values():
            client.close()
    events = disk.events()
    renamed = {e.target for e in events if e.call == "rename" and e.target.startswith("/new/")}
    assert renamed and renamed <= {e.path for e in events if e.call == "unlink"}  # each taken back out
    assert in_folder(disk, "new") == [] and in_folder(disk, "tmp") == []

    clients = in_data(server, [SESSIONS])
    try:
        assert end_data_at_once(clients) == {SESSIONS: 250}
    finally:
        clients[SESSIONS].close()
    assert delivered(disk) == [SESSIONS]
    nothing_went_wrong_but_the_timeouts(caplog, capfd)

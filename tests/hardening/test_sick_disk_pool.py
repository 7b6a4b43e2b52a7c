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
from test_sick_disk import PLUGINS, delivered, disk, in_folder, message, nothing_went_wrong_but_the_timeouts
from test_thin_spots import flat_file

__all__ = ["disk"]  # the fixture, shared with test_sick_disk

THREADS = gevent.get_hub().threadpool.maxsize  #: gevent's default: 10
SESSIONS = THREADS + 4  #: ending DATA at once, each fsync held by the disk
HELD = 120  #: seconds the disk holds an fsync at most: the tests heal it sooner
PATIENCE = 30  #: seconds a reply may take on a loaded machine: far past the hook's 1 s, far short of HELD
USERS = "[[auth/flat_file]]\n  users = users.auth\n"


@pytest.fixture(params=["fuse", "fsync-in-threads"])
def server(request, disk, tmp_path, monkeypatch, make_server):
    """The server with its Maildir on ``disk``, every delivery needing a worker thread: on FUSE
    (a thread writes, fsyncs and renames), or as on a disk file system without Linux AIO (the
    loop writes and renames, a thread fsyncs). AUTH PLAIN for bob, password "secret"."""
    if request.param == "fsync-in-threads":
        monkeypatch.setattr(kernel_fsync, "_here", None)
        monkeypatch.setattr(disk_backend, "on_fuse", lambda folder: False)
    (tmp_path / "users.auth").write_text(f"bob:{flat_file().make_hash('secret', (1 << 4, 1, 1))}\n")
    return make_server(USERS + PLUGINS, listen="127.0.0.1:0/plainauth", auth_failure_delay=0)


def end_data_at_once(clients: dict[int, RawClient]) -> dict[int, int]:
    """Each client (in DATA, its text sent) ends its message; the reply code to each. A reply
    later than PATIENCE fails (socket.timeout): it waited for the disk, not for the timeout."""
    for client in clients.values():
        client.sock.settimeout(PATIENCE)
        client.sock.sendall(b".\r\n")
    readers = {number: gevent.spawn(client.reply) for number, client in clients.items()}
    gevent.joinall(readers.values(), raise_error=True)
    return {number: reader.value[0] for number, reader in readers.items()}


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

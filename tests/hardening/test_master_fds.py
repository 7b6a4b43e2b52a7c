"""Issue 21, item 1: the master must not die when it runs out of file descriptors.

The real ``python -m qpgevent`` with one worker and the admin server on. Idle admin
connections cost the master at most ``[admin] max_connections`` descriptors and are
closed after ``[admin] timeout``; with the master's fd table full (its RLIMIT_NOFILE
lowered to what it holds), a killed worker cannot be forked again (``os.pipe`` raises
EMFILE): the master logs it, stays up, and forks the worker once descriptors are free.
"""

from __future__ import annotations

import os
import resource
import signal
import socket

from qpgevent.testing import wait_until

RECIPIENT = "bob@example.test"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def admin_address(process) -> tuple[str, int]:
    host, port = process.admin_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def test_idle_admin_connections_are_bounded_and_closed(server_process):
    process = server_process(workers=1, admin_listen="127.0.0.1:0", admin_max_connections=3, admin_timeout=1)
    master = process.process.pid
    before = fd_count(master)
    held = [socket.create_connection(admin_address(process), timeout=30) for _ in range(40)]
    try:
        # The master accepts no more than three at a time: the rest wait in the kernel's queue.
        wait_until(lambda: fd_count(master) >= before + 3, 10, "the admin server accepts")
        assert fd_count(master) <= before + 3 + 2, process.log()
        # An idle one is closed by the server (EOF), not held forever.
        assert held[0].recv(100) == b""
    finally:
        for sock in held:
            sock.close()
    # And the admin pages still answer afterwards.
    with socket.create_connection(admin_address(process), timeout=30) as sock:
        sock.sendall(b"GET /status.json HTTP/1.0\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200"), process.log()


def test_master_survives_a_full_fd_table_and_respawns_later(server_process):
    process = server_process(workers=1, admin_listen="127.0.0.1:0")
    master = process.process.pid
    [worker] = process.worker_pids()
    soft, hard = resource.prlimit(master, resource.RLIMIT_NOFILE)
    # Full: the master may hold no more descriptors than it does now.
    resource.prlimit(master, resource.RLIMIT_NOFILE, (fd_count(master), hard))
    try:
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: "cannot start worker 0: Too many open files" in process.log(), 20,
                   "the failed fork logged")
        assert process.process.poll() is None, process.log()
        assert process.worker_pids() == []
    finally:
        resource.prlimit(master, resource.RLIMIT_NOFILE, (soft, hard))
    new = wait_until(process.worker_pids, 30, "the worker forked again once descriptors are free")
    assert new != [worker]
    wait_until(lambda: process.log().count("(pid %d, generation 1) serving" % new[0]) == 1, 30,
               "the new worker serving")
    with process.smtp() as client:
        client.sendmail("a@client.test", [RECIPIENT], b"Subject: after\r\n\r\nbody\r\n")
    assert process.process.poll() is None


def test_an_admin_flood_cannot_starve_a_respawn(server_process):
    """The issue's story: idle admin connections fill the master's fd table, a worker dies."""
    process = server_process(workers=1, admin_listen="127.0.0.1:0", admin_max_connections=3, admin_timeout=30)
    master = process.process.pid
    [worker] = process.worker_pids()
    soft, hard = resource.prlimit(master, resource.RLIMIT_NOFILE)
    # Room for the three admin connections served at once and a worker's pipe, no more.
    resource.prlimit(master, resource.RLIMIT_NOFILE, (fd_count(master) + 3 + 2, hard))
    held = []
    try:
        held = [socket.create_connection(admin_address(process), timeout=30) for _ in range(40)]
        wait_until(lambda: fd_count(master) >= 3, 10, "the admin server accepts")
        os.kill(worker, signal.SIGKILL)
        new = wait_until(lambda: [pid for pid in process.worker_pids() if pid != worker], 30, "a new worker")
        wait_until(lambda: f"(pid {new[0]}, generation 1) serving" in process.log(), 30, "the new worker serving")
        with process.smtp() as client:
            client.sendmail("a@client.test", [RECIPIENT], b"Subject: flood\r\n\r\nbody\r\n")
        assert process.process.poll() is None
    finally:
        for sock in held:
            sock.close()
        resource.prlimit(master, resource.RLIMIT_NOFILE, (soft, hard))

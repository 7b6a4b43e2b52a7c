"""Issue 21: a worker whose event loop is blocked is noticed and replaced.

The real ``python -m qpgevent`` with one worker and ``[server] hung_worker_timeout = 2``.
A test plugin (tests/hardening/plugins/blocker.py) blocks the worker's hub with the real
``time.sleep`` at ``mail``: the heartbeat stops, the master logs it, the worker logs the
hook and plugin it is stuck in, the master kills it and starts another, and the next
client is served. With the timeout at 0 nothing watches.
"""

from __future__ import annotations

import socket
from pathlib import Path

from qpgevent.testing import wait_until

PLUGINS = """
[[blocker]]
[[rcpt_ok]]
  domains = example.test
[[queue/maildir]]
  path = Maildir
"""
PLUGIN_DIR = str(Path(__file__).resolve().parent / "plugins")


def block_the_worker(process) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", process.port), timeout=60)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220")
    sock.sendall(b"HELO c.test\r\n")
    assert reader.readline().startswith(b"250")
    sock.sendall(b"MAIL FROM:<block@c.test>\r\n")  # no answer: the worker is stuck
    return sock


def test_a_blocked_worker_is_named_killed_and_replaced(server_process):
    process = server_process(PLUGINS, plugin_dirs=PLUGIN_DIR, workers=1, hung_worker_timeout=2)
    [worker] = process.worker_pids()
    with block_the_worker(process) as sock:
        wait_until(lambda: process.worker_pids() not in ([], [worker]), 60, "a new worker")
        assert sock.recv(100) == b""  # the stuck session was closed with its worker
    log = process.log()
    assert f"worker 0 (pid {worker}) has not run its event loop for" in log
    assert "its event loop is stuck in hook mail, plugin blocker" in log
    assert "killed by signal SIGKILL" in log
    wait_until(lambda: process.log().count("generation 1) serving") == 2, 30, "the new worker serving")
    with process.smtp(timeout=30) as client:
        client.sendmail("a@c.test", ["bob@example.test"], b"Subject: after\r\n\r\nserved\r\n")
    assert process.process.poll() is None


def test_zero_turns_the_watch_off(server_process):
    plugins = PLUGINS.replace("[[blocker]]", "[[blocker]]\n  seconds = 4")
    process = server_process(plugins, plugin_dirs=PLUGIN_DIR, workers=1, hung_worker_timeout=0)
    [worker] = process.worker_pids()
    with block_the_worker(process) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"250")  # after 4 s, the same worker answers
    assert process.worker_pids() == [worker]
    assert "has not run its event loop" not in process.log()

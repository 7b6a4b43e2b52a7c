"""Issue 21, item 6: spilled message bodies (``body-*`` in spool_dir) do not outlive their worker.

The real ``python -m qpgevent``: a worker killed with ``kill -9`` in the middle of a large
message leaves its spill file behind; the master removes it when it reaps the worker.
Files left by an earlier run are removed at start.
"""

from __future__ import annotations

import os
import signal
import socket

from qpgevent.testing import wait_until


def spill_files(spool) -> list[str]:
    return sorted(name for name in os.listdir(spool) if name.startswith("body-"))


def test_a_killed_workers_spill_file_is_removed(server_process, tmp_path):
    spool = tmp_path / "spool"
    process = server_process(workers=1, spool_dir=spool, size_threshold=1000)
    [worker] = process.worker_pids()
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"HELO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        assert [reader.readline()[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 2000)  # no end: still in DATA
        [name] = wait_until(lambda: spill_files(spool), 20, "the body spilled to a file")
        assert name.startswith(f"body-{worker}-")
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: not spill_files(spool), 20, "the spill file removed")
    assert "1 message body file(s) removed" in process.log()
    wait_until(lambda: process.worker_pids() and process.worker_pids() != [worker], 30, "the worker respawned")


def test_spill_files_of_an_earlier_run_are_removed_at_start(server_process, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    for name in ("body-123-abc", "body-oldstyle", "keep-me"):
        (spool / name).write_bytes(b"x")
    process = server_process(workers=1, spool_dir=spool)
    assert sorted(os.listdir(spool)) == ["keep-me"]
    assert "removed 2 message body file(s)" in process.log()

"""The master raises its open-file limit for its workers, and says so when sessions may not fit.

The server runs under ``prlimit``, as under a service manager that starts it with a low soft
limit (1024 is common; 256 here, to keep the test small) and a higher hard one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qpgevent.testing import DEFAULT_PLUGINS, RawClient, ServerProcess, write_ini

PRLIMIT = "/usr/bin/prlimit"  # util-linux, on every Debian


@pytest.fixture
def limited_server(tmp_path):
    started = []

    def start(nofile: str, **settings) -> ServerProcess:
        server = ServerProcess(write_ini(tmp_path, DEFAULT_PLUGINS, **settings),
                               prefix=[PRLIMIT, f"--nofile={nofile}", "--"])
        started.append(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.terminate()


def open_files_limit(pid: int) -> tuple[str, str]:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return soft, hard


def test_workers_get_the_hard_limit_and_hold_more_sessions_than_the_soft_one(limited_server):
    server = limited_server("256:2000", workers="2", max_connections="1000")
    assert [open_files_limit(pid) for pid in server.worker_pids()] == [("2000", "2000")] * 2
    clients = []
    try:
        for _ in range(600):   # more than two workers could hold with 256 descriptors each
            client = RawClient(server)
            clients.append(client)
            assert client.reply()[0] == 220
    finally:
        for client in clients:
            client.close()
    assert "open-file limit" not in server.log()


def test_a_hard_limit_too_low_for_max_connections_is_reported(limited_server):
    server = limited_server("300:300", workers="2", max_connections="2000")
    assert "open-file limit 300 per process: each of 2 worker(s) can hold about 200 sessions" in server.log()
    with server.smtp() as client:   # it still serves
        assert client.noop()[0] == 250

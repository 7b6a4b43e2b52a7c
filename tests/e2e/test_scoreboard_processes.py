"""The scoreboard and the metrics cover every process: real child processes publish, we read.

Each child is what a worker does: it turns metrics on in the shared folder, publishes its
scoreboard, and counts its sessions. The test process plays the master: it clears the
folders, reads the merged view, and handles a worker that dies (kill -9).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qpgevent.backends import metrics, scoreboard
from qpgevent.testing import wait_until

CHILD = """
import sys, time
import gevent
from qpgevent.backends import metrics, scoreboard
directory, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
metrics.init(directory + "/metrics")

class Session:
    def __init__(self, n):
        self.n, self.started = n, time.time()
    def status(self):
        return {"id": f"{name}.{self.n}", "remote_ip": f"192.0.2.{self.n}", "state": "ready",
                "bytes": 100, "started": self.started}

board = scoreboard.publish(directory + "/scoreboard", interval=0.05)
for n in range(count):  # after the first write: the writer greenlet must publish these
    board.add(Session(n))
    metrics.connection_opened()
print("ready", flush=True)
while True:
    gevent.sleep(0.1)
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@pytest.fixture
def run_dir(tmp_path: Path):
    (tmp_path / "scoreboard").mkdir()
    metrics.init(str(tmp_path / "metrics"), clear=True)  # what the master does before forking
    children: list[subprocess.Popen] = []

    def start(name: str, count: int) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), name, str(count)],
                                 stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        return child

    yield tmp_path, start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(10)
    metrics.stop()


def test_every_process_is_merged_and_a_dead_one_drops_out(run_dir):
    directory, start = run_dir
    board = str(directory / "scoreboard")
    first, second = start("a", 2), start("b", 3)
    wait_until(lambda: scoreboard.read(board)["totals"]["sessions"] == 5, 10, "5 sessions from 2 processes")
    data = scoreboard.read(board)
    assert sorted(p["pid"] for p in data["processes"]) == sorted([first.pid, second.pid])
    assert sorted(row["id"] for row in data["sessions"]) == ["a.0", "a.1", "b.0", "b.1", "b.2"]
    assert all(row["age"] >= 0 for row in data["sessions"])
    assert data["totals"] == {"sessions": 5, "processes": 2, "bytes": 500, "by_state": {"ready": 5}}
    counts = samples(metrics.render()[0].decode())
    assert counts[("qpgevent_connections_open", ())] == 5
    assert counts[("qpgevent_connections_total", ())] == 5

    second.send_signal(signal.SIGKILL)  # a worker crashes: its file stays behind
    second.wait(10)
    assert (directory / "scoreboard" / f"{second.pid}.json").exists()
    data = scoreboard.read(board)
    assert [p["pid"] for p in data["processes"]] == [first.pid]  # a dead pid's file is skipped
    assert data["totals"]["sessions"] == 2

    metrics.process_dead(second.pid)  # the master reaps it
    scoreboard.remove_process(board, second.pid)
    assert not (directory / "scoreboard" / f"{second.pid}.json").exists()
    counts = samples(metrics.render()[0].decode())
    assert counts[("qpgevent_connections_open", ())] == 2  # its open connections are gone...
    assert counts[("qpgevent_connections_total", ())] == 5  # ...its counters are not


def test_a_board_is_written_only_when_it_changed(tmp_path):
    class Session:
        def __init__(self):
            self.state = "ready"

        def status(self):
            return {"id": "x", "state": self.state, "started": 1.0}

    board = scoreboard.Scoreboard(str(tmp_path))
    session = Session()
    board.add(session)
    assert board.write() is True
    assert board.write() is False
    session.state = "mail"
    assert board.write() is True
    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getpid()}.json"]  # no temporary left
    board.discard(session)
    assert board.write() is True
    board.stop()
    assert list(tmp_path.iterdir()) == []


def test_clear_removes_what_a_previous_run_left(tmp_path):
    (tmp_path / "123.json").write_text("{}")
    (tmp_path / "124.json.tmp").write_text("{")
    scoreboard.clear(str(tmp_path))
    assert list(tmp_path.iterdir()) == []

"""tools/bench_group_commit.py runs end to end (small numbers) and counts what it claims."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_group_commit.py"
# concurrency, messages, in new/, file fsyncs, syncfs, new/ fsyncs, syncs per message, rate
ROW = re.compile(r"^ +(\d+) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+) +(\d+\.\d{3}) +(\d+)$", re.MULTILINE)


def test_fsyncs_are_counted_and_every_message_is_delivered(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--python", sys.executable, "--concurrency", "1,20",
                           "--messages", "60", "--workers", "1", "--workdir", str(tmp_path), "--timeout", "120"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {int(row[0]): [int(x) for x in row[1:6]] for row in ROW.findall(done.stdout)}
    assert set(rows) == {1, 20}, done.stdout
    # One session at a time: each message its file fsync and its own fsync of new/, no syncfs.
    assert rows[1] == [10, 10, 10, 0, 10]
    # Twenty at a time: batches share syncfs calls or new/ fsyncs, fewer syncs than two per message.
    messages, delivered, file_syncs, shared, folder_syncs = rows[20]
    assert messages == delivered == 60
    assert file_syncs + shared + folder_syncs < 2 * 60, done.stdout  # (fsyncs alone too: a busy machine)
    assert list(tmp_path.iterdir()) == []


def test_a_server_that_does_not_start_fails_the_run(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--python", "/bin/false", "--concurrency", "2",
                           "--messages", "4", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "FAILED: server exited with status" in done.stderr

"""tools/bench_syncfs.py runs end to end (small numbers): every file ends in new/, none in tmp/."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_bench_fsync_cpu import block_device_folder

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_syncfs.py"
LINE = re.compile(r"^(fsync|syncfs) batch 10: (\d+) msg/s, per message ([\d.]+) writes, ([\d.]+) flushes$", re.MULTILINE)


@pytest.mark.parametrize("mode", ["fsync", "syncfs"])
def test_each_mode_puts_every_message_in_new(tmp_path, mode):
    base = block_device_folder(tmp_path)
    where = base / "Maildir"
    try:
        done = subprocess.run([sys.executable, str(TOOL), str(where), mode, "40", "10"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        line = LINE.search(done.stdout)
        assert line and line.group(1) == mode, done.stdout
        assert len(list((where / "new").iterdir())) == 40
        assert list((where / "tmp").iterdir()) == []
    finally:
        shutil.rmtree(where if base == tmp_path else base, ignore_errors=True)


def test_a_folder_on_tmpfs_is_refused(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "/dev/shm/qpgevent-bench-syncfs-none", "fsync", "10", "10"],
                          capture_output=True, text=True, timeout=60)
    shutil.rmtree("/dev/shm/qpgevent-bench-syncfs-none", ignore_errors=True)
    assert done.returncode == 1 and "no block device" in done.stderr


def test_an_unknown_mode_is_refused_with_the_usage():
    done = subprocess.run([sys.executable, str(TOOL), "/nonexistent", "sometimes"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == "" and "Usage:" in done.stderr and "bench_syncfs.py FOLDER fsync|syncfs" in done.stderr

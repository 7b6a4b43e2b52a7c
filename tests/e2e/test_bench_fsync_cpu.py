"""tools/bench_fsync_cpu.py runs end to end (small numbers) and reports what the disk was asked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_fsync_cpu.py"
LINE = re.compile(r"^fsync=(yes|no) concurrency (\d+): (\d+) msg/s, server ([\d.]+) ms/message, "
                  r"kernel workers ([\d.]+) ms/message \(load average [\d.]+\); (.*)$", re.MULTILINE)
DISK = re.compile(r"disk per message: ([\d.]+) writes, ([\d.]+) KiB, ([\d.]+) flushes, ([\d.]+) journal commits \((\d+)/s\)")


def run(fsync: str, where: Path) -> re.Match[str]:
    done = subprocess.run([sys.executable, str(TOOL), sys.executable, fsync, "10", "100"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(where)})
    assert done.returncode == 0, done.stdout + done.stderr
    line = LINE.search(done.stdout)
    assert line, done.stdout
    assert list(where.iterdir()) == []  # the server's folder is gone
    return line


def block_device_folder(tmp_path: Path) -> Path:
    """tmp_path if a block device holds it, else a folder in the checkout (a disk, not tmpfs)."""
    device = os.stat(tmp_path).st_dev
    if Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat").exists():
        return tmp_path
    return Path(__file__).resolve().parent / f".fsync-cpu-{os.getpid()}"


def test_with_fsync_every_message_is_written_to_the_disk_before_the_run_ends(tmp_path):
    where = block_device_folder(tmp_path)
    where.mkdir(exist_ok=True)
    try:
        line = run("yes", where)
    finally:
        if where != tmp_path:
            where.rmdir()
    assert line.group(1) == "yes" and line.group(2) == "10"
    disk = DISK.fullmatch(line.group(6))
    assert disk, line.group(0)
    # Each 2 KiB message's file was fsynced, so at least its own bytes reached the device (the
    # device's counters are the whole machine's: others' writes only add to them).
    assert float(disk.group(2)) >= 2.0, line.group(0)


def test_a_maildir_on_tmpfs_is_measured_without_the_disk_part():
    shm = Path("/dev/shm")
    where = shm / f"qpg-fsync-cpu-test-{os.getpid()}"
    where.mkdir()
    try:
        line = run("no", where)
    finally:
        where.rmdir()
    assert line.group(6) == "disk: no block device under the Maildir"

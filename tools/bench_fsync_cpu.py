#!/usr/bin/env python3
"""CPU per message of the durable Maildir, the kernel's workers included: where the fsync's work goes.

Usage:
    tools/bench_fsync_cpu.py PYTHON yes|no [CONCURRENCY] [MESSAGES]

One qpgevent server (``PYTHON -m qpgevent``, 2 workers, rcpt_ok + queue/maildir with
``fsync`` as given), one smtp-source run (2 KiB messages; concurrency 100 and 5000 messages
unless given). Prints the rate, the server's own CPU per message (its process tree, as
tools/bench counts it), and the CPU of the kernel's ``kworker`` and ``jbd2`` threads over the
run per message: an fsync handed to the kernel with Linux AIO runs on a kernel worker, outside
the server's processes, where an fsync system call counted as the server's own. The kernel
threads serve the whole machine: on a shared machine their figure takes in others' writes too.
Then what the disk under the Maildir was asked per message (``/sys/dev/block/*/stat``, the
whole device: others' writes too): write requests, KiB written, cache flushes, and the journal's
commits where the file system has a journal (``/proc/fs/jbd2/<device>-*/info``; ext4 without a
journal, as this machine's root, has none). The Maildir goes in a temporary folder: set TMPDIR to
measure another file system.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402


def kernel_workers_ticks() -> int:
    """User + system clock ticks of the kworker and jbd2 threads, from /proc."""
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                text = stat.read()
        except OSError:
            continue  # gone meanwhile
        if text[text.index("(") + 1:text.rindex(")")].startswith(("kworker", "jbd2")):
            fields = text[text.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total


def disk_counters(folder: Path) -> tuple[int, int, int, int] | None:
    """Write requests, sectors written, flushes completed and journal commits of the device holding
    ``folder``; None on a file system without a block device (tmpfs)."""
    device = os.stat(folder).st_dev
    block = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    if not (block / "stat").exists():
        return None
    fields = [int(field) for field in (block / "stat").read_text().split()]
    commits = 0
    for info in Path("/proc/fs/jbd2").glob(f"{block.resolve().name}-*/info"):
        commits += int(info.read_text().split()[0])  # "N transactions (M requested), ..."
    # Documentation/block/stat.rst: writes 4, sectors written 6, flushes 15 (kernels since 5.5).
    return fields[4], fields[6], fields[15] if len(fields) > 15 else 0, commits


def disk_report(disk: tuple[int, ...] | None, messages: int, seconds: float) -> str:
    if disk is None:
        return "disk: no block device under the Maildir"
    writes, sectors, flushes, commits = disk
    return (f"disk per message: {writes / messages:.2f} writes, {sectors / 2 / messages:.1f} KiB, "
            f"{flushes / messages:.2f} flushes, {commits / messages:.2f} journal commits ({commits / seconds:.0f}/s)")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("yes", "no"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    python, fsync = argv[0], argv[1]
    concurrency, messages = (int(argv[2]) if len(argv) > 2 else 100), (int(argv[3]) if len(argv) > 3 else 5000)
    ticks = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="qpg-fsync-cpu-") as temp:
        folder, port = Path(temp), benchlib.free_port()
        (folder / "qpsmtpd.ini").write_text(
            "[server]\n  me = mx.example.test\n  spool_dir = spool\n  allow_root = yes\n"
            "[limits]\n  max_connections = 1000\n[dns]\n  reverse_lookup = no\n"
            "[plugins]\n  [[rcpt_ok]]\n    domains = example.test\n"
            f"  [[queue/maildir]]\n    path = Maildir\n    fsync = {fsync}\n", encoding="utf-8")
        server = subprocess.Popen([python, "-m", "qpgevent", "-c", "qpsmtpd.ini", "--listen", f"127.0.0.1:{port}",
                                   "--workers", "2", "--log-level", "warning"], cwd=folder, stdin=subprocess.DEVNULL)
        try:
            benchlib.wait_greeting(port, server, lambda: "")
            os.sync()  # start with nothing dirty: the writeback of what came before is not counted
            kernel, own = kernel_workers_ticks(), benchlib.tree_cpu_seconds(server.pid)
            disk = disk_counters(folder)
            seconds = benchlib.run_smtp_source("/usr/sbin/smtp-source", port, concurrency, messages, 2048, 300)
            kernel, own = kernel_workers_ticks() - kernel, benchlib.tree_cpu_seconds(server.pid) - own
            if disk is not None:
                disk = tuple(after - before for after, before in zip(disk_counters(folder) or disk, disk))
        finally:
            benchlib.stop_process(server)
        delivered = benchlib.count_files(folder / "Maildir" / "new")
    if delivered != messages:
        print(f"FAILED: {messages} messages sent, {delivered} in Maildir/new", file=sys.stderr)
        return 1
    print(f"fsync={fsync} concurrency {concurrency}: {messages / seconds:.0f} msg/s, server {1000 * own / messages:.2f} "
          f"ms/message, kernel workers {1000 * kernel / ticks / messages:.2f} ms/message "
          f"(load average {os.getloadavg()[0]:.1f}); {disk_report(disk, messages, seconds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

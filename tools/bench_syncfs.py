#!/usr/bin/env python3
"""A Maildir's disk work without the server: one fsync per file against one syncfs per batch.

Usage:
    tools/bench_syncfs.py FOLDER fsync|syncfs [MESSAGES] [BATCH]

Writes MESSAGES (default 2000) files of 2 KiB into FOLDER/tmp, BATCH (default 20) at a time;
syncs each batch (``fsync``: every file fsynced, 8 threads side by side, as the kernel's AIO
would; ``syncfs``: one syncfs of the file system), renames the batch into FOLDER/new and
fsyncs new/ once. Prints messages per second, and the write requests and cache flushes of the
device under FOLDER per message (``/sys/dev/block/*/stat``: the whole device, others' writes
too). FOLDER is made if missing; its files are left for you to remove.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fsync_cpu import disk_counters  # noqa: E402  (the device's counters: one reading of them)

_libc = ctypes.CDLL(None, use_errno=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("fsync", "syncfs"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    folder, mode = argv[0], argv[1]
    messages, batch = (int(argv[2]) if len(argv) > 2 else 2000), (int(argv[3]) if len(argv) > 3 else 20)
    for sub in ("tmp", "new"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    data = b"x" * 2048
    threads = ThreadPoolExecutor(8)
    new = os.open(os.path.join(folder, "new"), os.O_RDONLY | os.O_DIRECTORY)
    before = disk_counters(Path(folder))
    if before is None:
        print(f"{folder}: no block device under it (tmpfs?): nothing to count", file=sys.stderr)
        return 1
    started = time.monotonic()
    for first in range(0, messages, batch):
        names = [f"{os.getpid()}.{time.time_ns()}.{number}" for number in range(first, min(first + batch, messages))]
        files = []
        for name in names:
            fd = os.open(os.path.join(folder, "tmp", name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            files.append(fd)
        if mode == "fsync":
            list(threads.map(os.fsync, files))
        elif _libc.syncfs(files[0]) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        for fd, name in zip(files, names):
            os.close(fd)
            os.rename(os.path.join(folder, "tmp", name), os.path.join(folder, "new", name))
        os.fsync(new)
    seconds = time.monotonic() - started
    after = disk_counters(Path(folder)) or before
    writes, flushes = after[0] - before[0], after[2] - before[2]
    print(f"{mode} batch {batch}: {messages / seconds:.0f} msg/s, per message {writes / messages:.2f} "
          f"writes, {flushes / messages:.2f} flushes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

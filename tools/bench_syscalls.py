#!/usr/bin/env python3
"""System calls per message of one qpgevent worker (``strace -c -f``): what a change costs the kernel.

Usage:
    tools/bench_syscalls.py [--python P] [--fsync yes|no] [--queue maildir|discard] [--workers 1]
                            [--concurrency 100] [--messages 2000] [--size 2048] [--top 12]

Starts ``python -m qpgevent --workers N`` (rcpt_ok + queue/maildir, ``fsync`` as asked, or
queue/discard), attaches ``strace -c -f`` to every worker (every thread of each) once it greets, sends
``--messages`` messages with Postfix's smtp-source at each ``--concurrency``, and prints the
calls per message by system call, the most frequent first, with the calls that failed
(``accept4`` failing with EAGAIN: a worker woken for a connection another took; ``futex``
counts the hand-overs of the interpreter lock between threads). The counts do not depend on the machine's load; the
time strace shows does, and is left out. ``--python`` runs another tree (main's, for a
before/after), as tools/bench_ab.py does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import benchlib  # noqa: E402

ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def main(argv: list[str] | None = None) -> int:
    parser = benchlib.smtp_source_parser(__doc__.split("\n\n")[0], [100], str(REPO / ".venv" / "bin" / "python"))
    parser.set_defaults(size=2048)
    parser.add_argument("--fsync", choices=["yes", "no"], default="yes")
    parser.add_argument("--queue", choices=["maildir", "discard"], default="maildir")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, all traced (default %(default)s)")
    parser.add_argument("--top", type=int, default=12, help="system calls to show (default %(default)s)")
    args = benchlib.parse_smtp_source_args(parser, argv)
    benchlib.unwind_on_signals()
    print(f"# tools/bench_syscalls.py --python {args.python} --fsync {args.fsync} --queue {args.queue} "
          f"--workers {args.workers}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qpg-syscalls-", dir=args.workdir) as temp:
        return benchlib.exit_status(lambda: measure(args, Path(temp)))


def measure(args, temp: Path) -> int:
    for concurrency in args.concurrency:
        counts = one_run(args, concurrency, temp / f"c{concurrency}")
        total = sum(calls for calls, _ in counts.values())
        print(f"concurrency {concurrency}, {args.messages} messages: {total / args.messages:.1f} system calls "
              f"per message; by call (calls, of which failed):")
        for name, (calls, errors) in sorted(counts.items(), key=lambda item: -item[1][0])[:args.top]:
            print(f"  {name:<16} {calls / args.messages:8.2f} {errors / args.messages:8.2f}")
    return 0


def one_run(args, concurrency: int, folder: Path) -> dict[str, tuple[int, int]]:
    strace = None
    with running_server(args, folder) as (port, workers):
        summary = folder / "strace.txt"
        try:
            strace = subprocess.Popen(["strace", "-c", "-f", "-qq", "-o", str(summary),
                                       *(f"-p{worker}" for worker in workers)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 20
            while not all(map(_traced, workers)) and time.monotonic() < deadline:
                time.sleep(0.02)
            benchlib.run_smtp_source(args.smtp_source, port, concurrency, args.messages, args.size, args.timeout)
            strace.send_signal(signal.SIGINT)  # detach: it writes the summary
            strace.wait(60)
        finally:
            if strace is not None and strace.poll() is None:
                strace.kill()
                strace.wait(10)
    counts = {}
    for line in summary.read_text().splitlines():
        row = ROW.match(line)
        if row and row.group(3) != "total":
            counts[row.group(3)] = int(row.group(1)), int(row.group(2) or 0)
    return counts


@contextlib.contextmanager
def running_server(args, folder: Path) -> Iterator[tuple[int, list[int]]]:
    """``python -m qpgevent`` in ``folder`` as ``args`` say (--python, --workers, --queue,
    --fsync, --log-level): its port and its workers' pids, once it greets. Stopped after, and
    then every message sent must be in ``Maildir/new`` (maildir queue)."""
    folder.mkdir()
    port = benchlib.free_port()
    ini = folder / "qpsmtpd.ini"
    ini.write_text("[server]\n  me = mx.example.test\n  spool_dir = spool\n  allow_root = yes\n"
                   "[limits]\n  max_connections = 1000\n[dns]\n  reverse_lookup = no\n"
                   "[plugins]\n  [[rcpt_ok]]\n    domains = example.test\n"
                   + (f"  [[queue/maildir]]\n    path = Maildir\n    fsync = {args.fsync}\n"
                      if args.queue == "maildir" else "  [[queue/discard]]\n"), encoding="utf-8")
    log = folder / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen([args.python, "-m", "qpgevent", "-c", str(ini), "--listen", f"127.0.0.1:{port}",
                                   "--workers", str(args.workers), "--log-level", args.log_level], cwd=folder,
                                  stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        benchlib.wait_greeting(port, server, lambda: log.read_text(errors="replace"))
        yield port, _workers(server.pid, args.workers)
    finally:
        benchlib.stop_process(server)
    delivered = benchlib.count_files(folder / "Maildir" / "new") if args.queue == "maildir" else args.messages
    if delivered != args.messages:
        raise benchlib.BenchError(f"{args.messages} messages sent, {delivered} in Maildir/new")


def _workers(master: int, count: int) -> list[int]:
    """The master's worker processes, once all ``count`` are forked (each greets after its fork)."""
    deadline = time.monotonic() + 20
    while len(workers := benchlib.child_pids(master)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    if len(workers) != count:
        raise benchlib.BenchError(f"{count} workers asked, {len(workers)} found")
    return workers


def _traced(pid: int) -> bool:
    tasks = os.listdir(f"/proc/{pid}/task")
    return all(any(line.startswith("TracerPid:") and line.split()[1] != "0"
                   for line in open(f"/proc/{pid}/task/{task}/status")) for task in tasks)


if __name__ == "__main__":
    sys.exit(main())

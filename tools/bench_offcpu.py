#!/usr/bin/env python3
"""Where qpgevent's workers wait off the CPU under load (``perf`` scheduler switches), by reason.

Usage:
    tools/bench_offcpu.py [--python P] [--fsync yes|no] [--queue maildir|discard] [--workers 2]
                          [--concurrency 100] [--messages 20000] [--size 2048]

Starts ``python -m qpgevent`` as tools/bench_syscalls.py does, records every scheduler switch of
its workers (``perf record -e sched:sched_switch -g``) while Postfix's smtp-source sends
``--messages`` messages at each ``--concurrency``, and sorts each time a worker left the CPU by
why, from the kernel stack it left with: waiting for its clients (``epoll_wait``), preempted
while runnable, the shared session table's lock (``fcntl``), a folder's lock (the Maildir's
``tmp/`` and ``new/``: a lookup, a create, a rename), the disk, or else the top kernel function.
For each reason: how many times per message, and its share of the workers' wall time (each
worker counts the whole run). The question it answers: is a worker's time lost waiting for
something other than its clients and the CPU? Needs root (perf on other processes).
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import benchlib  # noqa: E402
from bench_syscalls import running_server  # noqa: E402

SWITCH = re.compile(r"\s(\d+\.\d+):\s+sched:sched_switch:.*prev_pid=(\d+) .*prev_state=(\S+) ==> "
                    r"next_comm=.* next_pid=(\d+)")
SCHEDULER = ("__schedule", "schedule", "preempt", "__cond_resched", "_cond_resched", "__traceiter", "perf_")


def main(argv: list[str] | None = None) -> int:
    parser = benchlib.smtp_source_parser(__doc__.split("\n\n")[0], [100], str(REPO / ".venv" / "bin" / "python"))
    parser.set_defaults(size=2048, messages=20000)
    parser.add_argument("--fsync", choices=["yes", "no"], default="no")
    parser.add_argument("--queue", choices=["maildir", "discard"], default="maildir")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default %(default)s)")
    args = benchlib.parse_smtp_source_args(parser, argv)
    benchlib.unwind_on_signals()
    print(f"# tools/bench_offcpu.py --python {args.python} --fsync {args.fsync} --queue {args.queue} "
          f"--workers {args.workers}; load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qpg-offcpu-", dir=args.workdir) as temp:
        return benchlib.exit_status(lambda: measure(args, Path(temp)))


def measure(args, temp: Path) -> int:
    for concurrency in args.concurrency:
        waits, seconds = one_run(args, concurrency, temp / f"c{concurrency}")
        wall = seconds * args.workers
        print(f"concurrency {concurrency}, {args.messages} messages in {seconds:.1f}s "
              f"({args.messages / seconds:.0f}/s): off the CPU, by reason")
        print(f"  {'reason':<34} {'per message':>11} {'share of wall':>13} {'mean ms':>8}")
        for reason, durations in sorted(waits.items(), key=lambda item: -sum(item[1])):
            print(f"  {reason:<34} {len(durations) / args.messages:11.3f} {sum(durations) / wall:13.1%} "
                  f"{1000 * sum(durations) / len(durations):8.2f}")
    print(f"# load average {os.getloadavg()[0]:.2f}")
    return 0


def one_run(args, concurrency: int, folder: Path) -> tuple[dict[str, list[float]], float]:
    with running_server(args, folder) as (port, workers):
        data = folder / "perf.data"
        # The whole machine: a worker's return to the CPU is recorded on the task it replaces.
        perf = subprocess.Popen(["perf", "record", "-q", "-a", "-k", "monotonic", "-e", "sched:sched_switch", "-g", "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1)  # perf opens its buffers on every CPU first; nothing is sent yet
            started = time.monotonic()  # perf's clock too (-k monotonic): only the run's waits count
            seconds = benchlib.run_smtp_source(args.smtp_source, port, concurrency, args.messages, args.size,
                                               args.timeout)
            window = started, time.monotonic()
        finally:
            perf.send_signal(signal.SIGINT)  # it writes its data and exits
            perf.wait(60)
    script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True, check=True)
    return waits_by_reason(script.stdout, set(workers), window), seconds


def waits_by_reason(script: str, workers: set[int], window: tuple[float, float]) -> dict[str, list[float]]:
    """For each switch that took a worker off the CPU in ``window``, the time until it ran
    again (cut at the window's end), by reason."""
    left: dict[int, tuple[float, str]] = {}
    waits: dict[str, list[float]] = collections.defaultdict(list)
    for event in script.split("\n\n"):
        lines = event.strip().splitlines()
        switch = SWITCH.search(lines[0]) if lines else None
        if switch is None:
            continue
        when, prev, state, following = float(switch.group(1)), int(switch.group(2)), switch.group(3), int(switch.group(4))
        if following in left:
            since, reason = left.pop(following)
            waits[reason].append(min(when, window[1]) - since)
        if prev in workers and window[0] <= when < window[1]:
            frames = [line.split()[1].split("+")[0] for line in lines[1:] if len(line.split()) > 1]
            left[prev] = when, reason_of(state, [f for f in frames if not f.startswith(SCHEDULER)])
    return waits


def reason_of(state: str, frames: list[str]) -> str:
    if state.startswith("R"):
        return "preempted (runnable)"
    stack = " ".join(frames[:8])
    for needle, reason in (("epoll_wait", "waiting for clients (epoll_wait)"),
                           ("fcntl_setlk", "session table lock (fcntl)"),
                           ("lock_two_directories", "folder lock: rename"),
                           ("path_openat", "folder lock: create"),
                           ("walk_component", "folder lock: lookup"),
                           ("io_schedule", "disk")):
        if needle in stack:
            return reason
    return f"{state} {frames[0] if frames else '?'}"


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Before/after at the same moment: two qpgevent servers, both driven at once by smtp-source.

Usage:
    tools/bench_ab.py --before-python P [--python Q] [--workers 2] [--rounds 3] [--messages 5000]
                      [--concurrency 100,500] [--size 2048] [--queue maildir|maildir-fsync|discard]

``tools/bench --servers qpgevent,qpgevent-before`` runs the two servers in turn (A B A B):
on a machine shared with other jobs, the load moves between one run and the next. Here
each round drives both servers at the same time, one smtp-source each, so whatever the
machine does hits both alike; it prints messages/second and server CPU seconds per 1000
messages of each, and after/before ratios round by round, then their medians. Both
servers: rcpt_ok + queue/maildir without fsync (or ``--queue discard``, or ``--queue
maildir-fsync``: with fsync, the default), no reverse DNS (as tools/bench). They
share the 2 cores with both clients, so absolute rates are lower than tools/bench's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

PLUGINS = {
    "maildir": "  [[rcpt_ok]]\n    domains = example.test\n  [[queue/maildir]]\n    path = Maildir\n    fsync = no\n",
    "maildir-fsync": "  [[rcpt_ok]]\n    domains = example.test\n  [[queue/maildir]]\n    path = Maildir\n",
    "discard": "  [[rcpt_ok]]\n    domains = example.test\n  [[queue/discard]]\n",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before-python", required=True, help="a Python (or script) running the older code")
    parser.add_argument("--python", default=sys.executable, help="a Python running this code (default: this one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=benchlib.number_list("concurrency"), default=[100, 500])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--queue", choices=sorted(PLUGINS), default="maildir",
                        help="queue/maildir without fsync (default), queue/discard, or maildir-fsync (fsync on)")
    parser.add_argument("--smtp-source", default="/usr/sbin/smtp-source")
    parser.add_argument("--workdir", default=None, help="where the servers' folders go (default: /tmp)")
    args = parser.parse_args()
    # The servers run in folders of their own: a relative path to a Python would not be found.
    args.python, args.before_python = (str(Path(p).absolute()) if "/" in p else p
                                       for p in (args.python, args.before_python))
    with tempfile.TemporaryDirectory(prefix="bench-ab-", dir=args.workdir) as temp:
        return compare(args, Path(temp))


def compare(args: argparse.Namespace, temp: Path) -> int:
    servers = {}
    try:
        for side, python in (("before", args.before_python), ("after", args.python)):
            folder = temp / side
            for sub in ("tmp", "new", "cur"):
                (folder / "Maildir" / sub).mkdir(parents=True)
            servers[side] = benchlib.QpgeventServer(
                python, folder, PLUGINS[args.queue], "warning", max_connections=max(args.concurrency) + 100,
                workers=args.workers, sections="[dns]\n  reverse_lookup = no\n")
        for server in servers.values():
            server.wait_ready()
        for concurrency in args.concurrency:
            both(servers, args, concurrency, min(1000, args.messages))  # warm-up, not counted
            ratios = []
            for number in range(1, args.rounds + 1):
                got = both(servers, args, concurrency, args.messages)
                (rate_b, cpu_b), (rate_a, cpu_a) = got["before"], got["after"]
                ratios.append((rate_a / rate_b, cpu_a / cpu_b if cpu_b else float("nan")))  # nan: too short to tell
                print(f"conc {concurrency} round {number}: before {rate_b:7.1f} msg/s {cpu_b:.2f} CPU s/1000 | "
                      f"after {rate_a:7.1f} msg/s {cpu_a:.2f} CPU s/1000 | after/before msg/s "
                      f"{ratios[-1][0]:.3f}, CPU {ratios[-1][1]:.3f}", flush=True)
            print(f"conc {concurrency} median after/before: msg/s {statistics.median(r[0] for r in ratios):.3f}, "
                  f"CPU per message {statistics.median(r[1] for r in ratios):.3f}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return 0


def both(servers: dict[str, benchlib.QpgeventServer], args: argparse.Namespace, concurrency: int,
         messages: int) -> dict[str, tuple[float, float]]:
    """One smtp-source run against each server, started together: (msg/s, CPU s/1000) each."""
    got: dict[str, tuple[float, float]] = {}

    def run(side: str) -> None:
        server = servers[side]
        cpu = server.cpu_seconds()
        wall = benchlib.run_smtp_source(args.smtp_source, server.port, concurrency, messages, args.size, 600)
        got[side] = (messages / wall, (server.cpu_seconds() - cpu) / messages * 1000)

    threads = [threading.Thread(target=run, args=(side,)) for side in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(got) != len(servers):
        raise benchlib.BenchError("a run failed (see above)")
    return got


if __name__ == "__main__":
    sys.exit(main())

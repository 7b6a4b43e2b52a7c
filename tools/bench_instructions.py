#!/usr/bin/env python3
"""CPU instructions per message of one qpgevent worker, counted by valgrind (callgrind).

Usage:
    tools/bench_instructions.py [--python P] [--before-python Q] [--messages 300,1300]
                                [--concurrency 10] [--size 2048] [--queue discard|maildir] [--tls]

On a machine shared with other jobs, rates and even CPU seconds move with the load; the
number of instructions a worker executes for a fixed piece of work does not (much). For each
message count, the server (one worker: ``--workers 1``) runs under ``valgrind
--tool=callgrind``, smtp-source sends that many messages, and the worker's instruction total
(callgrind's ``Ir``, user space only: system calls count as the instructions that make them)
is read from its output at exit. Instructions per message is the difference between two runs
divided by the difference of their message counts, so that start-up and shutdown cancel out.
With ``--before-python`` the same is done for the older code, and the ratio printed.
The configuration is tools/bench's: rcpt_ok, then queue/discard (or queue/maildir without
fsync), no reverse DNS, warning level.

With --tls, the messages go inside STARTTLS sessions (tools/bench_tls_peers.py's certificate
and C client, tools/smtp_tls_source.c): --concurrency connections, each with its share of the
messages, so that both runs make the same handshakes and the difference is the cost of a
message inside TLS (the record layer and the SMTP work).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_tls_peers  # noqa: E402
import benchlib  # noqa: E402

QUEUES = {
    "discard": "  [[rcpt_ok]]\n    domains = example.test\n  [[queue/discard]]\n",
    "maildir": "  [[rcpt_ok]]\n    domains = example.test\n  [[queue/maildir]]\n    path = Maildir\n    fsync = no\n",
}
VALGRIND_READY_TIMEOUT = 120.0  #: a Python start under valgrind is 20-50 times slower


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="the Python with this code (default: this one)")
    parser.add_argument("--before-python", help="a Python (or script) running the older code, for a ratio")
    parser.add_argument("--messages", type=benchlib.number_list("message counts"), default=[300, 1300],
                        help="two message counts (default 300,1300)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--queue", choices=sorted(QUEUES), default="discard")
    parser.add_argument("--tls", action="store_true",
                        help="messages inside STARTTLS sessions, --concurrency of them (C client)")
    parser.add_argument("--valgrind", default=shutil.which("valgrind") or "valgrind")
    parser.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    parser.add_argument("--workdir", default=None, help="where the servers' folders go (default: /tmp)")
    args = parser.parse_args()
    if len(args.messages) != 2 or args.messages[0] >= args.messages[1]:
        parser.error("--messages takes two counts, the smaller first")
    if args.tls and any(count % args.concurrency for count in args.messages):
        parser.error("with --tls, each message count must be a multiple of --concurrency (messages per session)")
    sides = [("after", args.python)] + ([("before", args.before_python)] if args.before_python else [])
    per_message = {}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-", dir=args.workdir) as temp:
        args.client = bench_tls_peers.build_c_client(Path(temp)) if args.tls else None
        for side, python in sides:
            python = str(Path(python).absolute()) if "/" in python else python
            counts = [instructions(python, Path(temp) / f"{side}-{n}", args, n) for n in args.messages]
            per_message[side] = (counts[1] - counts[0]) / (args.messages[1] - args.messages[0])
            print(f"{side}: {counts[0]:,} instructions for {args.messages[0]} messages, {counts[1]:,} for "
                  f"{args.messages[1]}: {per_message[side]:,.0f} per message", flush=True)
    if "before" in per_message:
        print(f"after/before instructions per message: {per_message['after'] / per_message['before']:.3f}")
    return 0


def instructions(python: str, folder: Path, args: argparse.Namespace, messages: int) -> int:
    """The worker's instruction count for a server life that served ``messages`` messages."""
    folder.mkdir(parents=True)
    for sub in ("tmp", "new", "cur"):
        (folder / "Maildir" / sub).mkdir(parents=True)
    out = folder / "callgrind"
    out.mkdir()
    wrapper = folder / "python-under-valgrind"
    wrapper.write_text(f"#!/bin/sh\nexec {args.valgrind} --tool=callgrind --trace-children=yes --dump-instr=no "
                       f"--callgrind-out-file={out}/out.%p {python} \"$@\"\n")
    wrapper.chmod(0o755)
    sections = "[dns]\n  reverse_lookup = no\n"
    if args.tls:
        cert, key = bench_tls_peers.make_certificate(folder)
        (folder / "server.pem").write_bytes(key.read_bytes() + cert.read_bytes())
        sections += "[tls]\n  certificate = server.pem\n"
    server = benchlib.QpgeventServer(str(wrapper), folder, QUEUES[args.queue], "warning",
                                     max_connections=args.concurrency + 100, workers=1, sections=sections)
    try:
        server.wait_ready(VALGRIND_READY_TIMEOUT)
        if args.tls:
            client = subprocess.run([str(args.client), str(server.port), str(cert), str(args.concurrency),
                                     str(messages // args.concurrency), str(args.concurrency), str(args.size)],
                                    input="go\n", capture_output=True, text=True, timeout=1800)
            done = bench_tls_peers.parse_done(client.stdout.splitlines()[-1] if client.stdout else "")
            if done is None or done[:2] != (0, messages):
                raise benchlib.BenchError(f"the TLS client said {client.stdout!r} {client.stderr!r}")
        else:
            benchlib.run_smtp_source(args.smtp_source, server.port, args.concurrency, messages, args.size, 1800)
    finally:
        server.stop()
    # One file per process: the master's (its pid: the wrapper script exec'd valgrind) and
    # the worker's. Not simply the largest: the master's start-up and supervision outweigh
    # a worker that served a few messages.
    master = out / f"out.{server.process.pid}"
    totals = [total for name in glob.glob(str(out / "out.*"))
              if Path(name) != master and (total := _total(Path(name)))]
    if len(totals) != 1:
        raise benchlib.BenchError(f"expected one worker's callgrind output in {out}, found {len(totals)}:\n"
                                  f"{benchlib.tail(server.log())}")
    return totals[0]


def _total(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    if not os.access(shutil.which("valgrind") or "", os.X_OK):
        print("valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark the milter plugin: messages/s through a real OpenDKIM (signing every message)
beside the same run without it.

Usage:
    tools/bench_milter.py [--messages 2000] [--concurrency 100] [--python PYTHON]
                          [--smtp-source PATH] [--log-level warning]

What it runs, all on this machine:

  milter   opendkim (Debian's), started as the milter tests start it
           (tests/milter/milter_daemons.py), signing client.test, on a loopback TCP port
  server   ``PYTHON -m qpgevent -c qpsmtpd.ini --workers 1`` (one core's numbers)
  client   Postfix's smtp-source: CONCURRENCY sessions at once, one message each, 2 KiB

Runs:
  off      rcpt_ok + queue/maildir (fsync = no)
  opendkim [[milter]] with opendkim + rcpt_ok + queue/maildir (fsync = no); afterwards every
           delivered file must start with opendkim's DKIM-Signature
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "milter"))
import benchlib  # noqa: E402

from milter_daemons import OpenDkim  # noqa: E402

QUEUE = "[[rcpt_ok]]\n  domains = example.test\n[[queue/maildir]]\n  path = Maildir\n  fsync = no\n"


def run(args, folder: Path, plugins: str) -> tuple[float, float, int]:
    """One server, one smtp-source run: (messages/s, server CPU ms per message, files delivered)."""
    folder.mkdir()
    server = benchlib.QpgeventServer(args.python, folder, plugins, log_level=args.log_level, workers=1)
    try:
        server.wait_ready()
        cpu = server.cpu_seconds()
        seconds = benchlib.run_smtp_source(args.smtp_source, server.port, args.concurrency, args.messages,
                                           2048, timeout=600)
        cpu = server.cpu_seconds() - cpu
    finally:
        server.stop()
    files = sorted((folder / "Maildir" / "new").iterdir())
    if len(files) != args.messages:
        raise benchlib.BenchError(f"{len(files)} of {args.messages} messages delivered; see {folder}/server.log")
    return args.messages / seconds, 1000 * cpu / args.messages, len(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qpg-bench-milter-"))
    opendkim = OpenDkim(domain="client.test")
    try:
        rate_off, cpu_off, _ = run(args, work / "off", QUEUE)
        milter = f"[[milter]]\n  [[[opendkim]]]\n    address = {opendkim.address}\n"
        rate_on, cpu_on, _ = run(args, work / "opendkim", milter + QUEUE)
        unsigned = [f.name for f in (work / "opendkim" / "Maildir" / "new").iterdir()
                    if not f.read_bytes().split(b"\r\n", 1)[1].startswith(b"DKIM-Signature:")]
        if unsigned:
            raise benchlib.BenchError(f"{len(unsigned)} messages not signed, e.g. {unsigned[0]}")
    finally:
        opendkim.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{time.strftime('%Y-%m-%d')} messages={args.messages} concurrency={args.concurrency} size=2048 workers=1")
    print(f"off       {rate_off:7.0f} msg/s  server CPU {cpu_off:5.2f} ms/msg")
    print(f"opendkim  {rate_on:7.0f} msg/s  server CPU {cpu_on:5.2f} ms/msg  (every message signed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

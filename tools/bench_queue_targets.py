#!/usr/bin/env python3
"""Benchmark qpgevent's queue targets with Postfix's smtp-source: maildir, smtp_forward, lmtp.

Usage:
    tools/bench_queue_targets.py [--messages 2000] [--size 1000] [--concurrency 100]
                                 [--targets maildir,smtp_forward,lmtp] [--pool-size 20]
                                 [--workers N] [--python PYTHON] [--log-level warning]
                                 [--timeout 300]

For each target it starts what the target needs and the qpgevent command (a child
process on a free loopback port) with rcpt_ok and that queue plugin, then runs
``smtp-source -s CONCURRENCY -m MESSAGES`` against it once per concurrency:

  maildir       queue/maildir, fsync on (the baseline: a local disk)
  smtp_forward  queue/smtp_forward into a private Postfix (``postfix -c DIR start-fg``
                on a loopback port, virtual delivery to a Maildir), pooled connections
  lmtp          queue/lmtp into a private Dovecot LMTP (unix socket), pooled

messages/second comes from smtp-source's wall time, and every message counted has had its
250, so the next hop had it by then (Postfix: in its queue, fsynced). Afterwards the tool
waits (bounded) until every message is in its final Maildir, and fails unless exactly the
messages sent arrived. Server CPU ms/message is the qpgevent processes' CPU time (master
and workers; Postfix's and Dovecot's are not in it). Everything runs on this machine:
qpgevent, smtp-source and the next hop share its cores. Needs root (Postfix and Dovecot
drop privileges themselves).

Exit status 0 when every run succeeded and every count matched, 1 otherwise, 2 for bad
options. Servers are stopped at the end, on errors and on Ctrl-C.

Example:
    tools/bench_queue_targets.py --messages 1000 --concurrency 10,100
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tools"))
import benchlib  # noqa: E402
from benchlib import BenchError  # noqa: E402
from qpgevent.testing.mta import Dovecot, Postfix, wait_until  # noqa: E402

TARGETS = ("maildir", "smtp_forward", "lmtp")
SENDER, RECIPIENT = "sender@client.test", "someone@example.test"


@dataclass
class Result:
    target: str
    concurrency: int
    messages: int
    seconds: float
    server_cpu: float
    delivered: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


HEADER = (f"{'target':<12} {'concurrency':>11} {'messages':>8} {'seconds':>8} {'messages/second':>15} "
          f"{'server CPU ms/message':>21} {'delivered':>9}")


def format_row(result: Result) -> str:
    return (f"{result.target:<12} {result.concurrency:>11} {result.messages:>8} {result.seconds:>8.2f} "
            f"{result.rate:>15.1f} {result.server_cpu * 1000 / result.messages:>21.3f} {result.delivered:>9}")


class Server(benchlib.QpgeventServer):
    """``PYTHON -m qpgevent -c INI --listen 127.0.0.1:PORT`` in a child process."""

    def __init__(self, args: argparse.Namespace, folder: Path, plugins: str) -> None:
        workers = f"  workers = {args.workers}\n" if args.workers is not None else ""
        super().__init__(args.python, folder, plugins, args.log_level, max(1000, max(args.concurrency) + 10),
                         server_settings=workers)


def smtp_source(args: argparse.Namespace, port: int, concurrency: int) -> float:
    """One smtp-source run; its wall time. smtp-source stops at the first refusal."""
    return benchlib.run_smtp_source(args.smtp_source, port, concurrency, args.messages, args.size, args.timeout)


def plugins(target: str, args: argparse.Namespace, postfix: Postfix | None, dovecot: Dovecot | None) -> str:
    rcpt_ok = "  [[rcpt_ok]]\n    domains = example.test\n"
    if target == "maildir":
        return rcpt_ok + "  [[queue/maildir]]\n    path = Maildir\n    fsync = yes\n"
    pool = f"    pool_size = {args.pool_size}\n    pool_wait = 60\n"
    if target == "smtp_forward":
        assert postfix is not None
        return f"  [[queue/smtp_forward]]\n    routes = *:127.0.0.1:{postfix.port}\n{pool}" + rcpt_ok
    assert dovecot is not None
    return f"  [[queue/lmtp]]\n    routes = *:{dovecot.lmtp_socket}\n{pool}" + rcpt_ok


def bench_target(args: argparse.Namespace, target: str, folder: Path) -> list[Result]:
    folder.mkdir()
    postfix = dovecot = None
    if target == "smtp_forward":
        postfix = Postfix([RECIPIENT], main={"default_process_limit": str(max(200, 4 * args.pool_size))})
    elif target == "lmtp":
        dovecot = Dovecot({RECIPIENT: "x"})

    def delivered() -> int:
        if postfix:
            return len(postfix.messages(RECIPIENT))
        if dovecot:
            return len(dovecot.messages(RECIPIENT))
        new = folder / "Maildir" / "new"
        return sum(1 for _ in new.iterdir()) if new.is_dir() else 0

    results = []
    try:
        for service in (postfix, dovecot):
            if service:
                service.start()
        server = Server(args, folder, plugins(target, args, postfix, dovecot))
        try:
            server.wait_ready()
            for concurrency in args.concurrency:
                before, cpu_before = delivered(), server.cpu_seconds()
                try:
                    seconds = smtp_source(args, server.port, concurrency)
                except BenchError as error:
                    raise BenchError(f"{target}, concurrency {concurrency}: {error}\n--- server log ---\n"
                                     + "\n".join(server.log().splitlines()[-30:])) from None
                result = Result(target, concurrency, args.messages, seconds, server.cpu_seconds() - cpu_before)
                # Postfix delivers after its 250, in the background: wait for it (bounded).
                try:
                    wait_until(lambda: delivered() - before >= args.messages, args.timeout,
                               f"{target} deliveries", interval=0.1)
                except TimeoutError:
                    pass  # the count says how many are missing
                result.delivered = delivered() - before
                results.append(result)
                print(format_row(result), flush=True)
        finally:
            status = server.stop()
        if status != 0:
            raise BenchError(f"{target}: server exited with status {status}\n{server.log()[-3000:]}")
    finally:
        for service in (postfix, dovecot):
            if service:
                service.cleanup()
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchlib.smtp_source_parser("Benchmark qpgevent's queue targets with smtp-source.", [100],
                                         sys.executable)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma separated (default: all three)")
    parser.add_argument("--pool-size", type=int, default=20,
                        help="smtp_forward/lmtp connections per route and worker (default %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="[server] workers (default: the server's)")
    args = benchlib.parse_smtp_source_args(parser, argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.targets or set(args.targets) - set(TARGETS):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if args.pool_size < 1:
        parser.error("--pool-size must be 1 or more")
    if os.geteuid() != 0 and set(args.targets) & {"smtp_forward", "lmtp"}:
        parser.error("the Postfix and Dovecot next hops need root (they drop privileges themselves)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.unwind_on_signals()
    print(f"# {args.messages} messages of {args.size} bytes per run, one connection each, concurrency "
          f"{','.join(map(str, args.concurrency))}, pool_size {args.pool_size}, {os.cpu_count()} CPUs", flush=True)
    print(HEADER, flush=True)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="qpg-bench-queue-") as temp:
            for target in args.targets:
                results += bench_target(args, target, Path(temp) / target)
    except BenchError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    failed = [r for r in results if r.delivered != r.messages]
    for result in failed:
        print(f"{result.target} concurrency {result.concurrency}: {result.messages} accepted but "
              f"{result.delivered} delivered: MISMATCH", file=sys.stderr)
    if not failed:
        print(f"every message accepted was delivered ({sum(r.messages for r in results)} in all): OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark the real qpgevent server with Postfix's smtp-source.

Usage:
    tools/bench_smtp_source.py [--messages 2000] [--size 1000] [--concurrency 100,500]
                               [--workers 1,2] [--python PYTHON]
                               [--smtp-source /usr/sbin/smtp-source]
                               [--keep-connection] [--log-level info] [--timeout 300]
                               [--workdir DIR] [--configs discard,maildir]

For each of two configurations, written into a temporary folder, and each number of
worker processes, it starts the qpgevent command (``PYTHON -m qpgevent -c qpsmtpd.ini
--listen 127.0.0.1:PORT --workers N``, a free port) as a child process, then runs
smtp-source against it once per concurrency:

  discard   rcpt_ok (domains = example.test) + queue/discard: the SMTP engine alone
  maildir   rcpt_ok (domains = example.test) + queue/maildir with fsync on

Each run sends --messages messages of --size payload bytes, from sender@client.test
to someone@example.test, with ``smtp-source -s CONCURRENCY -m MESSAGES``; its wall
time gives messages/second, and the server's CPU time (user + system of the master and
its workers, from /proc) divided by the messages gives "server CPU ms/message". At the
end, the messages/second of each worker count are printed side by side (1 worker
against 2 workers, and their ratio, by default), all measured in the same run. smtp-source aborts at the
first refused command (exit status 1, "fatal: ..." on standard error), and so does
this tool. After every maildir run it counts the files in Maildir/new and fails
unless exactly the messages sent were delivered. Warnings and errors in the server's
log are shown.

Options:
  --messages N         messages per run (default 2000)
  --size BYTES         message payload, headers not included (default 1000)
  --concurrency LIST   sessions in parallel, comma separated (default 100,500)
  --workers LIST       worker processes of the server, comma separated (default 1,2)
  --python PATH        the Python that has qpgevent installed (default: this one if
                       it can import qpgevent, else the repo's .venv/bin/python)
  --keep-connection    smtp-source -d: several messages per connection (default:
                       one connection per message)
  --log-level LEVEL    the server's log level (default info, as in production)
  --timeout SECONDS    give up on one smtp-source run after this long (default 300)
  --workdir DIR        create the temporary folder here (default: the system's temp
                       folder); it decides which disk the maildir run fsyncs to
  --configs LIST       which configurations to run (default discard,maildir)

Exit status 0 when every run succeeded (and every maildir count matched), 1
otherwise, 2 for bad options. The servers are stopped with SIGTERM at the end, on
errors and on Ctrl-C (SIGKILL only if one does not stop within 20 seconds).

Example:
    tools/bench_smtp_source.py --python .venv/bin/python --messages 500 --concurrency 1,50
    tools/bench_smtp_source.py --configs discard --messages 5000   # 1 vs 2 workers at 100, 500
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from benchlib import BenchError, count_files, tail  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMPLAINT = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")
#: Warnings this tool causes on purpose: the discard queue, and allow_root when run as root.
EXPECTED_WARNINGS = re.compile(r"queue/discard is loaded|serving as root \(allow_root = yes\)")

CONFIGS = {
    "discard": """
  [[rcpt_ok]]
    domains = example.test
  [[queue/discard]]
""",
    "maildir": """
  [[rcpt_ok]]
    domains = example.test
  [[queue/maildir]]
    path = Maildir
    fsync = yes
""",
}


@dataclass
class Result:
    config: str
    workers: int
    concurrency: int
    messages: int
    seconds: float
    server_cpu: float  # CPU seconds the server's processes used during the run
    delivered: int | None = None  # files counted in Maildir/new, maildir runs only

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else float("inf")


def run_smtp_source(args: argparse.Namespace, port: int, concurrency: int) -> float:
    """One smtp-source run with this tool's options; its wall time. Raises BenchError if it failed."""
    return benchlib.run_smtp_source(args.smtp_source, port, concurrency, args.messages, args.size, args.timeout,
                                    keep_connection=args.keep_connection)


def bench_config(args: argparse.Namespace, name: str, folder: Path, workers: int) -> list[Result]:
    folder.mkdir()
    # Room for every smtp-source session (and the readiness probe) at once.
    max_connections = max(1000, max(args.concurrency) + 10)
    server = benchlib.QpgeventServer(args.python, folder, CONFIGS[name], args.log_level, max_connections, workers)
    name_workers = f"{name}, {workers} worker{'s' if workers > 1 else ''}"
    results = []
    try:
        server.wait_ready()
        print(f"# {name_workers}: qpgevent {server.version} pid {server.process.pid} on 127.0.0.1:{server.port}",
              flush=True)
        new = folder / "Maildir" / "new"
        for concurrency in args.concurrency:
            before, cpu_before = count_files(new), server.cpu_seconds()
            try:
                seconds = run_smtp_source(args, server.port, concurrency)
            except BenchError as error:
                raise BenchError(f"{name_workers}, concurrency {concurrency}: {error}\n"
                                 f"--- server log (last lines) ---\n{tail(server.log())}") from None
            result = Result(name, workers, concurrency, args.messages, seconds, server.cpu_seconds() - cpu_before)
            if name == "maildir":
                result.delivered = count_files(new) - before
            results.append(result)
            print(format_row(result), flush=True)
    finally:
        status = server.stop()
    if status != 0:
        raise BenchError(f"{name_workers}: server exited with status {status} after SIGTERM\n{tail(server.log())}")
    leftovers = count_files(folder / "Maildir" / "tmp")
    if leftovers:
        raise BenchError(f"{name_workers}: {leftovers} file(s) left in Maildir/tmp")
    complaints = [line for line in server.log().splitlines()
                  if COMPLAINT.search(line) and not EXPECTED_WARNINGS.search(line)]
    if complaints:
        # Not a failure (every message was accepted), but worth a look.
        print(f"# {name_workers}: the server logged {len(complaints)} warning(s)/error(s), first ones:\n"
              + "\n".join(complaints[:5]), file=sys.stderr)
    return results


HEADER = (f"{'config':<8} {'concurrency':>11} {'messages':>8} {'seconds':>8} {'messages/second':>15} "
          f"{'server CPU ms/message':>21}")


def side_by_side(results: list[Result], workers: list[int]) -> list[str]:
    """messages/second per (config, concurrency), one column per worker count, and the ratio."""
    labels = [f"{w} worker{'s' if w > 1 else ''}" for w in workers]
    ratio = len(workers) >= 2
    header = f"{'config':<8} {'concurrency':>11}" + "".join(f" {label:>10}" for label in labels)
    if ratio:
        header += f" {f'{workers[-1]} vs {workers[0]}':>8}"
    lines = ["messages/second by number of worker processes, measured in this run:", header]
    rates = {(r.config, r.concurrency, r.workers): r.rate for r in results}
    for config, concurrency in dict.fromkeys((r.config, r.concurrency) for r in results):
        row = f"{config:<8} {concurrency:>11}"
        row += "".join(f" {rates.get((config, concurrency, w), float('nan')):>10.1f}" for w in workers)
        if ratio:
            first, last = rates.get((config, concurrency, workers[0])), rates.get((config, concurrency, workers[-1]))
            row += f" {last / first:>7.2f}x" if first and last else f" {'-':>8}"
        lines.append(row)
    return lines


def format_row(result: Result) -> str:
    return (f"{result.config:<8} {result.concurrency:>11} {result.messages:>8} "
            f"{result.seconds:>8.2f} {result.rate:>15.1f} {result.server_cpu * 1000 / result.messages:>21.3f}")


def default_python() -> str:
    if importlib.util.find_spec("qpgevent") is not None:
        return sys.executable
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def config_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"configs are {', '.join(CONFIGS)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchlib.smtp_source_parser("Benchmark qpgevent with Postfix's smtp-source.", [100, 500],
                                         default_python(), log_level="info")
    parser.add_argument("--workers", type=benchlib.number_list("worker counts"), default=[1, 2],
                        help="worker processes of the server, comma separated (default 1,2)")
    parser.add_argument("--keep-connection", action="store_true", help="several messages per connection (-d)")
    parser.add_argument("--configs", type=config_list, default=list(CONFIGS),
                        help="configurations to run (default discard,maildir)")
    return benchlib.parse_smtp_source_args(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.unwind_on_signals()
    print(f"# {args.messages} messages of {args.size} bytes per run, concurrency "
          f"{','.join(map(str, args.concurrency))}, workers {','.join(map(str, args.workers))}, "
          f"{'one connection per message' if not args.keep_connection else 'connections reused (-d)'}, "
          f"server log level {args.log_level}, python {args.python}", flush=True)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="qpg-bench-", dir=args.workdir) as temp:
            print(HEADER, flush=True)
            for name in args.configs:
                for workers in args.workers:
                    results += bench_config(args, name, Path(temp) / f"{name}-{workers}w", workers)
    except BenchError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130
    print()
    print(HEADER)
    for n, result in enumerate(results):
        if n == 0 or (result.config, result.workers) != (results[n - 1].config, results[n - 1].workers):
            print(f"# {result.config}, {result.workers} worker{'s' if result.workers > 1 else ''}")
        print(format_row(result))
    print()
    print("\n".join(side_by_side(results, args.workers)))
    failed = False
    for result in results:
        if result.delivered is None:
            continue
        who = f"{result.workers} worker{'s' if result.workers > 1 else ''}"
        if result.delivered == result.messages:
            print(f"{who}, maildir concurrency {result.concurrency}: {result.delivered} messages sent, "
                  f"{result.delivered} delivered in Maildir/new: OK")
        else:
            failed = True
            print(f"{who}, maildir concurrency {result.concurrency}: {result.messages} messages sent, "
                  f"but {result.delivered} in Maildir/new: MISMATCH", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A distributed Locust run against a fresh qpgevent, with every message's delivery checked.

Usage (from the repository root)::

    .venv/bin/python loadtest/distributed.py --users 10000 --spawn-rate 500 --run-time 120 \\
        --locust-workers 4 --server-workers 2 [--out DIR] [--no-fsync]

What it starts, each a child process, all on 127.0.0.1, and stops again whatever happens:

- qpgevent (``--server-workers`` workers) with ``rcpt_ok`` (example.test) and
  ``queue/maildir`` into a fresh Maildir, fsync on (the durable default) unless
  ``--no-fsync``, ``[limits] max_connections`` above ``--users``, ``plugin_timeout`` from
  ``--plugin-timeout``, no client-name look-up.
- A Locust master (``--master --headless --expect-workers N``) and ``--locust-workers``
  Locust workers (``--worker``), running loadtest/locustfile.py's ``CleanSender`` (one
  connection per message: CONNECT, EHLO, MAIL, RCPT, DATA, QUIT) with ``--users`` users,
  each pausing ``--think-seconds`` on average between messages (0: as fast as answered).
  Users begin transactions for ``--run-time`` seconds (the ramp-up included; the locustfile's
  ``--send-for``); then each finishes the message it is sending and ends, and the master
  quits once the workers have reported the last of them. Locust's ``-t`` (``--run-time`` +
  ``--stop-timeout``) is only the bound: a run that reaches it has users cut off, and fails.

Then it checks delivery: the files in the Maildir must be exactly the DATA steps Locust saw
answered 250 (a 250 means on disk; nothing lost, nothing doubled), and no step may have
failed. It prints the per-step latency table (median, p95, p99 in milliseconds, from
Locust's CSV) as Markdown, with the command, the date and the load average. Exit status 0
when all of that holds, 1 otherwise.

The whole run is bounded: the Locust master gets ``--run-time`` + ``--stop-timeout`` + 120 s,
then everything is stopped.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tools"))
import benchlib  # noqa: E402

LOCUSTFILE = HERE / "locustfile.py"
STEPS = ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "QUIT")
#: Seconds the master may take beyond the run time and the stop timeout (start-up, reports).
MARGIN = 120.0


def raise_nofile() -> None:
    """Soft open-file limit up to the hard one, in every process started (users are sockets)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest/distributed.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10000, help="Locust users, in all [%(default)s]")
    parser.add_argument("--spawn-rate", type=float, default=500, help="users started per second [%(default)s]")
    parser.add_argument("--run-time", type=float, default=120,
                        help="seconds users begin new messages, the ramp-up included [%(default)s]")
    parser.add_argument("--stop-timeout", type=float, default=120,
                        help="seconds the users get to finish their message at the end, at most [%(default)s]")
    parser.add_argument("--locust-workers", type=int, default=4, help="Locust worker processes [%(default)s]")
    parser.add_argument("--server-workers", type=int, default=2, help="qpgevent workers [%(default)s]")
    parser.add_argument("--smtp-timeout", type=float, default=180,
                        help="the users' socket timeout, seconds [%(default)s]")
    parser.add_argument("--think-seconds", type=float, default=0,
                        help="each user's pause between messages, uniform in 0..2x (0: a closed loop) [%(default)s]")
    parser.add_argument("--body-bytes", type=int, default=2048, help="message body size [%(default)s]")
    parser.add_argument("--plugin-timeout", type=float, default=30,
                        help="the server's [limits] plugin_timeout: a closed loop of thousands of users on a few "
                             "cores queues each message longer than the default 30 s [%(default)s]")
    parser.add_argument("--no-fsync", action="store_true", help="queue/maildir with fsync = no")
    parser.add_argument("--python", default=sys.executable, help="the Python with qpgevent and Locust")
    parser.add_argument("--out", default="", help="keep Locust's CSV and HTML and the logs here "
                                                  "(default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    if min(args.users, args.locust_workers, args.server_workers) < 1 or args.run_time <= 0:
        parser.error("--users, --locust-workers, --server-workers and --run-time must be positive")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=raise_nofile, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))


def run(args: argparse.Namespace, folder: Path) -> int:
    locust = [args.python, "-m", "locust", "-f", str(LOCUSTFILE)]
    plugins = ("  [[rcpt_ok]]\n    domains = example.test\n"
               f"  [[queue/maildir]]\n    path = Maildir\n    fsync = {'no' if args.no_fsync else 'yes'}\n")
    load_before = os.getloadavg()
    sections = (f"  plugin_timeout = {args.plugin_timeout:g}\n"   # still in the [limits] QpgeventServer opens
                "[dns]\n  reverse_lookup = no\n")
    server = benchlib.QpgeventServer(args.python, folder, plugins, "warning", max_connections=args.users + 500,
                                     workers=args.server_workers, sections=sections)
    children: list[subprocess.Popen] = []
    try:
        server.wait_ready()
        master_port = benchlib.free_port()
        prefix = folder / "locust"
        master = start(locust + ["--master", "--headless", "--expect-workers", str(args.locust_workers),
                                 "--master-bind-host", "127.0.0.1", "--master-bind-port", str(master_port),
                                 "-u", str(args.users), "-r", str(args.spawn_rate), "--send-for", f"{args.run_time:g}",
                                 "-t", f"{args.run_time + args.stop_timeout:g}s", "--stop-timeout",
                                 f"{args.stop_timeout:g}", "--host", f"smtp://127.0.0.1:{server.port}",
                                 "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
                                 "--smtp-timeout", f"{args.smtp_timeout:g}", "--body-bytes", str(args.body_bytes),
                                 "--think-seconds", f"{args.think_seconds:g}",
                                 "CleanSender"], folder / "master.log")
        children.append(master)
        for number in range(args.locust_workers):
            children.append(start(locust + ["--worker", "--master-host", "127.0.0.1", "--master-port",
                                            str(master_port), "CleanSender"], folder / f"worker{number}.log"))
        started = time.monotonic()
        try:
            master.wait(args.run_time + args.stop_timeout + MARGIN)
        except subprocess.TimeoutExpired:
            print(f"FAILED: the Locust master did not end within {args.run_time + args.stop_timeout + MARGIN:g}s",
                  file=sys.stderr)
            return 1
        elapsed = time.monotonic() - started
        load_after = os.getloadavg()
        delivered = benchlib.count_files(folder / "Maildir" / "new")
    finally:
        for child in reversed(children):
            benchlib.stop_process(child, timeout=30)
        server.stop()
    rows = read_stats(Path(f"{prefix}_stats.csv"))
    if ("TXN", "clean") not in rows:
        print(f"FAILED: no transactions in Locust's statistics; its log:\n{benchlib.tail(read(folder / 'master.log'))}",
              file=sys.stderr)
        return 1
    data_ok = int(rows[("SMTP", "DATA")]["Request Count"]) - int(rows[("SMTP", "DATA")]["Failure Count"])
    failures = sum(int(row["Failure Count"]) for key, row in rows.items() if key[0] in ("SMTP", "TXN"))
    print(report(args, rows, delivered, data_ok, failures, elapsed, load_before, load_after))
    if failures:
        print(f"failures (Locust's {prefix}_failures.csv):\n{read(Path(f'{prefix}_failures.csv'))[:3000]}")
    ok = failures == 0 and delivered == data_ok and master.returncode == 0
    print("OK: every message answered 250 is in the Maildir, nothing failed" if ok else
          f"FAILED: {delivered} messages in the Maildir, {data_ok} DATA answered 250, {failures} failed steps, "
          f"Locust exit status {master.returncode}")
    return 0 if ok else 1


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def read_stats(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    if not path.exists():
        return {}
    with open(path, newline="") as stats:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(stats)}


def report(args: argparse.Namespace, rows: dict, delivered: int, data_ok: int, failures: int, elapsed: float,
           load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    """The Markdown the README keeps: the command, the machine's state, the per-step table."""
    lines = [f"`loadtest/distributed.py {' '.join(args.argv)}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{os.cpu_count()} CPUs (server, Locust master and workers share them); load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} at the end; {elapsed:.0f} s in all. "
             f"Messages in the Maildir: {delivered}; DATA answered 250: {data_ok}; failed steps: {failures}.",
             "",
             "| step | count | failures | median ms | p95 ms | p99 ms | per s, whole run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for kind, name in [("SMTP", step) for step in STEPS] + [("TXN", "clean")]:
        row = rows.get((kind, name))
        if row is None:
            continue
        label = "TXN (whole message)" if kind == "TXN" else name
        lines.append(f"| {label} | {row['Request Count']} | {row['Failure Count']} | {row['50%']} | {row['95%']} | "
                     f"{row['99%']} | {float(row['Requests/s']):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchlib.unwind_on_signals()
    raise_nofile()
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "Maildir").exists():
            print(f"--out {folder}: has a Maildir from an earlier run; give a new folder", file=sys.stderr)
            return 2
        return benchlib.exit_status(lambda: run(args, folder))
    import tempfile
    with tempfile.TemporaryDirectory(prefix="qpg-locust-") as temp:
        return benchlib.exit_status(lambda: run(args, Path(temp)))


if __name__ == "__main__":
    sys.exit(main())

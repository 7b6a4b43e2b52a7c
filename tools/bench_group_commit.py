#!/usr/bin/env python3
"""Count queue/maildir's syncs per message under load: what group commit saves, machine-independent.

Usage:
    tools/bench_group_commit.py [--concurrency 1,10,100,500] [--messages 2000] [--workers 2]
                                [--python PYTHON] [--size 2048] [--timeout 600]

For each concurrency, the qpgevent command (``--workers``, rcpt_ok + queue/maildir with its
default ``fsync = yes``) runs under ``strace --seccomp-bpf -f -e trace=fsync,io_submit,syncfs``
(only those calls stop the server, so the rest runs at full speed; an fsync is either the
system call, in a worker thread, or handed to the kernel with Linux AIO's io_submit: both
count), and Postfix's smtp-source sends ``--messages`` messages (a sixth of it at concurrency
1). The table gives, per concurrency, the messages in ``Maildir/new`` (must be all of them,
else exit status 1), the fsyncs of message files (a lone file's), the ``syncfs`` calls (one per
batch of several files and folders: queue/maildir's ``syncfs``), the fsyncs of the ``new/``
folder (one per batch whose only entry is new/), all of them per message, and the rate under
strace (indicative only: each stop costs a trip through strace).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import benchlib  # noqa: E402
from benchlib import BenchError  # noqa: E402
from qpgevent.testing.syscalls import parse  # noqa: E402
AIO_FSYNC = re.compile(r"aio_lio_opcode=IOCB_CMD_FD?SYNC, aio_fildes=\d+(<[^>]*)>")
HEADER = (f"{'concurrency':>11} {'messages':>8} {'in new/':>8} {'file fsyncs':>11} {'syncfs':>8} {'new/ fsyncs':>11} "
          f"{'syncs/message':>13} {'msg/s (traced)':>14}")


def one_concurrency(args, concurrency: int, temp: Path) -> tuple[int, int, int, int, int, float]:
    folder = temp / f"c{concurrency}"
    folder.mkdir()
    messages = args.messages if concurrency > 1 else max(1, args.messages // 6)
    port = benchlib.free_port()
    ini = folder / "qpsmtpd.ini"
    ini.write_text("[server]\n  me = mx.example.test\n  spool_dir = spool\n  allow_root = yes\n"
                   "[limits]\n  max_connections = 1000\n[dns]\n  reverse_lookup = no\n"
                   "[plugins]\n  [[rcpt_ok]]\n    domains = example.test\n  [[queue/maildir]]\n    path = Maildir\n",
                   encoding="utf-8")
    trace, log = folder / "strace.out", folder / "server.log"
    with open(log, "wb") as output:
        strace = subprocess.Popen(["strace", "--seccomp-bpf", "-f", "-qq", "-y", "-e", "trace=fsync,io_submit,syncfs", "-o", str(trace),
                                   args.python, "-m", "qpgevent", "-c", str(ini), "--listen", f"127.0.0.1:{port}",
                                   "--workers", str(args.workers), "--log-level", "warning"],
                                  cwd=folder, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        benchlib.wait_greeting(port, strace, lambda: log.read_text(errors="replace"))
        seconds = benchlib.run_smtp_source(args.smtp_source, port, concurrency, messages, args.size, args.timeout)
    finally:
        # strace's child is the qpgevent master: stop it, and strace ends with it.
        for master in benchlib.child_pids(strace.pid):
            os.kill(master, signal.SIGTERM)
        try:
            strace.wait(60)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait(10)
    calls = parse(trace.read_text())
    done = [call.args for call in calls if call.name == "fsync" and call.result == 0]
    done += [f"{path}>" for call in calls if call.name == "io_submit" and call.result == 1
             for path in AIO_FSYNC.findall(call.args)]
    folder_syncs = sum(1 for args in done if args.endswith("/Maildir/new>"))
    file_syncs = sum(1 for args in done if re.search(r"/Maildir/tmp/[^/>]+>$", args))
    shared = sum(1 for call in calls if call.name == "syncfs" and call.result == 0)
    delivered = benchlib.count_files(folder / "Maildir" / "new")
    if delivered != messages:
        raise BenchError(f"concurrency {concurrency}: {messages} messages sent, {delivered} in Maildir/new")
    return messages, delivered, file_syncs, shared, folder_syncs, messages / seconds


def main(argv: list[str] | None = None) -> int:
    parser = benchlib.smtp_source_parser(__doc__.split("\n\n", 1)[0], [1, 10, 100, 500],
                                         benchlib_python())
    parser.set_defaults(size=2048)
    parser.add_argument("--workers", type=int, default=2, help="qpgevent worker processes (default %(default)s)")
    args = benchlib.parse_smtp_source_args(parser, argv)
    if not shutil.which("strace"):
        parser.error("strace not found (Debian: apt-get install strace)")
    benchlib.unwind_on_signals()
    print(f"# tools/bench_group_commit.py: qpgevent --workers {args.workers}, fsync on; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    return benchlib.exit_status(lambda: measure(args))


def measure(args) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="qpg-group-commit-", dir=args.workdir) as temp:
        for concurrency in args.concurrency:
            rows.append((concurrency, *one_concurrency(args, concurrency, Path(temp))))
    print(HEADER)
    for concurrency, messages, delivered, file_syncs, shared, folder_syncs, rate in rows:
        print(f"{concurrency:>11} {messages:>8} {delivered:>8} {file_syncs:>11} {shared:>8} {folder_syncs:>11} "
              f"{(file_syncs + shared + folder_syncs) / messages:>13.3f} {rate:>14.0f}")
    return 0


def benchlib_python() -> str:
    """The Python that runs this tool if it has qpgevent, else the repository's .venv."""
    venv = REPO / ".venv" / "bin" / "python"
    if subprocess.run([sys.executable, "-c", "import qpgevent"], capture_output=True, cwd="/").returncode == 0:
        return sys.executable
    return str(venv)


if __name__ == "__main__":
    sys.exit(main())

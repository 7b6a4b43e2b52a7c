"""What the benchmark tools in tools/ share: a qpgevent server as a child process, Postfix's
smtp-source runner, CPU accounting from /proc, and the small option parsers.

Standard library only, so that a tool can import it before (or without) gevent's monkey-patching
and without qpgevent installed in the Python that runs the tool.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SENDER = "sender@client.test"
RECIPIENT = "someone@example.test"
CLIENT_NAME = "client.test"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
GREETING_VERSION = re.compile(r"qpgevent (\S+)")


class BenchError(Exception):
    """A run that did not do what it should: the message says what and where to look."""


# -- processes and their CPU time --------------------------------------------------------------

def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 if it is gone or off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After "pid (comm)": field 3 is state, so utime (14) and stime (15) are at 11 and 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    for task in tasks.glob("*") if tasks.is_dir() else []:
        try:
            children += [int(word) for word in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += child_pids(current)
    return found


def reaped_children_cpu_seconds(pid: int) -> float:
    """CPU seconds of the children ``pid`` has waited for (their own reaped ones included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds so far of ``pid``, its live descendants and the children they reaped.

    The reaped ones count because some servers start and end processes as they go
    (Postfix's smtpd and cleanup): their time moves to the parent that waits for them.
    """
    return sum(process_cpu_seconds(each) + reaped_children_cpu_seconds(each) for each in descendants(pid))


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its live descendants."""
    total = 0
    for each in descendants(pid):
        try:
            total += int(Path(f"/proc/{each}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            continue
    return total


# -- network -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_greeting(port: int, host: str = "127.0.0.1") -> str | None:
    """The server's first reply line, then QUIT; None while nothing listens there."""
    try:
        with socket.create_connection((host, port), timeout=5) as connection:
            reply = connection.makefile("rb").readline(1000).decode("utf-8", "replace").rstrip()
            connection.sendall(b"QUIT\r\n")
            return reply
    except OSError:
        return None


def wait_greeting(port: int, process: subprocess.Popen, log, timeout: float = READY_TIMEOUT) -> str:
    """Wait until a 220 greeting on ``port``; BenchError if ``process`` exits or time runs out.
    ``log`` is a callable giving the process's log for the error message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"server exited with status {process.returncode}:\n{tail(log())}")
        greeting = read_greeting(port)
        if greeting is not None:
            if not greeting.startswith("220"):
                raise BenchError(f"server on port {port} greets with {greeting!r}")
            return greeting
        time.sleep(0.05)
    raise BenchError(f"server not ready after {timeout}s:\n{tail(log())}")


def stop_process(process: subprocess.Popen, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM) -> int:
    """``sig`` (SIGTERM), wait; SIGKILL only if it did not stop in time. Returns the exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"pid {process.pid} ignored signal {sig} for {timeout}s: killing", file=sys.stderr)
            process.kill()
            process.wait(timeout)
    return process.returncode


# -- qpgevent as a child process -----------------------------------------------------------------

class QpgeventServer:
    """``PYTHON -m qpgevent -c INI --listen 127.0.0.1:PORT [--workers N]`` in a child process,
    logging to ``FOLDER/server.log``. ``sections`` is ini text put before ``[plugins]`` (for
    example a ``[dns]`` section); ``server_settings`` goes into ``[server]``.

    Ready once a connection gets the 220 greeting (this works at every log level).
    """

    def __init__(self, python: str, folder: Path, plugins: str, log_level: str = "info",
                 max_connections: int = 1000, workers: int | None = None, sections: str = "",
                 server_settings: str = "") -> None:
        self.folder = folder
        self.ini = folder / "qpsmtpd.ini"
        # Run as root (a container), the server must be told that serving as root is meant.
        allow_root = "  allow_root = yes\n" if os.geteuid() == 0 else ""
        self.ini.write_text(
            "[server]\n  me = mx.example.test\n  spool_dir = spool\n  shutdown_timeout = 5\n"
            + allow_root + server_settings
            # stress_at = 100: no stress mode. A benchmark sizes max_connections to its own
            # load; in stress, its sessions idle between messages would be shed.
            + f"[limits]\n  max_connections = {max_connections}\n  stress_at = 100\n" + sections
            + "[plugins]\n" + plugins, encoding="utf-8")
        self.log_path = folder / "server.log"
        self._log = open(self.log_path, "wb")
        self.port, self.version = free_port(), ""
        command = [python, "-m", "qpgevent", "-c", str(self.ini), "--listen", f"127.0.0.1:{self.port}",
                   "--log-level", log_level]
        if workers is not None:
            command += ["--workers", str(workers)]
        self.process = subprocess.Popen(
            command, cwd=folder, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait for the 220 greeting; if it does not come, stop the server (no process is left
        behind by a run that failed) and raise BenchError."""
        try:
            greeting = wait_greeting(self.port, self.process, self.log, timeout)
        except BaseException:
            self.stop()
            raise
        match = GREETING_VERSION.search(greeting)
        self.version = match.group(1) if match else "?"

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the master and its workers (all threads); 0 off Linux."""
        return tree_cpu_seconds(self.process.pid)

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int:
        status = stop_process(self.process)
        self._log.close()
        return status


# -- smtp-source ---------------------------------------------------------------------------------

def run_smtp_source(smtp_source: str, port: int, concurrency: int, messages: int, size: int,
                    timeout: float, keep_connection: bool = False, strict_stderr: bool = False,
                    recipient: str = RECIPIENT, host: str = "127.0.0.1", prefix: tuple[str, ...] = (),
                    message_file: Path | None = None) -> float:
    """One ``smtp-source -s CONCURRENCY -m MESSAGES -l SIZE`` run; its wall time in seconds.
    With ``message_file``, each message is that file (``-F``: header and body as they are) instead
    of ``SIZE`` generated payload bytes.

    smtp-source aborts at the first refused command (exit status 1, "fatal: ..." on standard
    error): BenchError then. Anything else on standard error is shown, or with ``strict_stderr``
    is an error too. ``prefix`` runs it elsewhere (``ip netns exec NS``: in a lab host).
    """
    payload = ["-F", str(message_file)] if message_file else ["-l", str(size)]
    command = [*prefix, smtp_source, "-s", str(concurrency), "-m", str(messages), *payload,
               "-f", SENDER, "-t", recipient, "-M", CLIENT_NAME]
    if keep_connection:
        command.append("-d")
    command.append(f"{host}:{port}")
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise BenchError(f"smtp-source still running after {timeout}s: {' '.join(command)}") from None
    finally:
        # Ctrl-C or an error while it runs: do not leave it behind.
        if process.poll() is None:
            process.kill()
            process.wait()
    seconds = time.perf_counter() - started
    if process.returncode != 0 or (strict_stderr and stderr.strip()):
        raise BenchError(f"smtp-source failed (exit status {process.returncode}): "
                         f"{' '.join(command)}\n{stderr.strip()}{stdout.strip()}")
    if stderr.strip():
        # Exit status 0 but something on stderr: show it, it is never expected.
        print(f"smtp-source said on stderr: {stderr.strip()}", file=sys.stderr)
    return seconds


# -- files, text, options, signals ---------------------------------------------------------------

def run_concurrently(send_one, port: int, data: bytes, messages: int, concurrency: int) -> float:
    """Seconds to send ``messages`` times ``data`` with ``send_one(port, data)``, ``concurrency``
    greenlets at once (the caller has monkey-patched); the first failure is raised."""
    import gevent
    import gevent.pool

    pool = gevent.pool.Pool(concurrency)
    started = time.perf_counter()
    jobs = [pool.spawn(send_one, port, data) for _ in range(messages)]
    gevent.joinall(jobs, raise_error=True)
    return time.perf_counter() - started


def count_files(folder: Path) -> int:
    return sum(1 for entry in os.scandir(folder) if entry.is_file()) if folder.is_dir() else 0


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def smtp_source_parser(description: str, concurrency: list[int], python: str,
                       log_level: str = "warning") -> argparse.ArgumentParser:
    """A parser with the options every smtp-source benchmark takes: --messages, --size,
    --concurrency, --python, --smtp-source, --log-level, --timeout, --workdir. Add the
    tool's own, then parse with ``parse_smtp_source_args``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (default %(default)s)")
    parser.add_argument("--size", type=int, default=1000, help="payload bytes per message (default %(default)s)")
    parser.add_argument("--concurrency", type=number_list("concurrency values"), default=concurrency,
                        help=f"sessions in parallel, comma separated (default {','.join(map(str, concurrency))})")
    parser.add_argument("--python", default=python, help="the Python with qpgevent (default %(default)s)")
    parser.add_argument("--smtp-source", default=shutil.which("smtp-source") or "/usr/sbin/smtp-source",
                        help="smtp-source program (default %(default)s)")
    parser.add_argument("--log-level", default=log_level, choices=["debug", "info", "warning", "error"],
                        help="the server's log level (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per smtp-source run (default %(default)s)")
    parser.add_argument("--workdir", help="where to create the temporary folder")
    return parser


def parse_smtp_source_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, and refuse what no smtp-source run can do (the tool checks its own options)."""
    args = parser.parse_args(argv)
    if args.messages < 1 or args.size < 0:
        parser.error("--messages must be 1 or more and --size 0 or more")
    if not os.access(args.smtp_source, os.X_OK):
        parser.error(f"smtp-source not found at {args.smtp_source} (Debian: apt-get install postfix)")
    return args


def number_list(what: str, kind: type = int, minimum: float = 1):
    """An argparse type: a comma-separated list of numbers, each at least ``minimum``."""
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be {minimum} or more")
        return values
    return parse


def _terminated(signum, frame):
    # SIGTERM to the tool: unwind like Ctrl-C so the finally blocks stop the servers.
    raise KeyboardInterrupt


def exit_status(body) -> int:
    """Run a tool's ``body()`` (its exit status): a BenchError prints "FAILED: ..." and gives 1,
    Ctrl-C or SIGTERM 130 (the body's finally blocks have stopped its servers)."""
    try:
        return body()
    except BenchError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: servers stopped", file=sys.stderr)
        return 130


def unwind_on_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt, so that finally blocks stop child servers.
    (Started in the background by a non-interactive shell, SIGINT comes in ignored.)"""
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)

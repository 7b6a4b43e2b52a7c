"""The pre-fork master, through the real ``python -m qpgevent`` in a child process.

What it must show (issue 3): workers start and serve; a worker killed with ``kill -9``
under load is reaped and respawned, and no message that got 250 is lost; SIGTERM during
200 sessions in the middle of DATA lets each message complete (250, delivered whole) or
get 421 (not delivered), and the master exits 0 in time; SIGHUP under steady load rolls
new workers in with the new config and not one connection is refused or reset; the
per-address limit (hosts_allow) and max_connections hold across workers, whichever
worker accepts; a bad plugin fails the start with exit 2 before any fork; root is
refused unless allowed, and ``user = nobody`` makes every process run as nobody.

Nothing here waits by sleeping: every wait is for a condition (a log line, a count, a
file), polled with a deadline.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import re
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gevent
import gevent.event
import pytest

from qpgevent.testing import DEFAULT_PLUGINS, ServerProcess, child_pids, maildir_messages, write_ini

REPO = Path(__file__).resolve().parents[2]
TEST_PLUGINS = REPO / "tests" / "data" / "plugins"
SENDER = "load@client.test"
RECIPIENT = "bob@example.test"
SERVING = re.compile(r"worker (\d+) \(pid (\d+), generation (\d+)\) serving")
#: "<date> <time> <pid> INFO qpgevent.session: conn=... connect from 127.0.0.1:<port> to ..."
CONNECT = re.compile(r"^\S+ \S+ (\d+) \w+ qpgevent\.session: .*connect from 127\.0\.0\.1:(\d+) to", re.MULTILINE)


# -- helpers ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], timeout: float, what: str, process=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            detail = f"\n--- server log ---\n{process.log()}" if process is not None else ""
            raise AssertionError(f"not within {timeout}s: {what}{detail}")
        gevent.sleep(0.02)


def wait_for_log(process, text: str, timeout: float = 15.0) -> None:
    wait_until(lambda: text in process.log(), timeout, f"log line {text!r}", process)


def serving(process, generation: int | None = None) -> dict[int, int]:
    """pid -> worker slot, for every worker that said it is serving (of ``generation``)."""
    return {int(pid): int(slot) for slot, pid, gen in SERVING.findall(process.log())
            if generation is None or int(gen) == generation}


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def message_of(ident: str) -> bytes:
    """A message whose body depends on ``ident`` (and whose header carries the body's hash)."""
    lines = 3 + int(hashlib.sha256(ident.encode()).hexdigest(), 16) % 60
    body = b"".join(f"{n:03d} message {ident} {'x' * 50}\r\n".encode() for n in range(lines))
    header = f"X-Test-Id: {ident}\r\nX-Body-SHA256: {hashlib.sha256(body).hexdigest()}\r\nSubject: {ident}\r\n"
    return header.encode() + b"\r\n" + body


def delivered_ids(maildir: Path) -> list[str]:
    """The X-Test-Id of every file in Maildir/new, each checked to be whole."""
    ids = []
    for name, content in maildir_messages(maildir).items():
        header, separator, body = content.partition(b"\r\n\r\n")
        assert separator, f"{name}: no end of header"
        fields = dict(line.split(b": ", 1) for line in header.split(b"\r\n") if b": " in line)
        assert hashlib.sha256(body).hexdigest() == fields[b"X-Body-SHA256"].decode(), f"{name} is not whole"
        ids.append(fields[b"X-Test-Id"].decode())
    return ids


class Load:
    """``clients`` greenlets sending messages with unique ids until ``stop()``.

    ``per_connection``: one message per connection (every message goes through accept);
    else each client keeps its connection, and opens a new one after an error. Messages
    answered 250 go into ``accepted``; every failure, with its exception, into ``errors``.
    """

    def __init__(self, port: int, clients: int, tag: str, per_connection: bool = False) -> None:
        self.port, self.tag, self.per_connection = port, tag, per_connection
        self.accepted: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self._stop = gevent.event.Event()
        self.greenlets = [gevent.spawn(self._client, n) for n in range(clients)]

    def _client(self, client: int) -> None:
        number = 0
        smtp = None
        while not self._stop.is_set():
            ident = f"{self.tag}-c{client:02d}-m{number:05d}"
            number += 1
            try:
                if smtp is None:
                    smtp = smtplib.SMTP("127.0.0.1", self.port, local_hostname="load.client.test", timeout=30)
                smtp.sendmail(SENDER, [RECIPIENT], message_of(ident))
                self.accepted.append(ident)
                if self.per_connection:
                    smtp.quit()
                    smtp = None
            except (smtplib.SMTPException, OSError) as error:
                self.errors.append((ident, repr(error)))
                if smtp is not None:
                    smtp.close()
                smtp = None
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()

    def stop(self, timeout: float = 30) -> None:
        self._stop.set()
        done = gevent.joinall(self.greenlets, timeout=timeout)
        assert len(done) == len(self.greenlets), "load clients still hanging"


# -- workers start, and serve --------------------------------------------------------------


def test_two_workers_start_and_serve_and_run_post_fork(server_process, tmp_path):
    marks = tmp_path / "post_fork"
    marks.mkdir()
    process = server_process(DEFAULT_PLUGINS + f"[[post_fork_probe]]\n  folder = {marks}\n",
                             workers=2, plugin_dirs=str(TEST_PLUGINS))
    workers = serving(process)
    assert len(workers) == 2 and sorted(workers.values()) == [0, 1]
    assert sorted(process.worker_pids()) == sorted(workers)  # the master's children, and only them
    assert f"ready (pid {process.process.pid}, 2 workers, 3 plugins)" in process.log()
    # post_fork ran once in each worker (whose parent is the master), never in the master.
    assert sorted(int(p.name) for p in marks.iterdir()) == sorted(workers)
    assert {p.read_text().strip() for p in marks.iterdir()} == {str(process.process.pid)}
    with process.smtp(timeout=10) as client:
        assert client.sendmail(SENDER, [RECIPIENT], message_of("hello")) == {}
    assert delivered_ids(process.maildir) == ["hello"]
    assert process.terminate(20) == 0
    assert "stopped" in process.log().splitlines()[-1]


# -- kill -9 of a worker ------------------------------------------------------------------


def test_a_worker_killed_under_load_is_respawned_and_no_accepted_message_is_lost(server_process):
    process = server_process(workers=2)
    load = Load(process.port, clients=20, tag="kill")
    try:
        wait_until(lambda: len(load.accepted) >= 300, 60, "300 messages accepted", process)
        # The worker that holds the most of the 20 sessions: the kill lands in the middle of them.
        sessions = [int(pid) for pid, _ in CONNECT.findall(process.log())]
        victim = max(serving(process), key=sessions.count)
        slot = serving(process)[victim]
        os.kill(victim, signal.SIGKILL)
        wait_for_log(process, f"worker {slot} (pid {victim}) of generation 1 killed by signal SIGKILL")
        wait_until(lambda: len(serving(process)) == 3, 15, "a new worker serving", process)
        respawned = [pid for pid, s in serving(process).items() if s == slot and pid != victim]
        assert len(respawned) == 1
        assert sorted(process.worker_pids()) == sorted(set(serving(process)) - {victim})
        after = len(load.accepted)
        wait_until(lambda: len(load.accepted) >= after + 200, 60, "200 more accepted after the respawn", process)
    finally:
        load.stop()
    assert process.terminate(30) == 0
    delivered = delivered_ids(process.maildir)
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    lost = set(load.accepted) - set(delivered)
    assert not lost, f"{len(lost)} message(s) answered 250 but not in Maildir/new"
    # The clients of the killed worker saw their connection die; nothing else failed.
    assert load.errors and all("Disconnected" in e or "Reset" in e or "Broken" in e for _, e in load.errors), \
        load.errors[:5]
    assert set(delivered) <= set(load.accepted) | {ident for ident, _ in load.errors}


def test_a_worker_that_dies_at_once_is_respawned_with_growing_backoff(server_process, tmp_path):
    poison = tmp_path / "poison"
    process = server_process(DEFAULT_PLUGINS + f"[[post_fork_probe]]\n  die_if = {poison}\n",
                             workers=2, plugin_dirs=str(TEST_PLUGINS))
    victim = sorted(serving(process))[0]
    slot = serving(process)[victim]
    poison.write_text("its pool cannot open\n")
    os.kill(victim, signal.SIGKILL)
    for delay in ("0.5", "1.0", "2.0"):  # each new worker dies in post_fork: 0.5 s, then doubling
        wait_for_log(process, f"respawning worker {slot} in {delay}s", timeout=15)
    assert f"worker {slot} (pid" in process.log() and "exited with status 3" in process.log()
    poison.unlink()
    wait_until(lambda: len([p for p, s in serving(process).items() if s == slot]) == 2, 15,
               "the worker serving again once it can", process)
    with process.smtp(timeout=10) as client:
        assert client.sendmail(SENDER, [RECIPIENT], message_of("after-backoff")) == {}
    assert process.terminate(20) == 0


# -- TERM during 200 sessions ----------------------------------------------------------------


def test_term_during_200_sessions_in_data_completes_or_421s_each(server_process):
    raise_fd_limit(2048)
    sessions, shutdown_timeout = 200, 3
    process = server_process(workers=2, shutdown_timeout=shutdown_timeout)
    in_data = []  # clients that have sent half of their message
    all_in_data, go_on = gevent.event.Event(), gevent.event.Event()
    outcomes: dict[str, tuple[int, bytes]] = {}

    def client(n: int) -> None:
        ident = f"term-{n:03d}"
        message = message_of(ident).replace(b"\r\n.", b"\r\n..")
        half = len(message) // 2
        with smtplib.SMTP("127.0.0.1", process.port, local_hostname="term.client.test", timeout=60) as smtp:
            smtp.ehlo()
            assert smtp.mail(SENDER)[0] == 250
            assert smtp.rcpt(RECIPIENT)[0] == 250
            assert smtp.docmd("DATA")[0] == 354
            smtp.send(message[:half])
            in_data.append(ident)
            if len(in_data) == sessions:
                all_in_data.set()
            if n % 2 == 0:  # half of them finish once the server is stopping
                go_on.wait()
                smtp.send(message[half:] + b".\r\n")
            outcomes[ident] = smtp.getreply()  # the others: nothing more; they must get 421
            if outcomes[ident][0] == 250:
                smtp.quit()

    clients = [gevent.spawn(client, n) for n in range(sessions)]
    assert all_in_data.wait(60), f"only {len(in_data)} sessions reached DATA"
    started = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    wait_for_log(process, "stopped accepting: the listeners are closed in every process")
    go_on.set()
    gevent.joinall(clients, timeout=60, raise_error=True)
    assert process.wait(shutdown_timeout + 15) == 0
    assert time.monotonic() - started < shutdown_timeout + 15
    assert len(outcomes) == sessions
    completed = {ident for ident, (code, _) in outcomes.items() if code == 250}
    told_421 = {ident for ident, (code, text) in outcomes.items() if code == 421 and text.startswith(b"4.3.2 ")}
    assert completed | told_421 == set(outcomes), {i: o for i, o in outcomes.items() if o[0] not in (250, 421)}
    assert completed == {f"term-{n:03d}" for n in range(0, sessions, 2)}  # every finisher made it
    delivered = delivered_ids(process.maildir)
    assert sorted(delivered) == sorted(completed)  # each whole (checked), none of the 421s
    assert list((process.maildir / "tmp").iterdir()) == []


# -- HUP under load ----------------------------------------------------------------------------


def test_hup_under_steady_load_refuses_nothing_and_applies_the_new_config(server_process, tmp_path):
    process = server_process(workers=2, banner="generation one", shutdown_timeout=10)
    old_workers = set(serving(process))
    load = Load(process.port, clients=20, tag="hup", per_connection=True)
    try:
        # A steady load for a while first: 20 clients, a new connection for every message.
        began = time.monotonic()
        wait_until(lambda: len(load.accepted) >= 60 and time.monotonic() - began > 1.5, 60,
                   "1.5 s of load", process)
        write_ini(tmp_path, DEFAULT_PLUGINS.replace("domains = example.test", "domains = example.test, new.test"),
                  workers=2, banner="generation two", shutdown_timeout=10)
        process.process.send_signal(signal.SIGHUP)
        wait_for_log(process, "reload complete: every worker runs generation 2", timeout=30)
        after, reloaded = len(load.accepted), time.monotonic()
        wait_until(lambda: len(load.accepted) >= after + 60 and time.monotonic() - reloaded > 1.5, 60,
                   "1.5 s of load after the reload", process)
    finally:
        load.stop()
    assert load.errors == [], f"{len(load.errors)} failure(s) during the reload: {load.errors[:5]}"
    new_workers = set(serving(process, generation=2))
    served_by = {int(pid) for pid, _ in CONNECT.findall(process.log())}
    assert old_workers <= served_by and new_workers <= served_by  # the load went through both
    assert len(new_workers) == 2 and not new_workers & old_workers
    assert sorted(process.worker_pids()) == sorted(new_workers)
    for pid in old_workers:  # the old ones drained and left cleanly
        assert re.search(rf"worker \d \(pid {pid}\) of generation 1 exited with status 0", process.log())
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as raw:
        assert b"generation two" in raw.makefile("rb").readline()
    with process.smtp(timeout=10) as client:
        assert client.sendmail(SENDER, ["alice@new.test"], message_of("new-domain")) == {}
    assert process.terminate(30) == 0
    assert sorted(delivered_ids(process.maildir)) == sorted(load.accepted + ["new-domain"])


def test_hup_with_a_broken_config_keeps_the_running_workers(server_process, tmp_path):
    process = server_process(workers=2, banner="still the first")
    workers = set(serving(process))
    write_ini(tmp_path, DEFAULT_PLUGINS + "[[no_such_plugin]]\n", workers=2, banner="never seen")
    process.process.send_signal(signal.SIGHUP)
    wait_for_log(process, "reload failed, the running workers stay:")
    assert "unknown plugin 'no_such_plugin'" in process.log()
    assert sorted(process.worker_pids()) == sorted(workers)
    with socket.create_connection(("127.0.0.1", process.port), timeout=10) as raw:
        assert b"still the first" in raw.makefile("rb").readline()
    assert process.terminate(20) == 0


# -- limits across workers -----------------------------------------------------------------------


def refusals_until_both_workers(process, expect: bytes, attempts: int = 300) -> dict[int, int]:
    """Open connections from 127.0.0.1 until each worker has refused one: pid -> refusals.

    Which worker accepts a connection is the kernel's choice, so we try until both have.
    """
    workers = set(serving(process))
    refused_by: dict[int, int] = {}
    for _ in range(attempts):
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as raw:
            port = raw.getsockname()[1]
            line = raw.makefile("rb").readline()
        assert line.startswith(expect), line
        wait_until(lambda: port in {int(p) for _, p in CONNECT.findall(process.log())}, 10,
                   f"the session from port {port} in the log", process)
        pid = next(int(pid) for pid, p in CONNECT.findall(process.log()) if int(p) == port)
        refused_by[pid] = refused_by.get(pid, 0) + 1
        if set(refused_by) == workers:
            return refused_by
    raise AssertionError(f"after {attempts} attempts only {refused_by} refused; workers {workers}")


def test_per_address_limit_of_5_holds_across_workers(server_process):
    plugins = "[[hosts_allow]]\n  max_conn_ip = 5\n" + DEFAULT_PLUGINS
    process = server_process(plugins, workers=2)
    held = [process.smtp(timeout=10) for _ in range(5)]
    try:
        for client in held:
            assert client.ehlo()[0] == 250
        ports = {client.sock.getsockname()[1] for client in held}
        wait_until(lambda: ports <= {int(p) for _, p in CONNECT.findall(process.log())}, 10, "5 sessions", process)
        refused_by = refusals_until_both_workers(process, b"421 4.7.0 too many connections from 127.0.0.1")
        assert len(refused_by) == 2
        # A place freed on one worker is free for the whole host.
        held.pop().quit()
        wait_until(lambda: try_greeting(process.port).startswith(b"220 "), 10, "a 5th place again", process)
    finally:
        for client in held:
            client.quit()


def try_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        line = raw.makefile("rb").readline()
        if line.startswith(b"220 "):
            raw.sendall(b"QUIT\r\n")
        return line


def test_max_connections_holds_across_workers(server_process):
    process = server_process(workers=2, max_connections=3)
    held = [process.smtp(timeout=10) for _ in range(3)]
    try:
        for client in held:
            assert client.noop()[0] == 250
        workers = set(serving(process))
        for _ in range(300):
            assert try_greeting(process.port).startswith(b"421 4.3.2 "), "a 4th session got in"
            refusing = {int(pid) for pid in re.findall(r"^\S+ \S+ (\d+) WARNING qpgevent\.server: refused 127\.0\.0\.1",
                                                       process.log(), re.MULTILINE)}
            if refusing == workers:
                break
        assert refusing == workers, f"only {refusing} of {workers} refused"
    finally:
        for client in held:
            client.quit()


# -- start-up failures and privileges --------------------------------------------------------


def run_qpgevent(ini: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpgevent", "-c", str(ini)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


def forks(strace_output: str) -> list[str]:
    """The calls in an ``strace -f`` log that made a new process (not a thread)."""
    return [line for line in strace_output.splitlines()
            if re.search(r"\b(clone3?|v?fork)\(", line) and "CLONE_THREAD" not in line]


def test_a_bad_plugin_fails_the_start_with_exit_2_before_any_fork(tmp_path):
    ini = write_ini(tmp_path, DEFAULT_PLUGINS + "[[no_such_plugin]]\n", workers=2)
    trace = tmp_path / "strace.out"
    result = subprocess.run(["strace", "-f", "-e", "trace=clone,clone3,fork,vfork", "-o", str(trace),
                             sys.executable, "-m", "qpgevent", "-c", str(ini)],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line, and nothing else
    assert line.startswith(f"qpgevent: {ini}:") and "unknown plugin 'no_such_plugin'" in line
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert forks(trace.read_text()) == []  # no worker was ever forked
    # The same config without the bad plugin forks its two workers: the trace sees forks.
    write_ini(tmp_path, DEFAULT_PLUGINS, workers=2)
    traced = subprocess.Popen(["strace", "-f", "-e", "trace=clone,clone3,fork,vfork", "-o", str(trace),
                               sys.executable, "-m", "qpgevent", "-c", str(ini)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ready = None
    try:
        for line in traced.stderr:
            ready = re.search(rb"ready \(pid (\d+)", line)
            if ready:
                break
        assert ready, "the server did not start under strace"
        os.kill(int(ready.group(1)), signal.SIGTERM)  # the master, strace's child
        traced.communicate(timeout=30)
    finally:
        if traced.poll() is None:  # something went wrong: leave no server behind
            for pid in child_pids(traced.pid):
                os.kill(pid, signal.SIGKILL)  # the master; its workers die with it
            traced.kill()
            traced.wait()
    assert traced.returncode == 0
    assert len(forks(trace.read_text())) == 2


def test_serving_as_root_needs_allow_root(tmp_path):
    ini = write_ini(tmp_path, allow_root="no")
    if os.geteuid() != 0:  # not root: nothing to refuse, the server starts
        assert ServerProcess(ini).terminate(20) == 0
        return
    result = run_qpgevent(ini)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line == (f"qpgevent: {ini}:1: [server] user: refusing to serve as root: set user (and group), "
                    "or allow_root = yes if you really mean it")
    assert not (tmp_path / "spool").exists()  # refused before doing anything


@pytest.fixture
def nobody_dir():
    """A folder the user nobody owns (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="qpg-nobody-"))
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def status_ids(pid: int) -> tuple[int, int]:
    """(real uid, real gid) of ``pid``, from /proc/PID/status, after checking all four of each agree."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    uids, gids = fields["Uid"].split(), fields["Gid"].split()
    assert len(set(uids)) == 1 and len(set(gids)) == 1, (uids, gids)  # real, effective, saved, fs
    return int(uids[0]), int(gids[0])


def test_with_user_nobody_every_process_runs_as_nobody(nobody_dir):
    nobody = pwd.getpwnam("nobody")
    pidfile = nobody_dir / "qpgevent.pid"
    ini = write_ini(nobody_dir, user="nobody", allow_root="no", workers=2, pidfile=str(pidfile))
    process = ServerProcess(ini)
    process.maildir = nobody_dir / "Maildir"
    try:
        assert pidfile.read_text() == f"{process.process.pid}\n"
        workers = process.worker_pids()
        assert len(workers) == 2
        expected = (nobody.pw_uid, nobody.pw_gid) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        for pid in [process.process.pid, *workers]:
            assert status_ids(pid) == expected, pid
        with process.smtp(timeout=10) as client:
            assert client.sendmail(SENDER, [RECIPIENT], message_of("as-nobody")) == {}
        (delivered,) = (nobody_dir / "Maildir" / "new").iterdir()
        assert delivered.stat().st_uid == expected[0]
        assert (nobody_dir / "spool" / "tmp").stat().st_uid == expected[0]  # created for nobody
    finally:
        code = process.terminate(20)
    assert code == 0
    assert not pidfile.exists()  # removed at exit

#!/usr/bin/env python3
"""Fuzz the real server over sockets: mutated SMTP sessions against ``python -m qpgevent``.

Usage (run it under gevent, as the tests are):
    python -m gevent.monkey tools/fuzz_server.py [--sessions 3000] [--seed 1] [--concurrency 20]
                                                 [--workers 2] [--deadline 30] [--keep]

The server runs in a child process (2 workers, rcpt_ok + queue/maildir, short timeouts:
``command_timeout`` and ``data_timeout`` 3 s) in a temporary folder. Each session is a
well-formed transaction (EHLO, MAIL, RCPT, DATA, a message with dot lines, QUIT), now and
then pipelined or BDAT-ish or with bare CR/LF, NUL or over-long lines, mutated by one to
four random edits (``qpgevent.testing.fuzz.mutate``) and sent in random pieces, while the
replies are read. At the end it checks:

- no traceback in the server's log, and no worker died (same worker pids throughout);
- no hang: every connection was closed by the server, or answered everything, within
  ``--deadline`` seconds of its last write (the timeouts are 3 s);
- nothing with a bare CR or LF was delivered (every Maildir file is CRLF-only);
- memory is flat: the workers' RSS after the run is within 16 MiB (and 50 %) of what it
  was after the first tenth of the sessions.

Prints the counts (sessions, replies by first digit, messages delivered, bytes sent) and
every problem found; exits 1 if any. 3,000 sessions took 12 s on the 2-core machine
(20 at a time); the test suite runs 60 (tests/hardening/test_fuzz_server.py).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

from qpgevent.testing import ServerProcess, write_ini  # noqa: E402
from qpgevent.testing.fuzz import mutate  # noqa: E402

RSS_SLACK = 16 << 20


def session_script(rng: random.Random, n: int) -> bytes:
    """One transaction, mostly well formed, then mutated."""
    good = [b"line of the body\r\n", b".leading dot\r\n", b"..\r\n", b"\r\n", b"x" * rng.randint(0, 990) + b"\r\n"]
    bad = [b"x" * 1200 + b"\r\n", b"bare\nlf\r\n", b"nul\0\r\n", b"bare\rcr\r\n", b"\n.\n", b"\r.\r\n"]
    body = b"".join(rng.choice(bad if rng.random() < 0.02 else good) for _ in range(rng.randint(0, 30)))
    script = (b"EHLO fuzz%d.example\r\nMAIL FROM:<s%d@client.example>\r\nRCPT TO:<bob@example.test>\r\n"
              b"DATA\r\nSubject: fuzz %d\r\nX-Seq: %d\r\n\r\n" % (n, n, n, n) + body + b".\r\nQUIT\r\n")
    return mutate(rng, script) if rng.random() < 0.6 else script


def run_session(port: int, script: bytes, rng: random.Random, deadline: float, stats: dict) -> str | None:
    """Send ``script`` in pieces while reading; None if the server answered or closed in time."""
    cuts = sorted({rng.randrange(len(script) + 1) for _ in range(rng.randint(0, 8))} | {0, len(script)})
    replies = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=deadline) as sock:
            for a, b in zip(cuts, cuts[1:]):
                try:
                    sock.sendall(script[a:b])
                except OSError:
                    break  # the server closed on us: allowed (421, QUIT, too many errors)
                stats["bytes"] += b - a
            try:
                sock.shutdown(socket.SHUT_WR)  # then every session must end: our QUIT or its timeouts
            except OSError:
                pass  # the server has reset it already (it closed with our input unread)
            started = time.monotonic()
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                replies += chunk
                if time.monotonic() - started > deadline:
                    return f"still talking after {deadline}s"
    except socket.timeout:
        return f"no reply and no close within {deadline}s; replies so far {replies[-200:]!r}"
    for line in replies.split(b"\r\n"):
        if line[:1].isdigit():
            stats[f"{line[:1].decode()}xx replies"] += 1
    return None


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(sessions: int, seed: int, concurrency: int, workers: int, deadline: float, folder: Path) -> tuple[dict, list]:
    rng = random.Random(seed)
    ini = write_ini(folder, workers=workers, command_timeout=3, data_timeout=3, max_message_size=200000,
                    size_threshold=20000)
    server = ServerProcess(ini)
    problems: list[str] = []
    stats: dict = collections.Counter()
    try:
        pids = server.worker_pids()
        pool = Pool(concurrency)
        warm = max(1, sessions // 10)
        baseline: dict[int, int] = {}
        for n in range(sessions):
            if n == warm:
                pool.join()
                baseline = {pid: rss(pid) for pid in pids}
            script = session_script(rng, n)
            session_rng = random.Random(rng.random())

            def one(script: bytes = script, session_rng: random.Random = session_rng, n: int = n) -> None:
                try:
                    problem = run_session(server.port, script, session_rng, deadline, stats)
                except OSError as error:  # connect refused, reset mid-write...: the server's doing
                    problem = f"socket error {error}"
                stats["sessions"] += 1
                if problem:
                    problems.append(f"session {n}: {problem}; script {script[:300]!r}")

            pool.spawn(one)
        pool.join()
        if server.worker_pids() != pids:
            problems.append(f"workers changed: {pids} -> {server.worker_pids()}")
        for pid in pids:
            before, after = baseline.get(pid, 0), rss(pid) if os.path.exists(f"/proc/{pid}") else 0
            stats[f"rss of {pid} (MiB) after warm-up / at the end"] = f"{before >> 20} / {after >> 20}"  # type: ignore[assignment]
            if before and after > before + max(RSS_SLACK, before // 2):
                problems.append(f"worker {pid} RSS grew from {before >> 20} MiB to {after >> 20} MiB")
        log = server.log()
        if "Traceback" in log:
            problems.append("traceback in the log:\n" + log[log.index("Traceback") - 300:][:3000])
        for line in re.findall(r"^.*(?:killed by signal|exited with status).*$", log, re.M):
            problems.append(f"a worker ended: {line}")
        new = folder / "Maildir" / "new"
        for path in sorted(new.iterdir()) if new.is_dir() else []:
            stats["messages delivered"] += 1
            data = path.read_bytes()
            if not data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"):
                problems.append(f"bare CR or LF delivered in {path.name}: {data[:200]!r}")
            if b"\0" in data:
                problems.append(f"NUL delivered in {path.name}")
    finally:
        code = server.terminate(60)
        if code != 0:
            problems.append(f"the server exited with {code}")
    return dict(stats), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (log, Maildir)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="qpg-fuzz-server-"))
    started = time.monotonic()
    try:
        stats, problems = run(args.sessions, args.seed, args.concurrency, args.workers, args.deadline, folder)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    for problem in problems:
        print("PROBLEM", problem, flush=True)
    print(f"done: seed {args.seed}, {time.monotonic() - started:.0f}s, "
          + ", ".join(f"{key} {value}" for key, value in sorted(stats.items())) + f"; {len(problems)} problem(s)"
          + (f"; kept {folder}" if args.keep else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    gevent.get_hub()  # under python -m gevent.monkey, sockets are cooperative
    sys.exit(main())

"""What tools/bench adds around its runs: where they run, the durable anchor, how many rounds, the record.

- Where: the host's own network (default), or a lab network namespace made with
  ``qpgevent.testing.netlab`` (``--netns``): the tool moves itself into it before it starts
  anything, so every server and every smtp-source runs there and talks over that
  namespace's own loopback, as in a container (its own network stack and defaults).
- The durable anchor: a private Postfix (``qpgevent.testing.mta.Postfix``): smtpd, cleanup
  (which fsyncs the queue file before the 250), and virtual(8) delivering into a Maildir.
- Rounds: at least ``--rounds``; up to ``--max-rounds`` while the spread of the ratios is
  still unknown: it is known once the last two rounds' ratios fall inside the range of the
  rounds before them (more rounds then rarely widen it). ``--budget`` seconds cap it.
- The record: ``--quick`` rewrites docs/bench-quick.txt with the date, the commit and the
  result, so that the last guard run is in the repository.

Imports qpgevent's test kit only when a mode needs it (the rest of tools/bench does not).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from benchlib import BenchError

REPO = Path(__file__).resolve().parent.parent
RECIPIENT_USER, DOMAIN = "someone", "example.test"
#: A lab host of its own, addresses from the benchmarking range (unused: the runs use its loopback).
LAB_HOST = {"bench": ("198.18.0.2", "2001:db8::2")}


def _test_kit() -> None:
    """qpgevent's test kit importable: the repository on the path, and its dependencies there."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import gevent  # noqa: F401 - the test kit's first need
    except ImportError:
        raise BenchError(f"Postfix and --netns come from qpgevent's test kit, which needs gevent: "
                                  f"run this tool with the virtualenv's Python ({REPO}/.venv/bin/python "
                                  f"{sys.argv[0]} ...)") from None


@contextlib.contextmanager
def network(netns: bool) -> Iterator[str]:
    """The block runs in the host's network, or in a fresh lab namespace: its description."""
    if not netns:
        yield "the host's network namespace"
        return
    _test_kit()
    from qpgevent.testing.netlab import NetLab

    with NetLab(LAB_HOST, tag="b") as lab, lab.inside("bench"):
        yield f"network namespace {lab.ns('bench')} (its own loopback)"


class PostfixAnchor:
    """A private Postfix taking mail for someone@example.test into a Maildir: the durable anchor."""

    def __init__(self, port: int, connections: int) -> None:
        _test_kit()
        from qpgevent.testing.mta import Postfix

        # One smtpd per connection, as many as the clients open: none waits in the backlog.
        self.postfix = Postfix([f"{RECIPIENT_USER}@{DOMAIN}"], port=port,
                               main={"default_process_limit": str(max(200, connections + 20))})
        self.postfix.start()
        self.process = self.postfix.process
        self.maildir = self.postfix.mail / DOMAIN / RECIPIENT_USER
        self.log_path = self.postfix.maillog

    def stop(self) -> None:
        self.postfix.cleanup()


def spread_known(ratios: list[float]) -> bool:
    """The last two rounds fell inside the range of the rounds before them."""
    if len(ratios) < 4:
        return False
    earlier = ratios[:-2]
    return all(min(earlier) <= ratio <= max(earlier) for ratio in ratios[-2:])


def enough_rounds(done: int, ratios: list[list[float]], args, started: float) -> str | None:
    """Why to stop after ``done`` rounds (None: go on). ``ratios``: each server's, round by round."""
    if done < args.rounds:
        return None
    if done >= args.max_rounds:
        return "maximum rounds" if args.max_rounds > args.rounds else "rounds as asked"
    if all(spread_known(series) for series in ratios):
        return "spread known"
    if args.budget and time.monotonic() - started > args.budget:
        return "time budget spent"
    return None


def ratio_summary(reference: str, name: str, ratios: list[float], why: str) -> str:
    return (f"ratio {reference}/{name}: median {statistics.median(ratios):.3f}, min-max "
            f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds ({why})")


def commit() -> str:
    """The commit the tool runs from, ``+changes`` when the work tree differs from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def write_record(path: Path, argv: list[str], header: str, lines: list[str]) -> None:
    """Rewrite the record of the last quick run: when, which commit, how, and the result."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    text = [f"# tools/bench {' '.join(argv)}", f"# {stamp}, commit {commit()}", header.lstrip("# "), "", *lines]
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("\n".join(text).rstrip("\n") + "\n", encoding="utf-8")
    os.replace(temporary, path)

"""The live scoreboard: every open session of every process, for /status and the terminal.

Each process that serves sessions keeps a ``Scoreboard`` of its live sessions and
publishes a snapshot of it as ``<run_dir>/<pid>.json``: written to a temporary file and
renamed over the old one (atomic: a reader sees the old snapshot or the new, never half
of one), at most every ``interval`` seconds (0.5) and only when it changed. ``read``
merges the snapshots of all the processes that are still alive.

Why a file per process rather than a shared mmap of fixed slots:
- a row holds text of any length (rDNS, HELO, sender), which slots would cut or make
  large, and a slot being rewritten needs a seqlock so that another process never reads
  it half-written; a renamed file gives that for free;
- sessions change often (every command, every plugin call) and readers are rare (a page
  reloading every two seconds): changes only touch memory, and at most two writes a
  second per process (a few milliseconds for a thousand sessions) carry them out;
- a worker that crashes leaves a file whose pid is gone: readers skip it, the master
  removes it; and an operator can look at the files with ``cat``.
The price is that what the page shows is up to ``interval`` old, which a person watching
cannot tell. A reader in the process that owns a board reads that one from memory.

A session is anything with ``status() -> dict`` (``Session.status``): this module knows
nothing of SMTP.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections import Counter
from typing import Any, Protocol

import gevent

log = logging.getLogger("qpgevent.scoreboard")
INTERVAL = 0.5


class Reporting(Protocol):
    def status(self) -> dict[str, Any]: ...


class Scoreboard:
    """This process's live sessions, published to ``directory/<pid>.json``."""

    def __init__(self, directory: str, interval: float = INTERVAL) -> None:
        self.directory = os.path.abspath(directory)
        self.interval = interval
        self.pid = os.getpid()
        self.path = os.path.join(self.directory, f"{self.pid}.json")
        self.started = time.time()
        self.sessions: dict[int, Reporting] = {}  # by id(): sessions need not be hashable
        self._written: bytes | None = None
        self._writer: gevent.Greenlet | None = None

    def add(self, session: Reporting) -> None:
        self.sessions[id(session)] = session

    def discard(self, session: Reporting) -> None:
        self.sessions.pop(id(session), None)

    def snapshot(self) -> dict[str, Any]:
        rows = [session.status() for session in list(self.sessions.values())]
        rows.sort(key=lambda row: row.get("started", 0))
        return {"pid": self.pid, "started": self.started, "sessions": rows}

    def write(self) -> bool:
        """Publish the snapshot if it changed since the last write; True if written."""
        data = json.dumps(self.snapshot(), separators=(",", ":")).encode()
        if data == self._written:
            return False
        temporary = self.path + ".tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, self.path)
        self._written = data
        return True

    def start(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self.write()
        self._writer = gevent.spawn(self._publish)

    def _publish(self) -> None:
        while True:
            gevent.sleep(self.interval)
            try:
                self.write()
            except OSError as error:  # a full disk must not stop the server; say so and retry
                log.warning("cannot write the scoreboard %s: %s", self.path, error)

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.kill()
            self._writer = None
        remove_process(self.directory, self.pid)


_board: Scoreboard | None = None


def publish(directory: str, interval: float = INTERVAL) -> Scoreboard:
    """Start this process's board (a worker after its fork, or the single process)."""
    global _board
    if _board is not None:
        _board.stop()
    _board = Scoreboard(directory, interval)
    _board.start()
    return _board


def unpublish() -> None:
    global _board
    if _board is not None:
        _board.stop()
        _board = None


def active() -> bool:
    """Whether this process publishes a board (sessions then report what they are doing)."""
    return _board is not None


def add(session: Reporting) -> None:
    if _board is not None:
        _board.add(session)


def discard(session: Reporting) -> None:
    if _board is not None:
        _board.discard(session)


def clear(directory: str) -> None:
    """Remove every process's file (the master, at start: a previous run's are stale)."""
    for path in glob.glob(os.path.join(directory, "*.json*")):
        os.remove(path)


def remove_process(directory: str, pid: int) -> None:
    """Remove a process's file: it stopped, or the master reaped it."""
    for path in (os.path.join(directory, f"{pid}.json"), os.path.join(directory, f"{pid}.json.tmp")):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def _snapshots(directory: str) -> list[dict[str, Any]]:
    directory = os.path.abspath(directory)
    own = _board if _board is not None and _board.directory == directory else None
    found = [own.snapshot()] if own is not None else []
    for path in glob.glob(os.path.join(directory, "*.json")):
        name = os.path.basename(path)[:-len(".json")]
        if not name.isdigit() or (own is not None and int(name) == own.pid) or not _alive(int(name)):
            continue
        try:
            with open(path, "rb") as handle:
                found.append(json.loads(handle.read()))
        except (OSError, ValueError):
            continue  # removed between the listing and the reading: its process just ended
    return found


def read(directory: str) -> dict[str, Any]:
    """Every live session of every live process, oldest first, with each one's ``age`` in
    seconds, plus per-process counts and totals."""
    now = time.time()
    processes, sessions = [], []
    for snapshot in _snapshots(directory):
        rows = snapshot.get("sessions", [])
        processes.append({"pid": snapshot["pid"], "started": snapshot.get("started"), "sessions": len(rows)})
        for row in rows:
            sessions.append({**row, "age": round(max(0.0, now - row.get("started", now)), 1)})
    processes.sort(key=lambda process: process["pid"])
    sessions.sort(key=lambda row: row.get("started", 0))
    states = Counter(row.get("state", "?") for row in sessions)
    totals = {"sessions": len(sessions), "processes": len(processes),
              "bytes": sum(row.get("bytes", 0) for row in sessions), "by_state": dict(sorted(states.items()))}
    return {"time": now, "processes": processes, "sessions": sessions, "totals": totals}

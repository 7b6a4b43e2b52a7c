"""Noticing a worker whose event loop is blocked: its heartbeat, and what it says when asked.

A plugin that computes for a minute, or calls blocking C code, stops every session of its
worker: gevent runs nothing else until it returns. The master cannot see that from the
sessions (the worker is alive, its sockets open), so each worker runs one small greenlet
that writes the time into its row of the shared table (``SharedTable.beat``) every
``BEAT`` seconds. A row whose heartbeat is older than ``[server] hung_worker_timeout``
belongs to a blocked worker (``is_hung``, read by the master).

Before killing it, the master sends it SIGUSR2. The handler installed here runs as a
Python signal handler: between two bytecodes of the blocked code (a blocking call such
as ``time.sleep`` is interrupted to run it, then resumes), so it sees the stack that
blocks. It logs the hook and plugin it finds there (``HookRunner._invoke`` holds both),
or the innermost frame. Blocked inside C code that never returns to Python, the handler
cannot run; the master's own line then says the worker did not answer.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any

import gevent

log = logging.getLogger("qpgevent.watchdog")

BEAT = 1.0  #: seconds between heartbeats (the timeout is a whole number of these, at least 2)
REPORT_SIGNAL = signal.SIGUSR2
REPORT_GRACE = 2.0  #: seconds the master waits for the report before SIGKILL


def start(table: Any, row: int, timeout: float) -> gevent.Greenlet | None:
    """In a worker: beat into ``row`` of ``table`` and answer SIGUSR2; None when off (0)."""
    if not timeout:
        return None
    signal.signal(REPORT_SIGNAL, _report)
    interval = min(BEAT, timeout / 4)

    def beat() -> None:
        while True:
            table.beat(row, time.monotonic())
            gevent.sleep(interval)

    return gevent.spawn(beat)


def is_hung(table: Any, row: int, timeout: float, now: float | None = None) -> float:
    """Seconds the worker of ``row`` has not beaten, if more than ``timeout``; else 0."""
    last = table.heartbeat(row)
    if not timeout or not last:
        return 0.0
    late = (time.monotonic() if now is None else now) - last
    return late if late > timeout else 0.0


def where(frame: FrameType | None) -> str:
    """The hook and plugin running in ``frame``'s stack, or where it is."""
    innermost = frame
    while frame is not None:
        names = frame.f_locals
        if frame.f_code.co_name == "_invoke" and "hook" in names and "plugin" in names:
            plugin = names["plugin"]
            return f"hook {names['hook']}, plugin {getattr(plugin, 'name', plugin)}"
        frame = frame.f_back
    if innermost is None:
        return "no Python frame"
    code = innermost.f_code
    return f"outside any hook, in {code.co_name} ({code.co_filename}:{innermost.f_lineno})"


def _report(signum: int, frame: FrameType | None) -> None:
    log.error("worker (pid %d) blocked: its event loop is stuck in %s; the master replaces it",
              os.getpid(), where(frame))

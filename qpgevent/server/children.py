"""The master's records of its children: ``Generation`` and ``Worker``, and what a worker says.

*Workers* talk back over a pipe: ``R`` once serving (after the ``post_fork`` hooks),
``C`` once their listeners are closed (when stopping). EOF means the worker is gone;
the watcher greenlet then reaps it. A worker dies with the master (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import gevent.monkey

from ..config import Settings
from ..plugin import Plugin

#: The real close(2). gevent's patched ``os.close`` defers the close to the next turn of
#: the event loop (so that watchers on the fd can be cancelled first); a pipe end we
#: close before the next fork must be gone before it, or the next worker inherits it
#: and the master never sees EOF when a worker dies. None of these fds has a watcher.
close_now = gevent.monkey.get_original("os", "close")

WORKER_BOOT_ERROR = 3  #: a worker's exit status when it could not start serving
READY, CLOSED = b"R", b"C"  #: what a worker says over its pipe


def worker_count(settings: Settings) -> int:
    """``[server] workers``; 0 means one per CPU core this process may run on."""
    if settings.workers:
        return settings.workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"killed by signal {name}" + (" (core dumped)" if os.WCOREDUMP(status) else "")
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


@dataclasses.dataclass(eq=False)
class Generation:
    """Workers forked from one version of the config: 1 at start, +1 per reload."""

    number: int
    settings: Settings
    plugins: list[Plugin]
    size: int
    slots: dict[int, Worker | None] = dataclasses.field(default_factory=dict)
    failures: dict[int, int] = dataclasses.field(default_factory=dict)  #: quick deaths in a row
    spawn_failures: dict[int, int] = dataclasses.field(default_factory=dict)  #: failed forks in a row
    complete: bool = False  #: no worker of an older generation is left

    def all_ready(self) -> bool:
        return len(self.slots) == self.size and all(w is not None and w.ready for w in self.slots.values())


@dataclasses.dataclass(eq=False)
class Worker:
    """The master's record of one worker process."""

    generation: Generation
    slot: int  #: its number in the generation, kept across respawns
    pid: int
    row: int  #: its row in the shared session table
    started: float = dataclasses.field(default_factory=time.monotonic)
    ready: bool = False
    closed: bool = False  #: has closed its listeners (stopping)
    stopping: bool = False  #: asked to stop: its exit is expected
    hung: bool = False  #: its event loop stopped beating: being replaced

    def __str__(self) -> str:
        return f"worker {self.slot} (pid {self.pid})"


__all__ = ["CLOSED", "READY", "WORKER_BOOT_ERROR", "Generation", "Worker", "close_now", "describe_status",
           "worker_count"]

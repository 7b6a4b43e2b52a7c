"""The hub's worker threads that disk work may hold: all but a few, kept for what never waits on a disk.

gevent's hub has one pool of worker threads (10 at most by default) for everything that would
block the event loop: gevent's resolver runs every ``getaddrinfo`` there (even of 127.0.0.1,
and so every ``socket.create_connection``: a virus scanner's, an ident query's),
auth/flat_file hashes passwords there, dkim signs there. A sick disk (an fsync held for
minutes: a FUSE daemon, a stalled network file system) holds each thread that asked it, and
a burst of deliveries on it took every thread: then nothing else that needs one was served
until the disk let go, not even a session that never writes to it.

So work that may wait on a disk goes through here (``spawn``, ``run_blocking``) and holds at
most all but ``RESERVED`` of the pool's threads at once (as the pool's size is when first
asked). Past that, it waits for one of them to come free, as it would wait for the pool (its
caller's timeout applies meanwhile: queue/maildir answers 4xx), while the reserved threads
go on serving the rest. A thread counts as the disk's from the job's start to its end,
whoever waits for it: a caller that gave up leaves it counted until the disk lets it go.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from gevent.threadpool import ThreadPool

__all__ = ["RESERVED", "run_blocking", "spawn", "outcome"]

#: Threads of the pool that disk work never holds (2 of gevent's default 10).
RESERVED = 2

#: The pool the gate was made for, and the gate: the pool of this process's hub (a forked
#: child's hub has a new one, a thread with a hub of its own another).
_gate_of: tuple[ThreadPool, Semaphore] | None = None


def _gate(pool: ThreadPool) -> Semaphore:
    global _gate_of
    if _gate_of is None or _gate_of[0] is not pool:
        _gate_of = (pool, Semaphore(max(1, pool.maxsize - RESERVED)))
    return _gate_of[1]


def spawn(function: Callable[..., Any], *args: Any) -> AsyncResult:
    """``threadpool.spawn(function, *args)`` once one of the disk's threads is free: the job's
    result, as the pool gives it (what ``function`` raises is printed by the pool: wrap it
    in ``outcome``)."""
    pool = gevent.get_hub().threadpool
    gate = _gate(pool)
    gate.acquire()
    try:
        job = pool.spawn(function, *args)
    except BaseException:  # interrupted waiting for the pool itself: nothing started
        gate.release()
        raise
    job.rawlink(lambda _: gate.release())
    return job


def run_blocking(function: Callable[..., Any], *args: Any) -> Any:
    """``qpgevent.plugin.run_blocking`` for work that may wait on a disk: in one of its threads."""
    failed, value = spawn(outcome, function, args).get()
    if failed:
        raise value
    return value


def outcome(function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    """In a worker thread: (False, what ``function(*args)`` returned) or (True, the Exception it
    raised), which the caller raises; raised, the pool would also print it with a traceback."""
    try:
        return False, function(*args)
    except Exception as error:
        return True, error

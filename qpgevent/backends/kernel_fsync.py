"""fsync without a worker thread: the kernel runs it (Linux AIO) and the event loop hears back.

A Python worker thread hands the GIL back and forth around each of its system calls, and each
hand-over is futex calls in both threads: the trip of one fsync to gevent's threadpool cost
about 30 futex calls per message (docs/benchmarks.md). Linux (4.18 on) runs an fsync handed
to ``io_submit`` (``IOCB_CMD_FSYNC``, ``IOCB_CMD_FDSYNC``) on a kernel worker, the same
``vfs_fsync`` as the system call, and counts its completion on an eventfd the loop watches. So
a greenlet submits (one system call that does not wait for the disk), waits, and is woken
when the disk has the data; no thread of ours takes part, and fsyncs submitted together run
side by side (ext4 commits them in one journal transaction). The system calls are caio's
(``caio.linux_aio``: its ``Context`` is the AIO context and the eventfd, its ``Operation`` one
fsync); this module watches the eventfd from the gevent loop and wakes the waiting greenlets.

``fsync(fd)`` / ``fdatasync(fd)``, from a greenlet: return once the file's data (and, for
fsync, all its metadata) is on disk; raise the ``OSError`` the kernel's fsync returned. Where
Linux AIO is not to be had (another system, a seccomp filter refusing ``io_setup``, the
system's ``fs.aio-max-nr`` used up, a file system without it) or the ring of submissions is
full, the same call runs in a worker thread instead: slower, never less safe. A caller in
another thread than the loop that set the ring up (a worker thread itself) fsyncs right there.

If the waiting greenlet is interrupted (the hook's timeout), the fsync still completes in the
kernel (or the thread), which holds its own reference to the file. The caller may close the
descriptor, but on a sick disk closing or removing the file may wait for that fsync (a FUSE
file system holds the file's lock meanwhile): ``fsync(fd, abandoned)`` spawns the caller's
``abandoned()`` cleanup once the fsync has ended instead (at once if it never started).
"""
from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import AsyncResult

from . import disk_threads

try:
    from caio import linux_aio
except ImportError:  # not Linux, or caio's probe of io_setup was refused
    linux_aio = None  # type: ignore[assignment]

__all__ = ["fsync", "fdatasync", "available"]

_Cleanup = Callable[[], Any] | None  #: what to do with the file once an interrupted fsync has ended

_EVENTS = 1024  #: submissions in flight per process; beyond, a worker thread fsyncs
_BATCH = 64  #: completions taken back per io_getevents
_SYSTEM_CALLS = {"fsync": os.fsync, "fdsync": os.fdatasync}
#: io_submit's refusals that caio raises as SystemError(errno, text) and that mean "no AIO
#: fsync here", not "the disk failed": the thread does it instead. (EAGAIN, a full ring, comes
#: as OverflowError; EINVAL and EBADF as ValueError.)
_UNSUPPORTED = {errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.ENOMEM}
#: caio hands an operation's callback the kernel's result as an unsigned 64-bit number:
#: a failed fsync's -errno arrives as 2**64 - errno.
_FAILED = 2**63


class _Ring:
    """One process's AIO context (caio's, with its eventfd) and the greenlets waiting on it."""

    def __init__(self) -> None:
        self.context = linux_aio.Context(_EVENTS)
        # caio makes its eventfd inheritable: a program this process execs must not get it.
        os.set_inheritable(self.context.fileno, False)
        self.waiting = 0  #: greenlets waiting for their completion
        #: The loop that hears the completions: a greenlet of another loop (another thread's
        #: hub) cannot wait on this one's results, and fsyncs in a thread instead.
        self.loop = gevent.get_hub().loop
        self._watcher = self.loop.io(self.context.fileno, 1)
        self._watcher.start(self._reap)

    def abandon(self) -> None:
        """In a forked child: stop watching the parent's eventfd (the AIO context is not ours)."""
        self._watcher.close()

    def sync(self, fd: int, kind: str, abandoned: _Cleanup) -> None:
        if self.waiting >= _EVENTS:
            return _in_thread(fd, kind, abandoned)
        operation = getattr(linux_aio.Operation, kind)(fd)
        done = AsyncResult()
        operation.set_callback(done.set)
        try:
            if self.context.submit(operation) != 1:
                return _in_thread(fd, kind, abandoned)
        except (OverflowError, ValueError):
            # Refused: the ring is full, or no AIO fsync for this descriptor (a pipe: EINVAL)
            # or no such descriptor (EBADF): the system call runs it or gives fsync's own answer.
            return _in_thread(fd, kind, abandoned)
        except SystemError as refused:
            code = refused.args[0] if refused.args and isinstance(refused.args[0], int) else None
            if code is None:
                raise
            if code in _UNSUPPORTED:
                return _in_thread(fd, kind, abandoned)
            raise OSError(code, os.strerror(code)) from None
        self.waiting += 1
        try:
            result = done.get()
        except BaseException:
            # Interrupted: its completion is still reaped, and set on a result nobody reads.
            _when_done(done, abandoned)
            raise
        finally:
            self.waiting -= 1
        if result >= _FAILED:
            code = 2**64 - result
            raise OSError(code, os.strerror(code))

    def _reap(self) -> None:
        """In the hub: the eventfd counted completions; caio hands each to its waiter."""
        try:
            self.context.poll()
        except BlockingIOError:
            pass  # woken with the counter at 0: still take what has completed (caio's own adapter does)
        while True:
            try:
                taken = self.context.process_events(_BATCH)
            except SystemError as error:
                if error.args[:1] == (errno.EINTR,):
                    continue  # the counter is read: what completed must be taken now, or never
                raise
            if taken < _BATCH:
                return


def _in_thread(fd: int, kind: str, abandoned: _Cleanup = None) -> None:
    if abandoned is None:
        disk_threads.run_blocking(_SYSTEM_CALLS[kind], fd)
        return
    try:
        job = disk_threads.spawn(_error_of, _SYSTEM_CALLS[kind], fd)
    except BaseException:
        gevent.spawn(abandoned)  # interrupted while waiting for a free thread: no fsync started
        raise
    try:
        error = job.get()
    except BaseException:
        _when_done(job, abandoned)
        raise
    if error is not None:
        raise error


def _error_of(call: Callable[[int], None], fd: int) -> OSError | None:
    """In a worker thread: the call's OSError, returned (raised, the pool would print it)."""
    try:
        call(fd)
    except OSError as error:
        return error
    return None


def _when_done(pending: Any, abandoned: _Cleanup) -> None:
    """Spawn ``abandoned()`` once ``pending`` (a completion, a thread's job) is set."""
    if abandoned is not None:
        pending.rawlink(lambda _: gevent.spawn(abandoned))


_UNSET: Any = object()
#: This process's ring, None where AIO is not to be had, _UNSET until first used. A forked
#: child cannot use its parent's AIO context: it sets up its own.
_here: _Ring | None = _UNSET
#: In a forked child, the parent's context if something still holds it (a greenlet waiting on
#: it, or caio itself, which holds an operation and its context until its completion is
#: reaped: never, in the child). Kept for good: caio's context, once let go of, destroys its
#: AIO context by number, and the child's own ring may have been given that same number.
_parents: list[Any] = []


def _forget_the_parents() -> None:
    global _here
    if isinstance(_here, _Ring):
        # The eventfd is the parent's too: a child still watching it would read the parent's
        # completions away (and leave its greenlets waiting for ever).
        _here.abandon()
        context = weakref.ref(_here.context)
        _here = _UNSET  # nothing else holding it: caio closes the eventfd now (io_destroy: EINVAL)
        if context() is not None:
            _parents.append(context())
    _here = _UNSET


os.register_at_fork(after_in_child=_forget_the_parents)


def _ring() -> _Ring | None:
    global _here
    if _here is _UNSET:
        try:
            _here = _Ring() if linux_aio is not None else None
        except (SystemError, OSError):  # io_setup or the eventfd refused
            _here = None
    return _here


def available() -> bool:
    """Whether this process fsyncs through the kernel's AIO (else in worker threads)."""
    return _ring() is not None


def fsync(fd: int, abandoned: _Cleanup = None) -> None:
    """fsync ``fd`` from a greenlet, without a thread where Linux AIO allows; if interrupted,
    ``abandoned()`` is spawned once the fsync has ended."""
    return _sync(fd, "fsync", abandoned)


def fdatasync(fd: int, abandoned: _Cleanup = None) -> None:
    """fdatasync ``fd`` from a greenlet, without a thread where Linux AIO allows."""
    return _sync(fd, "fdsync", abandoned)


def _sync(fd: int, kind: str, abandoned: _Cleanup) -> None:
    ring = _ring()
    if ring is None:
        return _in_thread(fd, kind, abandoned)
    if ring.loop is not gevent.get_hub().loop:
        # Another thread (its completions would be heard by the ring's loop, not this one's).
        return _SYSTEM_CALLS[kind](fd)
    return ring.sync(fd, kind, abandoned)

"""fsync without a worker thread: the kernel runs it (Linux AIO) and the event loop hears back.

A Python worker thread hands the GIL back and forth around each of its system calls, and each
hand-over is futex calls in both threads: the trip of one fsync to gevent's threadpool cost
about 30 futex calls per message (docs/benchmarks.md). Linux (4.18 on) runs an fsync handed
to ``io_submit`` (``IOCB_CMD_FSYNC``, ``IOCB_CMD_FDSYNC``) on a kernel worker, the same
``vfs_fsync`` as the system call, and counts its completion on an eventfd the loop watches. So
a greenlet submits (one system call that does not wait for the disk), waits, and is woken
when the disk has the data; no thread of ours takes part, and fsyncs submitted together run
side by side (ext4 commits them in one journal transaction).

``fsync(fd)`` / ``fdatasync(fd)``, from a greenlet: return once the file's data (and, for
fsync, all its metadata) is on disk; raise the ``OSError`` the kernel's fsync returned. Where
Linux AIO is not to be had (another system, a seccomp filter refusing ``io_setup``, the
system's ``fs.aio-max-nr`` used up, a file system without it) or the ring of submissions is
full, the same call runs in a worker thread instead: slower, never less safe. A caller in
another thread than the loop that set the ring up (a worker thread itself) fsyncs right there.

If the waiting greenlet is interrupted (the hook's timeout), the fsync still completes in the
kernel, which holds its own reference to the file: the caller may close the descriptor.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
from typing import Any

import gevent
from gevent.event import AsyncResult

from ..plugin import run_blocking

__all__ = ["fsync", "fdatasync", "available"]

_EVENTS = 1024  #: submissions in flight per process; beyond, a worker thread fsyncs
_CMD_FSYNC, _CMD_FDSYNC = 2, 3
_FLAG_RESFD = 1
_SYSTEM_CALLS = {_CMD_FSYNC: os.fsync, _CMD_FDSYNC: os.fdatasync}
#: x86-64 and aarch64 numbers of io_setup, io_submit, io_getevents (the generic table's on arm64).
_SYSCALLS = {"x86_64": (206, 209, 208), "aarch64": (0, 2, 4)}
#: Refusals that mean "no AIO fsync here", not "the disk failed": the thread does it instead.
_UNSUPPORTED = {errno.EAGAIN, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP, errno.ENOMEM}


class _Iocb(ctypes.Structure):
    """``struct iocb`` of <linux/aio_abi.h> (little-endian layout)."""
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    """``struct io_event``."""
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("seconds", ctypes.c_long), ("nanoseconds", ctypes.c_long)]


class _Ring:
    """One process's AIO context, its eventfd, and the greenlets waiting on it."""

    def __init__(self, numbers: tuple[int, int, int]) -> None:
        self._setup, self._submit, self._getevents = numbers
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._context = ctypes.c_ulong(0)
        if self._libc.syscall(self._setup, _EVENTS, ctypes.byref(self._context)) != 0:
            raise OSError(ctypes.get_errno(), "io_setup")
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # One iocb, reused: the kernel copies it in io_submit.
        self._iocb = _Iocb(flags=_FLAG_RESFD, resfd=self._eventfd)
        self._list = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(self._iocb))
        self._events = (_Event * 64)()
        self._now = _Timespec(0, 0)  # io_getevents takes what has completed, never waits
        self._waiting: dict[int, AsyncResult] = {}
        self._ids = itertools.count(1)
        #: The loop that hears the completions: a greenlet of another loop (another thread's
        #: hub) cannot wait on this one's results, and fsyncs in a thread instead.
        self.loop = gevent.get_hub().loop
        self._watcher = self.loop.io(self._eventfd, 1)
        self._watcher.start(self._reap)

    def abandon(self) -> None:
        """In a forked child: let go of the parent's eventfd (the AIO context is not ours)."""
        self._watcher.stop()
        os.close(self._eventfd)

    def sync(self, fd: int, opcode: int) -> None:
        if len(self._waiting) >= _EVENTS:
            return _in_thread(fd, opcode)
        key = next(self._ids)
        self._iocb.data, self._iocb.opcode, self._iocb.fildes = key, opcode, fd
        if self._libc.syscall(self._submit, self._context, 1, self._list) != 1:
            error = ctypes.get_errno()
            if error in _UNSUPPORTED:
                return _in_thread(fd, opcode)
            raise OSError(error, os.strerror(error))
        done = self._waiting[key] = AsyncResult()
        try:
            done.get()
        finally:
            # Interrupted: forget it (its completion is still reaped, and dropped).
            self._waiting.pop(key, None)

    def _reap(self) -> None:
        """In the hub: the eventfd counted completions; hand each to its waiter."""
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            return
        while True:
            count = self._libc.syscall(self._getevents, self._context, 0, len(self._events), self._events,
                                       ctypes.byref(self._now))
            if count < 0 and ctypes.get_errno() == errno.EINTR:
                continue  # the counter is read: what completed must be taken now, or never
            if count <= 0:
                return
            for event in self._events[:count]:
                waiter = self._waiting.pop(event.data, None)
                if waiter is None:
                    continue
                if event.res < 0:
                    waiter.set_exception(OSError(-event.res, os.strerror(-event.res)))
                else:
                    waiter.set(None)
            if count < len(self._events):
                return


def _in_thread(fd: int, opcode: int) -> None:
    run_blocking(_SYSTEM_CALLS[opcode], fd)


_UNSET: Any = object()
#: This process's ring, None where AIO is not to be had, _UNSET until first used. A forked
#: child cannot use its parent's AIO context: it sets up its own.
_here: _Ring | None = _UNSET


def _forget_the_parents() -> None:
    global _here
    if _here is not None and _here is not _UNSET:
        # The eventfd is the parent's too: a child still watching it would read the parent's
        # completions away (and leave its greenlets waiting for ever).
        _here.abandon()
    _here = _UNSET


os.register_at_fork(after_in_child=_forget_the_parents)


def _ring() -> _Ring | None:
    global _here
    if _here is _UNSET:
        numbers = _SYSCALLS.get(os.uname().machine)
        try:
            _here = _Ring(numbers) if numbers and hasattr(os, "eventfd") else None
        except OSError:
            _here = None
    return _here


def available() -> bool:
    """Whether this process fsyncs through the kernel's AIO (else in worker threads)."""
    return _ring() is not None


def fsync(fd: int) -> None:
    """fsync ``fd`` from a greenlet, without a thread where Linux AIO allows."""
    return _sync(fd, _CMD_FSYNC)


def fdatasync(fd: int) -> None:
    """fdatasync ``fd`` from a greenlet, without a thread where Linux AIO allows."""
    return _sync(fd, _CMD_FDSYNC)


def _sync(fd: int, opcode: int) -> None:
    ring = _ring()
    if ring is None:
        return _in_thread(fd, opcode)
    if ring.loop is not gevent.get_hub().loop:
        # Another thread (its completions would be heard by the ring's loop, not this one's).
        return _SYSTEM_CALLS[opcode](fd)
    return ring.sync(fd, opcode)

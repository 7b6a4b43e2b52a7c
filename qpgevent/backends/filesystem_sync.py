"""One syncfs for the new files and folders that finish together: a group commit per file system.

A new file survives a crash once its data, its inode and its entry in its folder are on disk.
Its fsync writes them and then flushes the disk's cache, and on an ext4 without a journal the
fsyncs handed to the kernel together mostly do not share that flush: about one flush and four
write requests per message (docs/benchmarks.md, "Durable at speed, round three"). ``syncfs``
writes every file of the file system waiting to be written, their inodes and folders, and
flushes once: the files that finish in the same loop tick can share it.

From a greenlet, ``FileSystemSync.sync_file(fd, abandoned)`` right after the file is written,
and ``sync_folders(folders)`` after renaming into them: return once that is on disk (raise the
``OSError`` otherwise), as ``disk.fsync_file`` and ``FolderSync.fsync`` do. What joins in the
same loop tick forms one batch per file system; while its sync runs, the next batch gathers,
and starts when it returns and the callers it woke have gone on: a message whose file is now on
disk is renamed, and its folder joins the next batch with the files written meanwhile. So one
syncfs covers one batch's new entries and the next batch's files. A batch of one file or one
folder (however many callers renamed into it) is fsynced by the kernel (AIO, no thread). A
batch of several is given one ``syncfs`` in one of the disk's worker threads, where:

- the file system is one whose syncfs writes and flushes what fsync would (ext4, XFS, btrfs;
  ``SYNCFS_TYPES``). Elsewhere (a network file system; FUSE, whose daemon may not implement it)
  each file is fsynced as it joins, as before, and a batch's folders once each;
- Linux is 5.8 or later: before, syncfs did not report a failed write (it returned 0, and a
  250 would have followed for a message not on disk);
- little else waits to be written (the system's ``Dirty`` and ``Writeback`` under
  ``DIRTY_LIMIT``): syncfs writes others' files on its file system too, and the batch would
  wait for them. Linux counts these for the whole system, not per file system, so a machine
  writing much elsewhere turns batches back to fsyncs too (and so does a system whose
  ``/proc/meminfo`` cannot be read): each file and folder of the batch is then fsynced on its
  own, side by side, as before.

A failed write. syncfs reports a write error of any file of the file system since the
descriptor it is called on was opened (the file system's error counter: each open file keeps
its own place in it). It is called on the batch's first descriptor. A file joins right after
it is opened and written, without yielding, so every file of the batch was opened after that
descriptor: an error writing any of them is reported. A folder is opened after the renames
into it, as for an fsync of the folder. Every caller of a batch whose syncfs failed gets the
error: one in another program's file fails the batch too, a 4xx too many, never a 250 too many.

A caller interrupted while its batch's sync runs (the hook's timeout) goes on at once; its
``abandoned()`` cleanup (close and remove its file) is spawned once the sync has ended, as
``kernel_fsync`` does: on a sick disk, closing a file being written back may wait for it.
A folder's descriptor is closed then too.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import gevent
from gevent import monkey
from gevent.event import AsyncResult

from . import disk_threads, kernel_fsync

__all__ = ["DIRTY_LIMIT", "SYNCFS_TYPES", "FileSystemSync", "close_file", "filesystem_type", "syncfs_reports_errors"]

#: ``os.close`` for a regular file or a folder. Monkey-patched, ``os.close`` is gevent's, which
#: first asks ``fcntl`` and ``fstat`` whether the descriptor is one the loop may watch (a
#: socket, a pipe): two system calls per close that a file or folder never needs.
close_file = monkey.get_original("os", "close")

#: statfs's f_type of the file systems whose syncfs writes and flushes what fsync would
#: (linux/magic.h): ext2/3/4, XFS, btrfs.
SYNCFS_TYPES = frozenset({0xEF53, 0x58465342, 0x9123683E})
#: Octets waiting to be written on the whole system (``/proc/meminfo``'s Dirty + Writeback)
#: above which a batch is fsynced file by file: a syncfs would write them too, and at a
#: virtual disk's 100 MB/s, 64 MiB is most of a second.
DIRTY_LIMIT = 64 * 1024 * 1024

_Cleanup = Callable[[], Any] | None


def syncfs_reports_errors(release: str | None = None) -> bool:
    """Whether this kernel's syncfs returns a failed write's error: Linux 5.8 and later."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        major, minor = (int(part) for part in (os.uname().release if release is None else release).split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def waiting_to_be_written() -> int:
    """Octets of the whole system waiting to be written to disk (Dirty + Writeback), from /proc."""
    total = 0
    with open("/proc/meminfo", "rb") as meminfo:
        for line in meminfo:
            if line.startswith((b"Dirty:", b"Writeback:")):
                total += int(line.split()[1]) * 1024
    return total


def _little_waiting() -> bool:
    """Whether what waits to be written is under ``DIRTY_LIMIT``; not known (no /proc): no."""
    try:
        return waiting_to_be_written() < DIRTY_LIMIT
    except (OSError, ValueError):
        return False


class FileSystemSync:
    """The group commit of new files' syncs for one plugin instance (in one worker process)."""

    def __init__(self, share: bool = True) -> None:
        #: Whether batches may share a syncfs at all (else every file is fsynced on its own).
        self.share = share and syncfs_reports_errors()
        self._batches: dict[int, _Device] = {}  # per file system (st_dev): gathering or running
        self._shares: dict[int, bool] = {}  # per file system: of a type whose syncfs we trust

    def sync_file(self, fd: int, abandoned: _Cleanup = None) -> None:
        """Return once the open file ``fd`` is on disk (shared with the files joining alongside)."""
        status = os.fstat(fd)
        if not (self.share and self._may_share(status.st_dev, fd)):
            kernel_fsync.fsync(fd, abandoned)  # as ever: no batch to wait for
            return
        done = self._join(fd, status)
        try:
            done.get()
        except BaseException as error:
            if abandoned is not None and error is not done.exception:
                # Interrupted (not failed): clean up once the sync is over with the file.
                if done.ready():
                    gevent.spawn(abandoned)
                else:
                    done.rawlink(lambda _: gevent.spawn(abandoned))
            raise

    def sync_folders(self, folders: Iterable[str]) -> None:
        """Return once the entries made in each folder are on disk; raise the OSError of one that
        failed. Shared as ``sync_file`` is: with the files and folders joining alongside (where
        no syncfs is to be had, each folder is fsynced once for all who joined with it)."""
        waits: list[tuple[int, AsyncResult]] = []
        try:
            # Join every folder's batch first, so that one sync covers them all.
            for folder in dict.fromkeys(folders):
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    status = os.fstat(fd)
                    self._may_share(status.st_dev, fd)
                except BaseException:
                    close_file(fd)
                    raise
                waits.append((fd, self._join(fd, status)))
            for _, done in waits:
                done.get()
        finally:
            # Interrupted, a folder's descriptor stays open until its sync is over with it
            # (closed before, its number could be another file's by the time the sync starts).
            for fd, done in waits:
                if done.ready():
                    close_file(fd)
                else:
                    done.rawlink(lambda _, fd=fd: close_file(fd))

    def _join(self, fd: int, status: os.stat_result) -> AsyncResult:
        state = self._batches.get(status.st_dev)
        if state is None:
            state = self._batches[status.st_dev] = _Device()
        done = AsyncResult()
        state.next.append(_Entry(fd, status.st_ino, done))
        if state.committer is None:
            # spawn() starts it at the end of this loop tick: the files written by the
            # sessions woken with this one join the same batch on the way.
            state.committer = gevent.spawn(self._commit, status.st_dev, state)
        return done

    def _commit(self, device: int, state: _Device) -> None:
        batch: list[_Entry] = []
        try:
            while state.next:
                batch, state.next = state.next, []
                _sync(batch, self.share and self._shares[device])
                # Let the sessions just woken go on first: a message whose file is now on disk
                # is renamed into new/, and that folder joins the next sync (with the files
                # written meanwhile) instead of waiting one more sync for it.
                gevent.sleep(0)
        except BaseException as error:  # killed: no one may wait forever for a sync
            for entry in batch + state.next:
                if not entry.done.ready():
                    entry.done.set_exception(error)
            raise
        finally:
            # No switch since the loop saw no one waiting: the next caller starts a new committer.
            del self._batches[device]

    def _may_share(self, device: int, fd: int) -> bool:
        """Whether the file system ``device`` (``fd`` is on it) is one whose syncfs we trust."""
        shares = self._shares.get(device)
        if shares is None:
            try:
                shares = filesystem_type(fd) in SYNCFS_TYPES
            except OSError:
                shares = False  # cannot be asked: fsync each file, never less safe
            self._shares[device] = shares
        return shares


class _Entry(NamedTuple):
    """A file or folder of a batch: its descriptor, its inode, its caller's outcome."""
    fd: int
    inode: int
    done: AsyncResult


def _sync(batch: list[_Entry], syncfs_trusted: bool) -> None:
    """Sync a batch's files and folders: one syncfs for all, or each its own fsync (a folder
    that several sessions renamed into, once for them all); each caller told its outcome."""
    same: dict[int, list[_Entry]] = {}
    for entry in batch:
        same.setdefault(entry.inode, []).append(entry)
    if len(same) > 1 and syncfs_trusted and _little_waiting():
        # A copy of the first file's descriptor: its caller may close its own meanwhile
        # (interrupted), and the copy keeps the place in the error counter it was opened with.
        first = os.dup(batch[0].fd)
        try:
            _tell(batch, _error_of(disk_threads.run_blocking, _syncfs, first))
        finally:
            close_file(first)
        return
    # One file, or no syncfs to share: each fsynced by the kernel, side by side.
    gevent.joinall([gevent.spawn(_fsync_one, entries) for entries in same.values()])


def _fsync_one(entries: list[_Entry]) -> None:
    """fsync one file (or folder) for every caller that asked for it."""
    _tell(entries, _error_of(kernel_fsync.fsync, entries[0].fd))


def _error_of(call: Callable[..., Any], *args: Any) -> OSError | None:
    try:
        call(*args)
    except OSError as error:
        return error
    return None


def _tell(entries: list[_Entry], error: OSError | None) -> None:
    """Give each caller of a sync its outcome: done, or the sync's error raised."""
    for entry in entries:
        if error is None:
            entry.done.set(None)
        else:
            entry.done.set_exception(error)


class _Device:
    __slots__ = ("next", "committer")

    def __init__(self) -> None:
        self.next: list[_Entry] = []  # the batch gathering
        self.committer: gevent.Greenlet | None = None


_libc = ctypes.CDLL(None, use_errno=True)


class _StatFs(ctypes.Structure):
    # Linux's struct statfs begins with f_type, a long (an unsigned int on s390x); the rest,
    # up to 120 octets, is room we do not read.
    _fields_ = [("f_type", ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long),
                ("rest", ctypes.c_char * 256)]


def filesystem_type(file: int | str) -> int:
    """statfs's ``f_type`` (linux/magic.h) of an open descriptor or a path; its OSError if the
    file system cannot be asked. ``os.statvfs`` has no such field, hence ctypes. Linux only."""
    answer = _StatFs()
    if isinstance(file, int):
        failed = _libc.fstatfs(file, ctypes.byref(answer)) != 0
    else:
        failed = _libc.statfs(os.fsencode(file), ctypes.byref(answer)) != 0
    if failed:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), None if isinstance(file, int) else file)
    return int(answer.f_type) & 0xFFFFFFFF


def _syncfs(fd: int) -> None:
    """In a worker thread: syncfs the file system of ``fd``; raise its error."""
    if _libc.syncfs(fd) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))

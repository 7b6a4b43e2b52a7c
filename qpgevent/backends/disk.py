"""Durable disk writes for plugins: one fsync of a folder shared by every session that needs it.

A file renamed into a folder survives a crash only once the folder itself has been fsynced,
and one fsync covers every entry made in the folder before it began. So the sessions that
finish together need not pay one fsync each (group commit). Two ways in, both called after
the caller's entries are made:

- ``FolderSync.fsync_if_alone(folder)``, in the worker thread that made the entries: when
  nobody else is fsyncing that folder or gathering to, fsync it right there and say so. A
  lone session pays what it always paid: one trip to a worker thread, no waiting, no timer.
- ``FolderSync.fsync(folders)``, from the session's greenlet, for the folders that were not
  done alone: join the next shared fsync of each folder and return when it has completed.
  Nobody's fsync gathering: one starts at once (``fsync_file``), once the sessions woken
  in the same loop tick have joined. An fsync running: new callers gather into the next one,
  which starts as soon as the running one returns. A burst of N sessions costs a few fsyncs.

A failed fsync raises its ``OSError`` in every caller it was to cover (each then takes its
entries back and answers 4xx); the next batch tries again.

``fsync_file(fd, abandoned)``, from a greenlet: fsync a file through the kernel's AIO where
Linux allows (``kernel_fsync``: no worker thread, whose GIL hand-overs cost more CPU than the
fsync), in a worker thread elsewhere; ``without_threads()`` says which. A caller interrupted
meanwhile leaves its cleanup (``abandoned``) to run once the kernel is done with the file.

``run_blocking_undoable(function, undo, *args)`` is ``run_blocking`` for work that must be
taken back when its caller gives up on it (the hook's timeout): the thread cannot be stopped.
The work calls ``point_of_no_return()`` just before the first step others may see (a rename
into ``new/``). A caller that gives up before it goes on at once, and the work stops there
(``Abandoned``), having cleaned up after itself; a caller that gives up after it waits for the
work to end and for ``undo(result)``, so that its 4xx is never sent while the work can be seen.
Work that never calls it is taken back (``undo``) once it has finished, unwaited.

Work that may wait on the disk (``run_blocking_undoable``, ``run_blocking`` here, the fsyncs
in worker threads) holds at most ``disk_threads``' share of the hub's worker threads: a sick
disk holding them all would stall what never writes to it (gevent's resolver, password hashes).

``on_fuse(folder)``: whether the folder is on a FUSE file system (fuse-overlayfs, on which
rootless containers often run; sshfs; virtiofs). There the kernel holds a folder's lock while
its fsync runs (``fuse_dir_fsync``), so a create in it or a rename into it waits for that
fsync, however sick the disk: work that may meet such a wait belongs in a worker thread, never
in the event loop, where it would stall every session of the process (ext4 fsyncs without
that lock). One ``statfs`` per call: ask once per folder.

``FileSystemSync`` (``filesystem_sync``): the group commit per file system, of new files
(``sync_file(fd)``) and of the folders renamed into (``sync_folders``): one ``syncfs`` for
what finishes together where the file system allows it, fsyncs elsewhere.

Used by queue/maildir for its files and its ``new/`` folders; any plugin that renames files
into place can use it the same way.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

from typing import Any

import gevent
from gevent import monkey
from gevent.event import AsyncResult

from . import disk_threads, kernel_fsync
from .disk_threads import outcome as _outcome
from .filesystem_sync import FileSystemSync, close_file, filesystem_type

__all__ = ["Abandoned", "FileSystemSync", "FolderSync", "close_file", "fsync_file", "fsync_folder", "on_fuse",
           "point_of_no_return", "run_blocking", "run_blocking_undoable", "without_threads"]

#: ``run_blocking`` for work that may wait on the disk: it never holds the threads that
#: ``disk_threads`` keeps for the rest (name look-ups, password hashes).
run_blocking = disk_threads.run_blocking

#: A lock of the operating system (gevent's would switch greenlets): worker threads take it.
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
#: Per worker thread (the operating system's, not gevent's greenlet-local): the job it runs.
_job = monkey.get_original("_thread", "_local")()


class FolderSync:
    """The group commit of folder fsyncs for one plugin instance (in one worker process)."""

    def __init__(self) -> None:
        self._folders: dict[str, _Folder] = {}  # the shared fsyncs, gathering or running (hub side)
        self._alone: set[str] = set()  # folders a worker thread is fsyncing on its own
        self._lock = _allocate_lock()

    def fsync_if_alone(self, folder: str) -> bool:
        """In a worker thread: fsync ``folder`` now if no one else is at it (True), else False."""
        with self._lock:  # held for a set look-up, never during an fsync
            if folder in self._alone or folder in self._folders:
                return False  # others finish now too: share the next fsync with them
            self._alone.add(folder)
        try:
            fsync_folder(folder)
        finally:
            with self._lock:
                self._alone.discard(folder)
        return True

    def fsync(self, folders: Iterable[str]) -> None:
        """Return once each folder has been fsynced after this call; raise the OSError of one that failed."""
        # Join every folder's batch first, so that they are fsynced side by side.
        batches = [self._join(folder) for folder in dict.fromkeys(folders)]
        for batch in batches:
            batch.get()

    def _join(self, folder: str) -> AsyncResult:
        state = self._folders.get(folder)
        if state is None:
            state = self._folders[folder] = _Folder(folder)
        if state.next is None:
            state.next = AsyncResult()
        if state.committer is None:
            # spawn() starts it at the end of this loop tick: the sessions woken with this one
            # join the same batch on the way.
            state.committer = gevent.spawn(self._commit, state)
        return state.next

    def _commit(self, state: _Folder) -> None:
        batch = None
        try:
            while state.next is not None:
                batch, state.next = state.next, None
                try:
                    _fsync_folder_in_loop(state.folder)
                except OSError as error:
                    batch.set_exception(error)
                else:
                    batch.set(None)
        except BaseException as error:  # killed: no one may wait forever for an fsync
            for waiting in (batch, state.next):
                if waiting is not None and not waiting.ready():
                    waiting.set_exception(error)
            raise
        finally:
            # No switch since the loop saw no one waiting: the next caller starts a new committer.
            del self._folders[state.folder]


class _Folder:
    __slots__ = ("folder", "next", "committer")

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.next: AsyncResult | None = None  # the batch gathering for the next fsync
        self.committer: gevent.Greenlet | None = None


class Abandoned(Exception):
    """Raised in the worker thread by ``point_of_no_return()``: its caller has given up."""


class _Commitment:
    """Whether an undoable job has passed its point of no return, or its caller gave up first."""

    def __init__(self) -> None:
        self._lock = _allocate_lock()  # held for a flag, never during I/O (the loop's thread takes it)
        self.committed = self.abandoned = False

    def commit(self) -> None:
        with self._lock:
            if self.abandoned:
                raise Abandoned("the caller gave up")
            self.committed = True

    def abandon(self) -> bool:
        """Give up on the job: True if it had not passed its point of no return (it stops there)."""
        with self._lock:
            self.abandoned = not self.committed
            return self.abandoned


def point_of_no_return() -> None:
    """In the work of ``run_blocking_undoable``, before the first step others may see: raise
    ``Abandoned`` if the caller has given up (stop, clean up: nothing will be undone); else, from
    here on, a caller that gives up waits for the work and its undo. Elsewhere: nothing."""
    commitment = getattr(_job, "commitment", None)
    if commitment is not None:
        commitment.commit()


def run_blocking_undoable(function: Callable[..., Any], undo: Callable[[Any], Any], *args: Any) -> Any:
    """``run_blocking(function, *args)``; a caller interrupted first never leaves its work seen.

    Interrupted before the work's ``point_of_no_return()``: the work stops there, and the
    interruption goes on at once. After it: the interruption waits until the work has ended
    and ``undo(result)`` has run. Work that never calls it: ``undo(result)`` once it returns.
    As in ``run_blocking``, what ``function`` raises is raised in the caller only: the pool's
    own handler would print it with a traceback (a full disk is an answer, not a crash).
    """
    commitment = _Commitment()
    job = disk_threads.spawn(_committing, commitment, function, args)
    try:
        failed, value = job.get()
    except BaseException:
        if not commitment.abandon():
            # Past its point of no return (a file renamed into new/): the caller's 4xx must not
            # go out while that can be seen, or a crash before the undo, and the client's
            # retry, deliver it twice. So the caller waits for the disk, however sick.
            try:
                failed, value = job.get()
                if not failed:
                    disk_threads.spawn(_outcome, undo, (value,)).get()
            except BaseException:  # interrupted again (the server stopping): undo when done
                _undo_when_done(job, undo)
                raise
            raise
        _undo_when_done(job, undo)
        raise
    if failed:
        raise value
    return value


def _undo_when_done(job: Any, undo: Callable[[Any], Any]) -> None:
    def take_back(done: Any) -> None:
        # A greenlet of its own waits for a thread: a link runs in the hub, where nothing
        # may wait, not even for a free thread of a busy pool (the undo was lost there).
        if done.successful() and not done.value[0]:
            gevent.spawn(_apply, undo, done.value[1])

    # The job may have ended in the same turn of the loop as the interruption: then it
    # is done already, and what it delivered is taken back all the same.
    if job.ready():
        take_back(job)
    else:
        job.rawlink(take_back)


def _committing(commitment: _Commitment, function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[bool, Any]:
    if commitment.abandoned:
        # Its caller gave up before a thread took the job: not a byte written (on a sick
        # disk, the write and its fsync would hold this thread for nothing).
        return True, Abandoned("the caller gave up before it started")
    _job.commitment = commitment
    try:
        return _outcome(function, args)
    finally:
        _job.commitment = None


def _apply(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in one of the disk's threads; what it raises is raised (and printed)."""
    return disk_threads.spawn(function, *args).get()


def fsync_file(fd: int, abandoned: Callable[[], Any] | None = None) -> None:
    """From a greenlet: fsync ``fd``, through the kernel's AIO where it can (no thread).

    ``abandoned``: the caller's cleanup of the file (close it, remove it) should it be
    interrupted (the hook's timeout) while the fsync runs; it is spawned once that fsync has
    ended, not before: on a sick disk, closing or removing a file whose fsync runs may wait
    for it (a FUSE file system holds the file's lock, and an unlink the folder's meanwhile).
    """
    kernel_fsync.fsync(fd, abandoned)


def without_threads() -> bool:
    """Whether ``fsync_file`` and the shared folder fsyncs run without worker threads here."""
    return kernel_fsync.available()


def _fsync_folder_in_loop(folder: str) -> None:
    """From a greenlet: ``fsync_folder``, the fsync through ``fsync_file``."""
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync_file(directory)
    finally:
        close_file(directory)


def fsync_folder(folder: str) -> None:
    """fsync a folder: the entries made in it last through a crash."""
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        close_file(directory)


#: statfs's f_type of every FUSE mount (fuse, fuseblk, fuse.<subtype>, virtiofs): linux/magic.h.
FUSE_SUPER_MAGIC = 0x65735546


def on_fuse(folder: str) -> bool:
    """Whether ``folder`` (or, not made yet, the folder it would be made in) is on FUSE.

    statfs's ``f_type`` says it (``filesystem_sync.filesystem_type``). A folder
    whose file system cannot be asked (the call refused, the mount's daemon gone) counts as
    FUSE: the worker thread is never less safe, only slower. Linux only: elsewhere, False.
    """
    if not sys.platform.startswith("linux"):
        return False
    path = os.path.abspath(folder)
    while True:
        try:
            return filesystem_type(path) == FUSE_SUPER_MAGIC
        except FileNotFoundError:
            if os.path.dirname(path) == path:
                return True
            path = os.path.dirname(path)
        except OSError:
            return True

"""Durable disk writes for plugins: one fsync of a folder shared by every session that needs it.

A file renamed into a folder survives a crash only once the folder itself has been fsynced,
and one fsync covers every entry made in the folder before it began. So the sessions that
finish together need not pay one fsync each (group commit):

- ``FolderSync.fsync(folders)`` joins the next fsync of each folder and returns when it has
  completed. The caller makes its entries first, so that fsync covers them.
- Nobody's fsync running: one starts at once, in a worker thread, once the sessions woken in
  the same loop tick have joined it. A lone session waits for no timer and no one else.
- An fsync running: new callers gather into the next one, which starts as soon as the running
  one returns. A burst of N sessions costs a few fsyncs, not N.
- A failed fsync raises its ``OSError`` in every caller it was to cover (each then takes its
  entries back and answers 4xx); the next batch tries again.

Used by queue/maildir for its ``new/`` folders; any plugin that renames files into place
can use it the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import gevent
from gevent.event import AsyncResult

from ..plugin import run_blocking

__all__ = ["FolderSync", "fsync_folder"]


class FolderSync:
    """The group commit of folder fsyncs for one plugin instance (in one worker process)."""

    def __init__(self) -> None:
        self._folders: dict[str, _Folder] = {}

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
                    run_blocking(fsync_folder, state.folder)
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


def fsync_folder(folder: str) -> None:
    """fsync a folder: the entries made in it last through a crash."""
    directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)

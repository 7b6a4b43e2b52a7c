"""Maildir files for queue/maildir: the folders, the file names, a message file, taking one back.

What a delivery does to a Maildir, file by file; queue/maildir decides which Maildirs, in
which thread, and what the client hears. ``make(root)``: ``tmp/``, ``new/`` and ``cur/``.
``unique_name(host)``: a file name unique on this host (the Maildir convention: time, pid,
a counter, the host). ``safe_part(text)``: one path component no address can turn into a
way out of the root. ``write(path, transaction, prefix, fsync)``: the message file,
``Return-Path`` first, removed again if the write fails. ``take_back(delivered)``: remove
what was delivered to the first recipients when the client will hear 4xx after all, and
fsync the folders so that a crash cannot bring it back. ``remove_stale_tmp(tmp)``: the
left-overs of a crash, older than 36 hours.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import time
from typing import Any

from . import disk

__all__ = ["close_and_remove", "make", "remove", "remove_stale_tmp", "safe_part", "take_back", "this_host",
           "unique_name", "write"]

log = logging.getLogger("qpgevent.plugin.queue/maildir")
STALE_TMP_SECONDS = 36 * 3600
_deliveries = itertools.count(1)
_UNSAFE = re.compile(r"[^a-z0-9.\-_+=]")


def make(root: str) -> None:
    """Make the Maildir ``root`` (its three folders), if it is not there yet."""
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)


def this_host() -> str:
    """The host name as a Maildir file name may hold it (``/`` and ``:`` escaped)."""
    return socket.gethostname().replace("/", "\\057").replace(":", "\\072")


def unique_name(host: str) -> str:
    """The Maildir naming convention: time, then what makes it unique on this host."""
    now = time.time()
    seconds, micros = int(now), int((now % 1) * 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_deliveries)}.{host}"


def safe_part(part: str) -> str:
    """One path component that can only name a folder under the root."""
    part = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8")), part)
    return "%2E" + part[1:] if part.startswith(".") else (part or "%00")


def write(path: str, transaction: Any, prefix: bytes, fsync: bool, keep_open: bool = False) -> int | None:
    """Write the message into ``path`` (a new file), fsynced if ``fsync``. ``keep_open``: not
    fsynced, and its descriptor returned, for the caller to fsync and close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        sender = transaction.sender.format() if transaction.sender else "<>"
        chunks = transaction.message_chunks()
        # Return-Path and the header in one write; the body streams after it.
        _write_all(fd, f"Return-Path: {sender}\r\n".encode("utf-8") + prefix + next(chunks, b""))
        for chunk in chunks:
            _write_all(fd, chunk)
        if keep_open:
            return fd
        if fsync:
            os.fsync(fd)
    except BaseException:
        disk.close_file(fd)
        os.unlink(path)
        raise
    disk.close_file(fd)
    return None


def take_back(delivered: list[str], durable: bool = True) -> None:
    """The client will hear 4xx and retry: take back what the first recipients got, so
    no one has the message twice (never both a 4xx and a delivery). ``durable``: the new/
    folders are fsynced after, so that a crash cannot bring a taken-back file back after
    its 4xx (the retry would be a second copy). If that fsync fails too, nothing more can
    be done: it is logged, and the 4xx goes out."""
    for target in delivered:
        remove(target)
    if not durable:
        return
    for folder in dict.fromkeys(os.path.dirname(target) for target in delivered):
        try:
            disk.fsync_folder(folder)
        except OSError as error:
            log.error("taking back from %s: its fsync failed: %s", folder, error)


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def close_and_remove(fd: int, path: str) -> None:
    try:
        disk.close_file(fd)
    finally:
        remove(path)


def remove_stale_tmp(tmp: str) -> None:
    """Remove the files in ``tmp`` older than 36 hours (the Maildir convention). A file that
    goes meanwhile (renamed into new/ by a worker serving while a reload sets up) is skipped."""
    cutoff = time.time() - STALE_TMP_SECONDS
    for entry in os.scandir(tmp):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file() and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

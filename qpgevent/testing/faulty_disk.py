"""A real file system whose fsyncs can be made slow or made to fail: FUSE over a real folder.

strace can fail or delay a system call at its entry or exit, but not the fsync the kernel
runs on its own worker for Linux AIO (``IOCB_CMD_FSYNC``), nor a disk error that arrives
with the fsync's completion. A FUSE file system can: the kernel hands every fsync of a file
(``FUSE_FSYNC``) and of a folder (``FUSE_FSYNCDIR``) to its daemon, whichever way it was
asked for, and waits for the daemon's answer. The daemon here passes everything through to
a real folder (``backing``) and, per path pattern, holds an fsync for some seconds first
(``slow``) or answers it with an error (``fail``, EIO by default). Writes can be failed or
held the same way (``call="write"``): a loop device whose backing file is here then meets a
disk whose writes fail, under whatever file system is made on it
(tests/hardening/test_sick_disk_writes.py).

``FaultyDisk(backing, mountpoint, control)`` as a context manager mounts it: the daemon runs
in a process of its own (this module run as a script, with the ``mfusepy`` binding of
libfuse 3: Debian's ``fuse3``), so that it never waits on the test's own event loop. The
faults are a JSON file in ``control`` that the daemon reads at each fsync, so a change
applies to the next fsync, and ``heal()`` lets the fsyncs held go at once. ``events()``
lists the fsyncs, renames, links and unlinks the daemon answered, each with its start, end
and answer (``control/events.log``, one JSON line each): a test sees whether a file ever
entered a folder, not only whether it is there at the end. ``held()`` lists the fsyncs
being held now. Leaving the block lets them go, unmounts (``fusermount3 -u``; lazily if the
mount is still in use) and waits for the daemon to end; the daemon also ends if the test
process dies.

What differs from a disk file system: the kernel's FUSE client holds the inode's lock while
the daemon works on its fsync (``fuse_fsync``, ``fuse_dir_fsync``), so closing or unlinking
a file being fsynced, or renaming into a folder being fsynced, waits for that fsync to end;
and an unlink waiting so holds its folder's lock too, so every create in that folder waits
as well. Read the ``backing`` folder, not the mount, while an fsync is held.
"""

from __future__ import annotations

import errno
import fnmatch
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FaultyDisk", "DiskEvent"]

RULES = "rules.json"
EVENTS = "events.log"
HELD = "held"  #: a file per fsync being answered, holding its path
MAX_THREADS = 100  #: the daemon's: far more fsyncs than gevent's pool has threads can be held at once


@dataclass(frozen=True)
class DiskEvent:
    """One call the daemon answered: ``fsync`` (a file), ``fsyncdir`` (a folder), ``rename``,
    ``link`` or ``unlink``."""

    call: str
    path: str  #: as seen in the mount, from its root: ``/new``, ``/tmp/<name>``
    target: str  #: where a rename or link went; else ""
    started: float  #: time.time() when the daemon got it
    ended: float  #: time.time() when it answered
    error: int  #: 0, or the errno it answered with


class FaultyDisk:
    """The FUSE file system over ``backing`` at ``mountpoint``; faults set in ``control``."""

    def __init__(self, backing: Path | str, mountpoint: Path | str, control: Path | str,
                 start_timeout: float = 30.0) -> None:
        self.backing, self.mountpoint, self.control = Path(backing), Path(mountpoint), Path(control)
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self._rules: list[dict[str, Any]] = []
        self._ids = itertools.count(1)  #: each rule's own: the daemon lets a held fsync go when its rule is lifted

    # -- the faults ---------------------------------------------------------------
    def slow(self, pattern: str, seconds: float, call: str = "fsync", times: int | None = None) -> None:
        """Hold each ``call`` of a path matching ``pattern`` (fnmatch) ``seconds``, or until
        ``heal()``, before doing it; the first ``times`` such calls only, if given.
        ``call``: ``fsync`` (files), ``fsyncdir`` (folders) or ``write`` (files)."""
        self._add(call, pattern, seconds, 0, times)

    def fail(self, pattern: str, call: str = "fsync", error: int = errno.EIO, delay: float = 0.0,
             times: int | None = None) -> None:
        """Answer each ``call`` of a path matching ``pattern`` with ``error`` (after ``delay``
        seconds, or ``heal()``), without doing it; the first ``times`` such calls only, if given."""
        self._add(call, pattern, delay, error, times)

    def heal(self) -> None:
        """No more faults: the fsyncs held are let go (done now), every later one passes through."""
        self._rules = []
        self._publish()

    def _add(self, call: str, pattern: str, delay: float, error: int, times: int | None) -> None:
        if call not in ("fsync", "fsyncdir", "write"):
            raise ValueError(f"call: fsync, fsyncdir or write, not {call!r}")
        self._rules.append({"id": next(self._ids), "call": call, "pattern": pattern,
                            "delay": delay, "errno": error, "times": times})
        self._publish()

    def _publish(self) -> None:
        # Renamed into place: the daemon never reads a half-written file.
        partial = self.control / f".{RULES}.partial"
        partial.write_text(json.dumps(self._rules))
        os.replace(partial, self.control / RULES)

    # -- what happened ------------------------------------------------------------
    def events(self) -> list[DiskEvent]:
        """The calls answered so far (fsyncs, renames, links, unlinks), in the order of their answers."""
        try:
            lines = (self.control / EVENTS).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [DiskEvent(**json.loads(line)) for line in lines if line.endswith("}")]

    def held(self) -> list[str]:
        """The paths of the fsyncs the daemon is working on now (started, not yet answered)."""
        try:
            return sorted(p.read_text() for p in (self.control / HELD).iterdir())
        except FileNotFoundError:
            return []

    # -- mounting -----------------------------------------------------------------
    def __enter__(self) -> FaultyDisk:
        for folder in (self.backing, self.mountpoint, self.control):
            folder.mkdir(parents=True, exist_ok=True)
        self._publish()
        with open(self.control / "daemon.err", "wb") as errors:
            process = self.process = subprocess.Popen(
                [sys.executable, __file__, str(self.backing), str(self.mountpoint), str(self.control)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        from . import wait_until  # (not at the top: the daemon runs this file as a script)

        try:
            wait_until(lambda: os.path.ismount(self.mountpoint) or process.poll() is not None,
                       self.start_timeout, f"the FUSE daemon mounting {self.mountpoint}")
            if not os.path.ismount(self.mountpoint):
                raise RuntimeError(f"the FUSE daemon did not mount {self.mountpoint}: "
                                   f"{(self.control / 'daemon.err').read_text()[-2000:]}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.heal()
        # Asked even when the mount looks gone: a mount whose daemon died answers ENOTCONN.
        unmounted = subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True).returncode == 0
        if not unmounted and self.is_mounted():
            # Still in use (a file left open): detach it now.
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        if self.process is not None:
            if not unmounted:
                # Detached, the daemon would serve the files left open for as long as they are:
                # end it (the kernel then answers their users ENOTCONN).
                self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            self.process = None

    def is_mounted(self) -> bool:
        """Whether the mount table still has it (however its daemon is)."""
        with open("/proc/self/mounts") as mounts:
            return any(line.split()[1] == str(self.mountpoint) for line in mounts)


# -- the daemon (this module run as a script) --------------------------------------

def _serve(backing: str, mountpoint: str, control: str) -> None:
    import ctypes

    from mfusepy import FUSE, FuseOSError, Operations

    # End with the test process that started us (SIGTERM: libfuse unmounts and returns).
    ctypes.CDLL(None, use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    log_lock = threading.Lock()
    held_folder = os.path.join(control, HELD)
    os.makedirs(held_folder, exist_ok=True)
    serial = itertools.count(1)
    matched: dict[int, int] = {}  # rule id -> the calls it has applied to

    def rules() -> list[dict[str, Any]]:
        with open(os.path.join(control, RULES)) as text:
            return json.load(text)

    def log(call: str, path: str, target: str, started: float, error: int) -> None:
        line = json.dumps({"call": call, "path": path, "target": target, "started": started,
                           "ended": time.time(), "error": error})
        with log_lock, open(os.path.join(control, EVENTS), "a") as events:
            events.write(line + "\n")

    def logged(call: str, path: str, operation: Any, *args: Any, target: str = "") -> None:
        started = time.time()
        try:
            operation(*args)
        except OSError as error:
            log(call, path, target, started, error.errno or errno.EIO)
            raise
        log(call, path, target, started, 0)

    def matching(call: str, path: str) -> dict[str, Any] | None:
        """The first rule for ``call`` on ``path`` that still applies (counted as applied)."""
        with log_lock:
            rule = next((r for r in rules() if r["call"] == call and fnmatch.fnmatchcase(path, r["pattern"])
                         and (r["times"] is None or matched.get(r["id"], 0) < r["times"])), None)
            if rule is not None:
                matched[rule["id"]] = matched.get(rule["id"], 0) + 1
        return rule

    def hold(rule: dict[str, Any]) -> None:
        """Wait the rule's delay, or until the test lifts the rule (heal) if that comes first."""
        deadline = time.monotonic() + rule["delay"]
        while time.monotonic() < deadline and any(r["id"] == rule["id"] for r in rules()):
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))

    class Passthrough(Operations):
        use_ns = True
        # Calls on an open file or folder get its descriptor, not its path: an unlinked file
        # still open keeps working (hard_remove: no .fuse_hidden files left in tmp/).
        flag_nopath = flag_nullpath_ok = True

        def __init__(self) -> None:
            self.opened: dict[int, str] = {}  # descriptor -> path at open (an unlinked file has none)

        def real(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
            st = os.lstat(self.real(path)) if path is not None else os.fstat(fh)  # type: ignore[arg-type]
            return {key: getattr(st, key) for key in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
                                                      "st_ino", "st_blocks")} | {
                "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns}

        def readdir(self, path: str | None, fh: int) -> list[str]:
            return [".", "..", *os.listdir(fh)]

        def access(self, path: str, amode: int) -> int:
            if not os.access(self.real(path), amode):
                raise FuseOSError(errno.EACCES)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self.real(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(self.real(path))
            return 0

        def unlink(self, path: str) -> int:
            logged("unlink", path, os.unlink, self.real(path))
            return 0

        def rename(self, old: str, new: str) -> int:
            logged("rename", old, os.rename, self.real(old), self.real(new), target=new)
            return 0

        def link(self, target: str, source: str) -> int:
            logged("link", source, os.link, self.real(source), self.real(target), target=target)
            return 0

        def symlink(self, target: str, source: str) -> int:
            os.symlink(source, self.real(target))
            return 0

        def readlink(self, path: str) -> str:
            return os.readlink(self.real(path))

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self.real(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self.real(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
            os.utime(self.real(path), ns=times) if times else os.utime(self.real(path))
            return 0

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            os.truncate(fh if path is None else self.real(path), length)  # type: ignore[arg-type]
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            st = os.statvfs(self.real(path))
            return {key: getattr(st, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                      "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}

        def create(self, path: str, mode: int, flags: int = os.O_WRONLY) -> int:
            fd = os.open(self.real(path), flags | os.O_CREAT, mode)
            self.opened[fd] = path
            return fd

        def open(self, path: str, flags: int) -> int:
            fd = os.open(self.real(path), flags)
            self.opened[fd] = path
            return fd

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            return os.pread(fh, size, offset)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            rule = matching("write", self.opened.get(fh, ""))
            if rule is not None:
                hold(rule)
                if rule["errno"]:
                    raise FuseOSError(rule["errno"])
            return os.pwrite(fh, data, offset)

        def flush(self, path: str | None, fh: int) -> int:
            return 0

        def release(self, path: str | None, fh: int) -> int:
            self.opened.pop(fh, None)
            os.close(fh)
            return 0

        def opendir(self, path: str) -> int:
            fd = os.open(self.real(path), os.O_RDONLY | os.O_DIRECTORY)
            self.opened[fd] = path
            return fd

        def releasedir(self, path: str | None, fh: int) -> int:
            return self.release(path, fh)

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            return self.synced("fsync", fh)

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            return self.synced("fsyncdir", fh)

        def synced(self, call: str, fh: int) -> int:
            path = self.opened[fh]  # the path it was opened by (it may have been unlinked since)
            started = time.time()
            marker = os.path.join(held_folder, str(next(serial)))
            with open(marker, "w") as held:
                held.write(path)
            error = 0
            try:
                rule = matching(call, path)
                if rule is not None:
                    hold(rule)
                    error = rule["errno"]
                if not error:
                    os.fsync(fh)
            finally:
                log(call, path, "", started, error)
                os.unlink(marker)
            if error:
                raise FuseOSError(error)
            return 0

    # libfuse answers with at most max_threads threads (10 by default): each held fsync takes
    # one, and with every one held the daemon would answer nothing else (a create in the loop
    # waited for it). A sick disk holds what it is asked to hold, and answers the rest.
    FUSE(Passthrough(), mountpoint, foreground=True, fsname="faulty_disk", hard_remove=True, use_ino=True,
         max_threads=MAX_THREADS)


if __name__ == "__main__":
    _serve(*sys.argv[1:4])

"""Watch a process's system calls with strace, in order, and inject faults into them.

``traced(pid, ["fsync", "rename"])`` attaches strace to every thread of ``pid`` (the test
process itself, for an in-process server), waits until it is attached, and on exit reads
the log back as ``Call`` records in the order the kernel saw them: ``start`` and ``end``
are positions in that order, so ``a.end < b.start`` means ``a`` returned before ``b``
began, across threads too (strace logs a call's return before the thread goes on).
File descriptors are shown with their paths (``fsync(7</srv/Maildir/new>)``).

``inject`` asks strace to make calls fail instead of running them (its ``-e inject``:
``"fsync:error=EIO"``) and ``paths`` limits the trace, and so the injection, to calls that
touch those paths: a disk error on one folder's fsync without a faulty disk.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import wait_until

__all__ = ["Call", "Sync", "Trace", "syncs", "traced"]

_PID = re.compile(r"^(\d+)\s+(.*)$")
_WHOLE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(.*)$")
_UNFINISHED = re.compile(r"^(\w+)\((.*?)\s*<unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+|\?)(.*)$")


@dataclass(frozen=True)
class Call:
    name: str  #: without the "at"/"2" suffixes of its variants: renameat2 -> rename
    args: str  #: as strace printed them
    result: int  #: the return value (-1 with ``error`` set)
    error: str  #: "" or strace's note after the result: "EIO (Input/output error) (INJECTED)"
    start: int  #: position of the call's entry in the log
    end: int  #: position of its return
    pid: int  #: the thread


@dataclass
class Trace:
    """The calls of one ``traced`` block, filled in when the block ends."""
    log: Path
    calls: list[Call] = field(default_factory=list)

    def of(self, name: str) -> list[Call]:
        return [call for call in self.calls if call.name == name]


def _base(name: str) -> str:
    return re.sub(r"(at2?|2)$", "", name) if name not in ("fsync", "fdatasync") else name


def parse(text: str) -> list[Call]:
    """strace -f output -> the completed calls, ordered by their return."""
    calls: list[Call] = []
    pending: dict[int, tuple[str, str, int]] = {}
    for position, line in enumerate(text.splitlines()):
        head = _PID.match(line)
        if not head:
            continue
        pid, rest = int(head.group(1)), head.group(2)
        if whole := _WHOLE.match(rest):
            name, args, result, note = whole.groups()
            start = position
        elif unfinished := _UNFINISHED.match(rest):
            pending[pid] = (unfinished.group(1), unfinished.group(2), position)
            continue
        elif resumed := _RESUMED.match(rest):
            name, tail, result, note = resumed.groups()
            if pid not in pending:
                continue  # it began before strace attached
            _, args, start = pending.pop(pid)
            args += tail
        else:
            continue  # signals, exits
        calls.append(Call(_base(name), args, -1 if result == "?" else int(result), note.strip(),
                          start, position, pid))
    return calls


@dataclass(frozen=True)
class Sync:
    """One fsync or fdatasync, made as the system call or handed to the kernel (Linux AIO)."""
    path: str  #: the file or folder synced
    start: int  #: position of the system call, or of the io_submit that handed it over
    done: int  #: position of the system call's return, or of the io_getevents that read its completion
    result: int  #: 0, or the negative errno (-1 for a failed system call)


_SYSCALL_PATH = re.compile(r"^\d+<([^>]*)>")
_SUBMITTED = re.compile(r"aio_data=(0x[0-9a-f]+|0), aio_lio_opcode=IOCB_CMD_FD?SYNC, aio_fildes=\d+<([^>]*)>")
_COMPLETED = re.compile(r"\{data=(0x[0-9a-f]+|0), obj=[^,]+, res=(-?\d+)")


def syncs(trace: Trace) -> list[Sync]:
    """Every fsync of the trace that is over (trace fsync, fdatasync, io_submit and io_getevents)."""
    found = []
    for call in trace.of("fsync") + trace.of("fdatasync"):
        if (path := _SYSCALL_PATH.match(call.args)) is not None:
            found.append(Sync(path.group(1), call.start, call.end, call.result))
    # A submission's data is the operation's address (caio): reused once it is reaped, so
    # each submission takes the first completion of its value read back after it.
    completions = [(call, data, int(res)) for call in trace.of("io_getevents")
                   for data, res in _COMPLETED.findall(call.args)]
    for call in sorted(trace.of("io_submit"), key=lambda submitted: submitted.start):
        for data, path in _SUBMITTED.findall(call.args):
            match = next((c for c in completions if c[1] == data and c[0].end > call.start), None)
            if match is not None:
                completions.remove(match)
                found.append(Sync(path, call.start, match[0].end, match[2]))
    return sorted(found, key=lambda sync: sync.done)


def _all_threads_traced(pid: int) -> bool:
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/status") as status:
            if not any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in status):
                return False
    return True


@contextmanager
def traced(pid: int, syscalls: Iterable[str], log: str | os.PathLike[str], *, paths: Iterable[str] = (),
           inject: Iterable[str] = (), string_size: int = 256) -> Iterator[Trace]:
    """strace ``pid`` (all its threads) for the block: the calls named in ``syscalls``."""
    trace = Trace(Path(log))
    command = ["strace", "-f", "-qq", "-y", "-s", str(string_size), "-e", "signal=none",
               "-e", "trace=" + ",".join(syscalls), "-o", str(trace.log), "-p", str(pid)]
    for path in paths:
        command += ["-P", str(path)]
    for fault in inject:
        command += ["-e", "inject=" + fault]
    strace = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def attached() -> bool:
            assert strace.poll() is None, f"strace failed: {strace.stderr.read() if strace.stderr else b''!r}"
            return _all_threads_traced(pid)
        wait_until(attached, 20, "strace attached to every thread", step=0.01)
        yield trace
    finally:
        strace.terminate()
        strace.communicate(timeout=30)
    trace.calls = parse(trace.log.read_text())

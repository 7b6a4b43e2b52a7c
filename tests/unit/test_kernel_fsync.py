"""qpgevent.backends.kernel_fsync: fsync through Linux AIO, waited for from greenlets.

Real files on this machine's disk, real io_submit; strace shows which system calls ran and in
which thread (the point of the module: none of them in a worker thread).
"""

from __future__ import annotations

import errno
import gc
import os
import weakref

import gevent
import gevent.socket
import pytest

from qpgevent.backends import kernel_fsync
from qpgevent.testing.syscalls import traced


def written(path, size=2048) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"x" * size)
    return fd


def test_aio_is_used_on_this_linux():
    # The CI machines are Linux on x86-64 or arm64 with AIO: the fast path must be the one tested.
    assert kernel_fsync.available()


def test_many_fsyncs_at_once_each_return_after_the_kernel_ran_it_and_no_thread_took_part(tmp_path):
    fds = [written(tmp_path / f"m{n}") for n in range(40)]
    try:
        with traced(os.getpid(), ["fsync", "fdatasync", "io_submit", "io_getevents"], tmp_path / "strace.out") as trace:
            waiters = [gevent.spawn(kernel_fsync.fsync if n % 2 else kernel_fsync.fdatasync, fd)
                       for n, fd in enumerate(fds)]
            gevent.joinall(waiters, timeout=60, raise_error=True)
    finally:
        for fd in fds:
            os.close(fd)
    assert all(w.successful() for w in waiters)
    assert trace.of("fsync") == [] and trace.of("fdatasync") == []
    submitted = trace.of("io_submit")
    assert len(submitted) == 40 and all(c.result == 1 for c in submitted)
    assert sum("IOCB_CMD_FSYNC" in c.args for c in submitted) == 20
    assert sum("IOCB_CMD_FDSYNC" in c.args for c in submitted) == 20
    assert {c.pid for c in trace.calls} == {os.getpid()}  # the loop's thread only
    # Every fsync was reaped (its result read back) before its greenlet went on.
    reaped = sum(c.args.count("res=0") for c in trace.of("io_getevents"))
    assert reaped == 40


def test_a_closed_descriptor_raises_what_fsync_would():
    fd = 4000  # not open (a closed low number may be reused at once by another thread)
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(OSError) as failed:
        kernel_fsync.fsync(fd)
    assert failed.value.errno == errno.EBADF


def test_what_aio_refuses_is_fsynced_in_a_thread_with_fsyncs_own_answer(tmp_path):
    """A pipe has no fsync: io_submit refuses it (EINVAL), the thread's fsync answers EINVAL too."""
    read, write = os.pipe()
    try:
        with traced(os.getpid(), ["fsync", "io_submit"], tmp_path / "strace.out") as trace:
            with pytest.raises(OSError) as failed:
                kernel_fsync.fsync(write)
    finally:
        os.close(read)
        os.close(write)
    assert failed.value.errno == errno.EINVAL
    (submitted,) = trace.of("io_submit")
    assert "EINVAL" in submitted.error
    (fallback,) = trace.of("fsync")
    assert fallback.pid != os.getpid()  # in a worker thread


def test_a_waiter_interrupted_before_the_completion_leaves_nothing_behind(tmp_path):
    """The hook's timeout strikes while the kernel fsyncs: the caller goes on (and may close the
    descriptor: the kernel holds the file), the late completion is dropped, the next fsync works."""
    fd = written(tmp_path / "slow")
    waiter = gevent.spawn(kernel_fsync.fsync, fd)
    gevent.sleep(0)  # it has submitted and waits
    waiter.kill(block=True)
    os.close(fd)
    ring = kernel_fsync._ring()
    assert ring is not None and ring.waiting == 0
    fd = written(tmp_path / "next")
    try:
        gevent.with_timeout(30, kernel_fsync.fsync, fd)
    finally:
        os.close(fd)


def test_without_aio_a_worker_thread_fsyncs(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_fsync, "_here", None)  # as where io_setup is refused
    assert not kernel_fsync.available()
    fd = written(tmp_path / "m")
    try:
        with traced(os.getpid(), ["fsync", "fdatasync", "io_submit"], tmp_path / "strace.out") as trace:
            kernel_fsync.fsync(fd)
            kernel_fsync.fdatasync(fd)
    finally:
        os.close(fd)
    assert [c.name for c in trace.calls] == ["fsync", "fdatasync"]
    assert all(c.result == 0 and c.pid != os.getpid() for c in trace.calls)


def test_a_caller_in_another_thread_fsyncs_there(tmp_path):
    """The completions are heard by the loop that set up the ring: a caller in a thread of its
    own cannot wait on them, and fsyncs right there (it blocks only its own thread)."""
    assert kernel_fsync.available()
    fd = written(tmp_path / "m")
    try:
        with traced(os.getpid(), ["fsync", "io_submit"], tmp_path / "strace.out") as trace:
            gevent.get_hub().threadpool.apply(kernel_fsync.fsync, (fd,))
    finally:
        os.close(fd)
    assert trace.of("io_submit") == []
    (call,) = trace.of("fsync")
    assert call.result == 0 and call.pid != os.getpid()


def test_a_child_process_gets_a_ring_of_its_own_and_leaves_the_parents_alone(tmp_path):
    """A forked worker cannot use its parent's AIO context: it sets up its own, and lets go of
    the parent's eventfd, which would otherwise wake it (and not the parent) for the parent's
    completions. The child lives on while the parent fsyncs: each fsync still returns."""
    assert kernel_fsync.available()
    parents = kernel_fsync._here
    go_on, done = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its own fsync went through AIO
        try:
            os.close(done)
            fd = written(tmp_path / "child")
            kernel_fsync.fsync(fd)
            ok = kernel_fsync._here not in (None, parents)
            gevent.socket.wait_read(go_on, 60)  # until the parent is through
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    os.close(go_on)
    try:
        for n in range(20):
            fd = written(tmp_path / f"parent{n}")
            try:
                gevent.with_timeout(30, kernel_fsync.fsync, fd)
            finally:
                os.close(fd)
    finally:
        os.write(done, b".")
        os.close(done)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def in_child(work) -> int:
    """Fork; the child runs ``work`` and exits 0 if it returned true. Its process id."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if work() else 1)
        except BaseException:
            os._exit(2)
    return pid


def test_a_child_never_destroys_an_aio_context_once_it_has_its_own(tmp_path):
    """caio's context, once let go of, closes its eventfd and destroys its AIO context by
    number: in a child that number is no context of its own (io_destroy: EINVAL), unless the
    child's own ring was given the same one. So a child lets go of the parent's context at the
    fork, before it sets up its own (the parent's eventfd closed there); if anything still holds
    it then (here a list the child empties once its own ring is up; in a server, an fsync in
    flight: caio holds it and its context until its completion is reaped, which in the child
    it never is), the child keeps it for good, and never destroys it."""
    assert kernel_fsync.available()
    parents = weakref.ref(kernel_fsync._here)  # (a reference would keep it in the child)
    eventfd = f"{kernel_fsync._here.context.fileno}<anon_inode:[eventfd"
    fd = written(tmp_path / "m")
    held = []

    def fsync_on_a_ring_of_its_own():
        kernel_fsync.fsync(fd)
        held.clear()  # the last other reference to the parent's ring, if any, goes now
        gc.collect()
        return kernel_fsync._here is not None and kernel_fsync._here is not parents()

    try:
        with traced(os.getpid(), ["close", "io_setup", "io_destroy"], tmp_path / "strace.out") as trace:
            gc.collect()  # earlier tests' tracebacks hold frames of the ring's: it would be kept
            quiet = in_child(fsync_on_a_ring_of_its_own)
            held.append(parents())
            kept = in_child(fsync_on_a_ring_of_its_own)
            held.clear()
            waiter = gevent.spawn(kernel_fsync.fsync, fd)
            gevent.sleep(0)  # submitted, not yet reaped: in flight when the child is forked
            busy = in_child(fsync_on_a_ring_of_its_own)
            waiter.get(timeout=30)
            statuses = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in (quiet, kept, busy)]
    finally:
        os.close(fd)
    assert statuses == [0, 0, 0]
    own = {}
    for pid in quiet, kept, busy:
        (own[pid],) = [c for c in trace.of("io_setup") if c.pid == pid and c.result == 0]
        assert all(c.end < own[pid].start for c in trace.of("io_destroy") if c.pid == pid)
    # The parent's eventfd, closed once before the child's own ring (whose eventfd may then be
    # given the same number, freed by that close: later closes of it are not the parent's).
    assert [c.result for c in trace.of("close")
            if c.pid == quiet and c.args.startswith(eventfd) and c.end < own[quiet].start] == [0]
    for pid in kept, busy:
        assert [c for c in trace.of("io_destroy") if c.pid == pid] == []
        assert [c for c in trace.of("close") if c.pid == pid and c.args.startswith(eventfd)] == []

"""Found by a 10,000-user Locust run: a queue hook timing out while every thread of the pool
was busy, and more work waiting for one, lost its undo (the message stayed in the Maildir
while the client heard 451, and a retry delivers it twice). The undo must run once the work
is done, however busy the pool."""

from __future__ import annotations

import os

import gevent
import pytest

from qpgevent.backends.disk import run_blocking_undoable
from qpgevent.testing import wait_until


def test_an_interrupted_job_is_undone_even_when_every_thread_is_busy():
    pool = gevent.get_hub().threadpool
    busy, busy_opener = os.pipe()   # real blocking reads: a thread waits on each until a byte comes
    ours, ours_opener = os.pipe()
    blockers = [pool.spawn(os.read, busy, 1) for _ in range(pool.maxsize - 1)]
    undone: list[str] = []
    waiting: list[gevent.Greenlet] = []
    try:
        with pytest.raises(gevent.Timeout):
            with gevent.Timeout(0.5):
                # The last free thread is ours; then more work queues up for a thread.
                waiting += [gevent.spawn(pool.spawn, os.read, busy, 1) for _ in range(3)]
                run_blocking_undoable(lambda: (os.read(ours, 1), "delivered")[1], undone.append)
        os.write(ours_opener, b"x")   # our work ends after its caller gave up, the pool still full
        gevent.sleep(0.5)
        os.write(busy_opener, b"x" * (len(blockers) + len(waiting)))
        wait_until(lambda: undone, timeout=30, what="the undo")
        assert undone == ["delivered"]
    finally:
        os.write(busy_opener, b"x" * (len(blockers) + len(waiting)))
        os.write(ours_opener, b"x")
        gevent.joinall(blockers + waiting, timeout=30)
        for fd in (busy, busy_opener, ours, ours_opener):
            os.close(fd)


def test_a_job_done_just_as_its_caller_is_interrupted_is_undone_too():
    # The interruption and the job's end meet in one turn of the loop, hundreds of times: when
    # the job is already done as the caller gives up, what it delivered must be taken back too.
    interrupted, delivered, undone = [], [], []

    def deliver(number: int) -> int:
        delivered.append(number)
        return number

    for number in range(300):
        try:
            with gevent.Timeout(0.0001 * (number % 20)):
                run_blocking_undoable(deliver, undone.append, number)
        except gevent.Timeout:
            interrupted.append(number)
    finished = set(delivered) - set(interrupted)    # answered: kept
    wait_until(lambda: set(undone) >= set(interrupted) & set(delivered), timeout=30, what="every undo")
    assert interrupted and not set(undone) & finished

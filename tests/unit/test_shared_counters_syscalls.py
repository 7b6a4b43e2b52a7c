"""The system calls a session costs in the shared counters, counted by strace on this process.

A session takes its place and gives it back: two lock round trips on the table's file
(``fcntl(F_SETLKW)``, lock and unlock each), and nothing else reaches the kernel. The
worker's pid in its row's header is written once, when the worker starts, and stays.
"""

from __future__ import annotations

import os
import threading

import pytest

from qpgevent.server.shared_counters import SharedTable, WorkerCounters
from qpgevent.testing.syscalls import traced

SESSIONS = 50


@pytest.fixture
def table():
    shared = SharedTable(rows=2, capacity=64)
    yield shared
    shared.close()


def test_a_session_costs_two_lock_round_trips_and_no_other_call(table, tmp_path):
    row = table.claim_row()
    assert row is not None
    counters = WorkerCounters(table, row)
    me = threading.get_native_id()
    with traced(os.getpid(), ["getpid", "fcntl"], tmp_path / "strace.out") as trace:
        for n in range(SESSIONS):
            lease = counters.acquire(10, f"192.0.2.{n % 3}")
            assert lease is not None
            second = counters.acquire(10)  # another session, released first: the row is repacked
            assert second is not None
            lease.release()
            second.release()
    mine = [call for call in trace.calls if call.pid == me]
    locks = [call for call in mine if call.name == "fcntl" and "F_SETLKW" in call.args]
    # (Before and after the sessions, waiting for strace, the event loop asks getpid: libev's
    # fork check, once a turn.)
    assert [call for call in mine if call.name == "getpid" and locks[0].start < call.start < locks[-1].end] == []
    assert len(locks) == 2 * 2 * 2 * SESSIONS  # 2 sessions a round, 2 round trips each, lock + unlock
    assert sum("F_WRLCK" in call.args for call in locks) == sum("F_UNLCK" in call.args for call in locks)
    assert table.header(row) == (os.getpid(), 0)  # the owner stays named; every place given back


def test_the_used_count_is_the_rows_own(table):
    one, two = (WorkerCounters(table, row) for row in (table.claim_row(), table.claim_row()))
    leases = [one.acquire(10, "192.0.2.1") for _ in range(3)] + [two.acquire(10, "192.0.2.1")]
    assert table.header(one.row) == (os.getpid(), 3) and table.header(two.row) == (os.getpid(), 1)
    leases[0].release()
    assert table.header(one.row) == (os.getpid(), 2) and two.count("192.0.2.1") == 3
    assert table.clear_row(one.row) == 2 and table.header(one.row) == (0, 0)
    assert one.sessions() == 1

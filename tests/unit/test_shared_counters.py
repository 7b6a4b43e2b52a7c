"""Session counts shared by the workers (``qpgevent.server.shared_counters``), one module alone.

Two ``WorkerCounters`` on two rows of one ``SharedTable`` stand for two workers (the
table is the same memory either way: one mapping, or the same file mapped again in a
forked child); the forked case itself is ``tests/e2e/test_master.py``.
"""

from __future__ import annotations

import pytest

from qpgevent.server.shared_counters import PENDING, LocalCounters, SharedTable, WorkerCounters, address_key


@pytest.fixture
def table():
    shared = SharedTable(rows=4, capacity=64)
    yield shared
    shared.close()


def two_workers(table: SharedTable) -> tuple[WorkerCounters, WorkerCounters]:
    first, second = table.claim_row(), table.claim_row()
    assert first is not None and second is not None and first != second
    return WorkerCounters(table, first), WorkerCounters(table, second)


def test_address_keys_are_16_octets_and_one_per_client():
    assert address_key("192.0.2.1") == address_key("::ffff:192.0.2.1")
    assert address_key("192.0.2.1") != address_key("192.0.2.2")
    assert len(address_key("2001:db8::1")) == 16
    assert address_key("not an address") not in (bytes(16), PENDING)


def test_the_limit_counts_every_worker(table):
    one, two = two_workers(table)
    leases = [one.acquire(3), two.acquire(3), one.acquire(3)]
    assert all(leases)
    assert one.acquire(3) is None and two.acquire(3) is None  # 3 in all, whichever asks
    leases[1].release()
    assert one.acquire(3) is not None


def test_per_address_counts_are_host_wide_and_follow_set_ip(table):
    one, two = two_workers(table)
    a, b, c = one.acquire(10), two.acquire(10), two.acquire(10)
    assert one.count("192.0.2.7") == 0  # taken, address not known yet (PROXY header coming)
    a.set_ip("192.0.2.7")
    b.set_ip("192.0.2.7")
    c.set_ip("198.51.100.1")
    assert one.count("192.0.2.7") == two.count("192.0.2.7") == 2
    assert one.count("::ffff:198.51.100.1") == 1


def test_release_keeps_the_row_packed_and_is_idempotent(table):
    one, _ = two_workers(table)
    leases = [one.acquire(10) for _ in range(4)]
    for n, lease in enumerate(leases):
        lease.set_ip(f"192.0.2.{n}")
    leases[0].release()
    leases[0].release()  # a second release changes nothing
    assert table.sessions() == 3
    assert [one.count(f"192.0.2.{n}") for n in range(4)] == [0, 1, 1, 1]
    leases[3].set_ip("192.0.2.9")  # the lease moved into the freed slot still writes its own
    assert one.count("192.0.2.3") == 0 and one.count("192.0.2.9") == 1
    for lease in leases[1:]:
        lease.release()
    assert table.sessions() == 0


def test_a_dead_workers_row_is_cleared_by_the_master(table):
    one, two = two_workers(table)
    for _ in range(3):
        one.acquire(5).set_ip("192.0.2.7")
    two.acquire(5).set_ip("192.0.2.7")
    assert two.count("192.0.2.7") == 4 and two.acquire(5) is not None
    assert table.clear_row(one.row) == 3  # the master reaped worker one: its 3 leases are void
    assert two.count("192.0.2.7") == 1 and table.sessions() == 2
    assert table.claim_row() == one.row  # and the row serves the next worker


def test_a_worker_in_stress_is_seen_by_the_others_until_it_leaves_or_dies(table):
    one, two = two_workers(table)
    one.acquire(5)
    assert not one.stressed_elsewhere() and not two.stressed_elsewhere()
    one.set_stressed(True)
    assert two.stressed_elsewhere() and not one.stressed_elsewhere()  # itself is not "elsewhere"
    assert one.sessions() == two.sessions() == 1  # the flag leaves the count alone
    table.beat(one.row, 12.5)
    assert two.stressed_elsewhere() and table.heartbeat(one.row) == 12.5  # nor the heartbeat
    one.set_stressed(False)
    assert not two.stressed_elsewhere()
    one.set_stressed(True)
    table.clear_row(one.row)  # reaped: a dead worker holds nobody in stress
    assert not two.stressed_elsewhere()


def test_a_worker_cannot_hold_more_than_its_row(table):
    one, _ = two_workers(table)
    assert all(one.acquire(1000) for _ in range(table.capacity))
    assert one.acquire(1000) is None


def test_local_counters_match():
    counters = LocalCounters()
    a, b = counters.acquire(2), counters.acquire(2)
    assert counters.acquire(2) is None
    a.set_ip("192.0.2.1")
    b.set_ip("::ffff:192.0.2.1")
    assert counters.count("192.0.2.1") == 2
    a.release()
    a.release()
    assert counters.count("192.0.2.1") == 1 and counters.acquire(2) is not None


def test_an_address_known_at_accept_is_counted_as_the_place_is_taken(table):
    # One locked step for both (the server's usual case: no PROXY header to read first).
    one, two = two_workers(table)
    for counters, other in ((one, two), (LocalCounters(), None)):
        a = counters.acquire(3, "192.0.2.7")
        b = counters.acquire(3, "::ffff:192.0.2.7")
        assert a is not None and b is not None
        assert counters.count("192.0.2.7") == 2 and counters.sessions() == 2
        if other is not None:
            assert other.count("192.0.2.7") == 2  # on every worker
        assert counters.acquire(3, "192.0.2.8") is not None
        assert counters.acquire(3, "192.0.2.9") is None  # the limit holds as before
        assert counters.count("192.0.2.9") == 0  # a refused place counts for nobody
        a.release()
        assert counters.count("192.0.2.7") == 1 and counters.count("192.0.2.8") == 1
        b.set_ip("198.51.100.1")  # a later set_ip still moves it
        assert counters.count("192.0.2.7") == 0 and counters.count("198.51.100.1") == 1

"""The stress gauge (qpgevent.core.stress): when the host is in stress, how far to shed."""

from __future__ import annotations

import pytest

from qpgevent.core.stress import Gauge, command_timeout, reserve


@pytest.mark.parametrize("max_connections, stress_at, kept", [
    (1000, 90, 100), (10, 90, 1), (9, 90, 0), (1, 90, 0), (3, 90, 0), (200, 90, 20), (1000, 100, 0),
    (1000, 1, 990),
])
def test_the_reserve_is_the_share_above_stress_at_rounded_down(max_connections, stress_at, kept):
    assert reserve(max_connections, stress_at) == kept


def test_the_shipped_limits_stress_from_900_until_under_800():
    gauge = Gauge(1000, 90)
    assert (gauge.mark, gauge.leave) == (900, 800)
    assert [gauge.update(n) for n in (0, 899, 900, 950, 899, 800, 799, 850)] == [
        False, False, True, True, True, True, False, False]


def test_excess_is_what_gets_the_host_under_the_mark():
    gauge = Gauge(1000, 90)
    assert [gauge.excess(n) for n in (0, 899, 900, 1000)] == [0, 0, 1, 101]


@pytest.mark.parametrize("max_connections, stress_at", [(1, 90), (2, 90), (3, 90), (9, 90), (1000, 100)])
def test_without_a_place_to_keep_there_is_no_stress_mode(max_connections, stress_at):
    gauge = Gauge(max_connections, stress_at)
    assert gauge.mark is None
    assert not gauge.update(max_connections)
    assert gauge.excess(max_connections) == 0


def test_ten_places_keep_one():
    gauge = Gauge(10, 90)
    assert (gauge.mark, gauge.leave) == (9, 8)
    assert gauge.update(9) and gauge.excess(9) == 1 and gauge.excess(10) == 2
    assert gauge.update(8) and not gauge.update(7)


def test_the_command_timeout_shrinks_only_in_stress_and_never_grows():
    assert command_timeout(300, False, 10) == 300
    assert command_timeout(300, True, 10) == 10
    assert command_timeout(5, True, 10) == 5


def test_a_worker_joins_another_in_stress_between_the_marks_only():
    gauge = Gauge(1000, 90)
    assert not gauge.update(799, elsewhere=True)  # under the lower mark: the host is out of stress
    assert gauge.update(850, elsewhere=True)  # another worker saw the mark; the host is still near it
    assert gauge.update(850, elsewhere=False)  # in, it stays in until under the lower mark
    assert not gauge.update(799, elsewhere=True)

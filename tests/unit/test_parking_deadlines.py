"""Parked sessions' deadlines share one timer (qpgevent.server.parking): each still times
out at its own deadline, in order, and one that left (woken by input, or taken) does not.

Real gevent sockets (socket pairs) and the real event loop; the "sessions" are the least
that parking needs of a driver: a socket.
"""

from __future__ import annotations

import contextvars

import gevent
import gevent.socket

from qpgevent.server.parking import Parking, Pause
from qpgevent.testing import wait_until


class Parked:
    """What parking needs of a session: its socket (and the client's end, to speak)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sock, self.client = gevent.socket.socketpair()

    def close(self) -> None:
        self.sock.close()
        self.client.close()


def test_deadlines_come_in_order_and_a_session_that_left_does_not_time_out():
    woken: list[tuple[str, bool, str]] = []
    parking = Parking(0.01, lambda session, timed_out, held: woken.append((session.name, timed_out, held)))
    sessions = {name: Parked(name) for name in ("slow", "quick", "middle", "talker", "taken")}
    try:
        for name, seconds in (("slow", 0.6), ("quick", 0.2), ("middle", 0.4), ("talker", 30), ("taken", 0.3)):
            parking.park(sessions[name], Pause(contextvars.copy_context(), seconds), f"lease of {name}")
        assert len(parking) == 5
        sessions["talker"].client.sendall(b"NOOP\r\n")  # input: woken at once, not timed out
        taken = parking.take(sessions["taken"])  # the shedder's way: unparked, not woken
        assert taken is not None and taken[1] == "lease of taken"
        wait_until(lambda: len(woken) == 4, 10, "the talker and the three deadlines")
        assert woken[0] == ("talker", False, "lease of talker")
        assert woken[1:] == [("quick", True, "lease of quick"), ("middle", True, "lease of middle"),
                             ("slow", True, "lease of slow")]
        assert len(parking) == 0
        gevent.sleep(0)  # nothing else comes: the taken one stays taken
        assert len(woken) == 4
        assert getattr(parking, "_timer") is None  # no timer left on the loop
    finally:
        for session in sessions.values():
            session.close()


def test_cap_brings_every_deadline_forward():
    woken: list[str] = []
    parking = Parking(0.01, lambda session, timed_out, held: woken.append(session.name))
    sessions = [Parked(f"s{i}") for i in range(3)]
    try:
        for session in sessions:
            parking.park(session, Pause(contextvars.copy_context(), 300), None)
        parking.cap(0.05)  # stress: nobody waits parked more than 50 ms
        wait_until(lambda: len(woken) == 3, 10, "the capped deadlines")
        assert sorted(woken) == ["s0", "s1", "s2"]
    finally:
        for session in sessions:
            session.close()

"""Stress: when the host is near ``max_connections``, and how far to shed (pure arithmetic).

Theory of operation, after Postfix's stress mode. ``[limits] stress_at`` (a percentage of
``max_connections``) keeps the last places for newcomers: with 1000 and 90 %, the host is
*in stress* from 900 sessions on, and each worker then closes its idle sessions with no
transaction under way (``qpgevent.server.shedding``), oldest first, until the host holds
fewer than 900 again, and shortens ``command_timeout`` to ``stress_command_timeout``. The
count is the host's (every worker's sessions), so whichever worker holds the idle ones
makes the room.

Stress ends only once the host is a reserve's width under the mark (below 800, here), not
as soon as it dips under it: shedding leaves the count just under the mark, and a flood
keeps pushing it back, so ending at the mark would switch the short timeouts on and off
with every connection. Each worker looks at the count for itself, now and then; one that
finds the host between the two marks while another worker is in stress joins it, so that
a worker that looked only after the others had shed back under the mark is in stress too.

The reserve is ``max_connections`` times the share above ``stress_at``, rounded down. When
that is not even one place (``max_connections`` under 10 at 90 %, or ``stress_at = 100``),
there is no stress mode: with so few places, the oldest idle session is as likely a real
client as the newcomer, and ``max_connections`` alone decides (421 4.3.2 to the newcomer).
"""

from __future__ import annotations


def reserve(max_connections: int, stress_at: int) -> int:
    """Places kept free for newcomers: the part of ``max_connections`` above ``stress_at`` %."""
    return max_connections * (100 - stress_at) // 100


class Gauge:
    """Whether the host is in stress, from its session count, with the hysteresis above."""

    def __init__(self, max_connections: int, stress_at: int) -> None:
        kept = reserve(max_connections, stress_at)
        #: Sessions from which the host is in stress; None: no stress mode (no reserve).
        self.mark: int | None = max_connections - kept if kept >= 1 else None
        #: Under this many sessions, stress ends.
        self.leave = max_connections - 2 * kept
        self.stressed = False

    def update(self, sessions: int, elsewhere: bool = False) -> bool:
        """The host holds ``sessions`` now (and another worker is in stress, or not): in stress?"""
        if self.mark is None:
            return False
        if sessions >= self.mark:
            self.stressed = True
        elif sessions < self.leave:
            self.stressed = False
        elif elsewhere:
            self.stressed = True
        return self.stressed

    def excess(self, sessions: int) -> int:
        """Sessions to shed to get the host under the mark again (0 when under it)."""
        if self.mark is None or sessions < self.mark:
            return 0
        return sessions - self.mark + 1


def command_timeout(normal: float, stressed: bool, in_stress: float) -> float:
    """The wait for a command: ``in_stress`` while stressed, if shorter."""
    return min(normal, in_stress) if stressed else normal

"""When each queued message is next due: a map with a heap beside it, for the queue runner.

Owns ``Schedule``: ``set(id, when)`` (``None``: held, never due), ``pop(id)``, ``take_due(now, limit)``
(the ids whose time has come, soonest first, taken out of the heap) and ``next_time()``.
The map is the truth; the heap may hold stale entries (an id rescheduled or removed),
skipped when they surface, so every operation is O(log n) however large the queue.
Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import heapq

__all__ = ["Schedule"]


class Schedule:
    def __init__(self) -> None:
        self.when: dict[str, float | None] = {}
        self._heap: list[tuple[float, str]] = []

    def __contains__(self, message_id: object) -> bool:
        return message_id in self.when

    def __len__(self) -> int:
        return len(self.when)

    def ids(self) -> set[str]:
        return set(self.when)

    def get(self, message_id: str) -> float | None:
        return self.when.get(message_id)

    def set(self, message_id: str, when: float | None) -> None:
        self.when[message_id] = when
        if when is not None:
            heapq.heappush(self._heap, (when, message_id))

    def pop(self, message_id: str) -> None:
        self.when.pop(message_id, None)

    def _clean_top(self) -> None:
        heap = self._heap
        while heap and self.when.get(heap[0][1], -1.0) != heap[0][0]:
            heapq.heappop(heap)

    def next_time(self) -> float | None:
        """When the soonest message is due; None if none is (empty, or all held)."""
        self._clean_top()
        return self._heap[0][0] if self._heap else None

    def take_due(self, now: float, limit: int) -> list[str]:
        """Up to ``limit`` ids due by ``now``, soonest first, out of the heap (``set`` them again)."""
        taken: list[str] = []
        while len(taken) < limit:
            self._clean_top()
            if not self._heap or self._heap[0][0] > now:
                break
            taken.append(heapq.heappop(self._heap)[1])
        return taken

"""Reusable connections to next hops: ``Pool``, bounded per route (or destination), per worker.

Owns which ``Downstream`` a hand-off gets: a live idle one (RSET proves it), else a new
one to the route's first server that answers; and how many may be open at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from gevent.lock import BoundedSemaphore

from .relay_routes import Route
from .smtp_downstream import ClientOptions, Downstream, DownstreamError, TlsFailure


class Pool:
    """Up to ``size`` connections per route, open at once; idle ones are kept for reuse.

    A new connection goes to the route's first server that answers (failover); an idle
    one is reused whichever server it leads to, until it dies or idles out.

    A reused connection is reset (RSET) first, which also proves it alive; a dead one is
    dropped and the next (or a new one) taken. Nothing per session lives here. When all
    ``size`` connections of a route are busy, a caller waits up to ``wait`` seconds.
    """

    def __init__(self, options: ClientOptions, size: int = 10, wait: float = 10.0,
                 idle_timeout: float = 60.0) -> None:
        self.options, self.size, self.wait, self.idle_timeout = options, size, wait, idle_timeout
        self._idle: dict[object, list[Downstream]] = {}
        self._slots: dict[object, BoundedSemaphore] = {}
        self.opened = 0  #: connections opened so far (for tests and logs)

    @contextmanager
    def connection(self, route: Route, key: object = None) -> Iterator[Downstream]:
        """A connection for ``route``; ``key`` (default: the route) names the destination whose
        ``size`` slots and idle connections it takes (the outbound queue: the recipient domain)."""
        key = route if key is None else (key, route)
        slots = self._slots.setdefault(key, BoundedSemaphore(self.size))
        if not slots.acquire(timeout=self.wait):
            raise DownstreamError(f"all {self.size} connections to {route.where} busy for {self.wait}s")
        downstream: Downstream | None = None
        try:
            downstream = self._reuse(key) or self._open(route)
            yield downstream
        except BaseException:
            if downstream is not None:
                downstream.close()  # in an unknown state: never reuse
                downstream = None
            raise
        finally:
            if downstream is not None:
                if downstream.reusable and downstream.smtp is not None:
                    downstream.idle_since = time.monotonic()
                    self._idle.setdefault(key, []).append(downstream)
                else:
                    downstream.quit()
            slots.release()

    def _open(self, route: Route) -> Downstream:
        """A new connection to the first of the route's servers that can be reached."""
        failures: list[DownstreamError] = []
        for hop in route.hops:
            self.opened += 1
            try:
                return Downstream(hop, self.options).open()
            except DownstreamError as error:
                failures.append(error)
        # Every server answered and lacked the TLS asked for: say so (REQUIRETLS fails on it;
        # one that could not be reached might have had it, so that stays only temporary).
        tls_only = bool(failures) and all(isinstance(f, TlsFailure) for f in failures)
        raise (TlsFailure if tls_only else DownstreamError)("; ".join(map(str, failures)))

    def _reuse(self, key: object) -> Downstream | None:
        idle = self._idle.get(key, [])
        now = time.monotonic()
        for stale in [d for d in idle if now - d.idle_since > self.idle_timeout]:
            idle.remove(stale)
            stale.close()
        while idle:
            downstream = idle.pop()  # the most recently used is the likeliest alive
            if downstream.reset():
                return downstream
        return None

    def idle(self, route: Route) -> int:
        return len(self._idle.get(route, []))

    def close(self) -> None:
        for idle in self._idle.values():
            for downstream in idle:
                downstream.quit()
        self._idle.clear()


__all__ = ["Pool"]

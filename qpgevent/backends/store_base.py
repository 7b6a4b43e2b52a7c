"""The state store's contract, whatever the backend: values, counters, windows, leases.

Policy plugins (greylisting, karma, limit) keep state that must hold across the worker
processes of a host, and with Redis across hosts. This module owns what they may ask
of it, and the behaviour common to every backend:

- ``get`` / ``set`` / ``delete``: string values with an optional time to live;
- ``incr``: an atomic counter whose TTL each increment renews;
- ``hit``: an exact sliding-window rate: count one event under a key unless ``limit``
  events happened in the last ``window`` seconds (refused events are not recorded, so
  a key never holds more than ``limit`` entries);
- ``acquire`` / ``release``: leases, i.e. concurrency slots with a TTL. A heartbeat
  greenlet renews the leases its process holds every ``ttl / 3`` seconds; the leases
  of a process that dies (kill -9, power loss) are not renewed and lapse within the
  TTL, so a crash never leaks a slot.
- a circuit breaker: after a failure every call fails fast with ``StoreUnavailable``
  for ``retry`` seconds, then the backend is tried again. A plugin turns the error
  into the configured fail mode (``qpgevent.store.degraded``); nothing crashes.
- fork safety: a process that finds it was forked drops the parent's connections,
  threads and leases, and opens its own on first use;
- for the operator (``qpgevent store``, not for plugins): ``entries`` lists what lives
  under a key prefix as ``Entry`` values, ``forget`` removes everything under one key.

Backends implement the ``_do_*`` methods and ``_execute``; all keys get ``prefix``.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import gevent

log = logging.getLogger("qpgevent.store")

#: Leases renewed per backend call by the heartbeat (keeps each call short).
REFRESH_BATCH = 500
_HOST = os.uname().nodename


class StoreUnavailable(Exception):
    """The backend cannot be reached or did not answer in time; the decision is degraded."""


@dataclass(eq=False)
class Lease:
    """One held concurrency slot. ``release`` it when done; a dead holder's lapses on its own."""

    key: str  #: the store key, prefix included
    token: str  #: unique to this slot
    ttl: float  #: seconds it lives without a heartbeat
    released: bool = False


@dataclass(frozen=True)
class Entry:
    """One live key of the store as the operator sees it (``qpgevent store list``)."""

    key: str  #: without the store's prefix: "karma:penalty:192.0.2.1"
    kind: str  #: "value" (set, incr), "events" (hit: a rate window) or "leases" (acquire)
    value: str | None  #: a value's text; None for events and leases
    count: int  #: events in the window, or live leases; 1 for a value
    expires: float | None  #: when it lapses (Unix time; None: never)

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "value": self.value, "count": self.count,
                "expires": self.expires}


class Store:
    backend = "none"

    def __init__(self, *, prefix: str = "qpgevent:", retry: float = 1.0, lease_ttl: float = 30.0) -> None:
        self.prefix = prefix
        self.retry = retry
        self.lease_ttl = lease_ttl
        #: operations, failures (the backend failed), fast_failures (refused while down)
        self.stats: collections.Counter[str] = collections.Counter()
        self._retry_at = 0.0
        self._down_since: float | None = None
        self._pid = os.getpid()
        self._held: dict[str, Lease] = {}
        self._heartbeat: gevent.Greenlet | None = None
        self._tokens = 0

    # -- the interface -------------------------------------------------------
    def get(self, key: str) -> str | None:
        return self._call(self._do_get, self.prefix + key)

    def set(self, key: str, value: str, ttl: float | None = None) -> None:
        self._call(self._do_set, self.prefix + key, str(value), ttl)

    def delete(self, key: str) -> None:
        self._call(self._do_delete, self.prefix + key)

    def incr(self, key: str, amount: int = 1, ttl: float | None = None) -> int:
        """Add ``amount``; the new value. ``ttl``: the counter lapses this long after the last change."""
        return int(self._call(self._do_incr, self.prefix + key, amount, ttl))

    def hit(self, key: str, limit: int, window: float) -> int:
        """Events under ``key`` in the last ``window`` seconds, this one included.

        The event is recorded only while that number stays within ``limit``: a result
        above ``limit`` means "refuse", and costs no storage.
        """
        return int(self._call(self._do_hit, self.prefix + key, limit, window))

    def count(self, key: str, window: float) -> int:
        """Events under ``key`` in the last ``window`` seconds (nothing recorded)."""
        return int(self._call(self._do_count, self.prefix + key, window))

    def acquire(self, key: str, limit: int, ttl: float | None = None) -> Lease | None:
        """One of ``limit`` slots under ``key``, or None when all are taken by live holders."""
        ttl = ttl or self.lease_ttl
        lease = Lease(self.prefix + key, self._new_token(), ttl)
        if not self._call(self._do_acquire, lease, limit):
            return None
        self._held[lease.token] = lease
        if self._heartbeat is None or self._heartbeat.dead:
            self._heartbeat = gevent.spawn(self._beat)
        return lease

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        self._held.pop(lease.token, None)
        self._call(self._do_release, lease)

    def holders(self, key: str) -> int:
        """Live leases under ``key``, from every process and host."""
        return int(self._call(self._do_holders, self.prefix + key))

    def entries(self, prefix: str = "", limit: int = 10000) -> list[Entry]:
        """The live entries whose key starts with ``prefix``, by key; at most ``limit`` of them."""
        found = self._call(self._do_entries, self.prefix + prefix, limit, False)
        return sorted((self._unprefixed(entry) for entry in found), key=lambda e: (e.key, e.kind))[:limit]

    def entry(self, key: str) -> list[Entry]:
        """What lives under exactly ``key`` (none, or one entry per kind)."""
        return [self._unprefixed(entry) for entry in self._call(self._do_entries, self.prefix + key, 1, True)]

    def forget(self, key: str) -> int:
        """Remove everything under ``key`` (value, events, leases); how many entries went."""
        return int(self._call(self._do_forget, self.prefix + key))

    def _unprefixed(self, entry: Entry) -> Entry:
        return Entry(entry.key[len(self.prefix):], entry.kind, entry.value, entry.count, entry.expires)

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def close(self) -> None:
        """Stop the heartbeat and close connections (leases still held simply lapse)."""
        if self._heartbeat is not None:
            self._heartbeat.kill(block=False)
            self._heartbeat = None
        self._held.clear()
        if self._pid == os.getpid():
            self._do_close()

    # -- the common machinery ------------------------------------------------
    def _call(self, function: Callable[..., Any], *args: Any) -> Any:
        self._check_fork()
        self.stats["operations"] += 1
        if self._retry_at and time.monotonic() < self._retry_at:
            self.stats["fast_failures"] += 1
            raise StoreUnavailable(f"{self.backend} store unavailable (retrying in "
                                   f"{self._retry_at - time.monotonic():.1f}s)")
        try:
            result = self._execute(function, *args)
        except StoreUnavailable as error:
            self._failed(error, trip=getattr(error, "trip", True))
            raise
        if self._down_since is not None:
            log.warning("%s store is back after %.1fs", self.backend, time.monotonic() - self._down_since)
            self._down_since = None
        self._retry_at = 0.0
        return result

    def _failed(self, error: StoreUnavailable, trip: bool) -> None:
        self.stats["failures"] += 1
        if not trip:
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("%s store unavailable: %s; calls fail fast for %ss at a time until it is back",
                      self.backend, error, self.retry)
        self._retry_at = time.monotonic() + self.retry

    def _check_fork(self) -> None:
        pid = os.getpid()
        if pid == self._pid:
            return
        # A forked worker: the parent's connections, threads and leases are not ours.
        self._pid = pid
        self._held = {}
        self._heartbeat = None
        self._retry_at, self._down_since = 0.0, None
        self.stats.clear()
        self._after_fork()

    def _new_token(self) -> str:
        self._tokens += 1
        return f"{_HOST}:{os.getpid()}:{self._tokens}:{os.urandom(4).hex()}"

    def _beat(self) -> None:
        """Renew the leases this process holds, every third of the shortest TTL, while any are held."""
        while self._held and self._pid == os.getpid():
            gevent.sleep(min(lease.ttl for lease in self._held.values()) / 3)
            held = list(self._held.values())
            for start in range(0, len(held), REFRESH_BATCH):
                try:
                    self._call(self._do_refresh, held[start:start + REFRESH_BATCH])
                except StoreUnavailable as error:
                    log.debug("lease heartbeat failed: %s", error)
                    break

    # -- what a backend provides ----------------------------------------------
    def _execute(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run one backend operation; raise StoreUnavailable for any backend failure."""
        raise NotImplementedError

    def _after_fork(self) -> None:
        raise NotImplementedError

    def _do_close(self) -> None:
        raise NotImplementedError

    _do_get: Callable[..., Any]
    _do_set: Callable[..., Any]
    _do_delete: Callable[..., Any]
    _do_incr: Callable[..., Any]
    _do_hit: Callable[..., Any]
    _do_count: Callable[..., Any]
    _do_acquire: Callable[..., Any]
    _do_refresh: Callable[..., Any]
    _do_release: Callable[..., Any]
    _do_holders: Callable[..., Any]
    #: (full prefix or key, limit, exact) -> the Entry values found, keys with the prefix.
    _do_entries: Callable[..., Any]
    _do_forget: Callable[..., Any]


__all__ = ["Store", "Lease", "Entry", "StoreUnavailable", "REFRESH_BATCH"]

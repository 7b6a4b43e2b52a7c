"""The shared state store plugins use: configured once per server, one per process.

``[store]`` in qpsmtpd.ini picks the backend, and the server calls ``configure`` with
it at start. Nothing is opened then: a process opens its connection (SQLite file or
Redis pool) on its first call, so a worker forked afterwards gets its own. Plugins
call ``store.default()`` in their hooks::

    from qpgevent import store

    try:
        if store.default().hit(f"rate:{ip}", 10, 60) > 10:
            return DENYSOFT, "too many connections, slow down"
    except store.StoreUnavailable as error:
        return store.degraded(self, error)

The operations (``get``/``set``/``delete``/``incr``, sliding windows with ``hit``,
leases with ``acquire``/``release``) are documented in ``qpgevent.backends.store_base``.

Degraded mode: when the backend cannot be reached, every operation raises
``StoreUnavailable`` (at once, while the circuit breaker is open), and ``degraded``
turns that into the decision ``[store] fail`` asks for: ``open`` (the check passes;
mail keeps flowing unchecked) or ``temp`` (a 4xx, try again later). Each degraded
decision is logged by the plugin that took it and counted in ``stats()``; the
store logs once when it goes down and once when it is back.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from ..plugin import DECLINED, DENYSOFT, Plugin
from .store_base import Lease, Store, StoreUnavailable
from .store_sqlite import EmbeddedStore

__all__ = ["Store", "Lease", "StoreUnavailable", "EmbeddedStore", "configure", "default",
           "set_default", "degraded", "stats", "open_store", "FAIL_MESSAGE"]

log = logging.getLogger("qpgevent.store")

#: The reply text of a ``fail = temp`` refusal (the reply table picks 4xx by hook).
FAIL_MESSAGE = "4.3.0 Temporary policy failure, please try again later"

_default: Store | None = None
_fail = "open"
_degraded: collections.Counter[str] = collections.Counter()


def open_store(backend: str = "embedded", *, path: str = "store.sqlite",
               url: str = "redis://127.0.0.1:6379/0", prefix: str = "qpgevent:", timeout: float = 1.0,
               retry: float = 1.0, lease_ttl: float = 30.0, pool_size: int = 50,
               sentinels: list[str] | tuple[str, ...] = (), sentinel_master: str = "mymaster") -> Store:
    """A new store (nothing is connected until its first call)."""
    common = {"prefix": prefix, "retry": retry, "lease_ttl": lease_ttl}
    if backend == "embedded":
        return EmbeddedStore(path, timeout=timeout, **common)
    if backend == "redis":
        try:
            from .store_redis import RedisStore
        except ImportError as error:
            raise ValueError(f"[store] backend = redis needs the redis package "
                             f"(pip install 'qpgevent[redis]'): {error}") from None
        return RedisStore(url, timeout=timeout, pool_size=pool_size, sentinels=sentinels,
                          sentinel_master=sentinel_master, **common)
    raise ValueError(f"unknown store backend {backend!r} (embedded or redis)")


def configure(backend: str = "embedded", fail: str = "open", **options: Any) -> Store:
    """Make the process-wide store from the ``[store]`` options; the one it replaces is closed."""
    global _fail
    store = open_store(backend, **options)
    _fail = fail
    previous = set_default(store)
    if previous is not None and previous is not store:
        previous.close()
    return store


def default() -> Store:
    """The process-wide store; an embedded one in the current folder if none was configured."""
    global _default
    if _default is None:
        _default = EmbeddedStore("store.sqlite")
    return _default


def set_default(store: Store | None) -> Store | None:
    """Install ``store`` as the process-wide one; returns the previous one (for tests)."""
    global _default
    previous, _default = _default, store
    return previous


def degraded(plugin: Plugin, error: StoreUnavailable) -> Any:
    """The decision a plugin returns when the store failed it: ``[store] fail`` says which."""
    _degraded[plugin.name] += 1
    if _fail == "temp":
        plugin.log.warning("store unavailable, refusing temporarily: %s", error)
        return DENYSOFT, FAIL_MESSAGE
    plugin.log.warning("store unavailable, check skipped (fail open): %s", error)
    return DECLINED


def stats() -> dict[str, Any]:
    """Counters for metrics: the default store's operations and failures, degraded decisions."""
    store = default()
    return {"backend": store.backend, "down": store.is_down, **store.stats,
            "degraded": sum(_degraded.values()), "degraded_by_plugin": dict(_degraded)}

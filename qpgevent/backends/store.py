"""The shared state store plugins use: one per server, from its ``[store]``.

``[store]`` in qpsmtpd.ini picks the backend; each server builds its ``Service`` (the
store, and what a failure of it means) with ``from_options`` and makes it current in
each session's context (``bind``; ``with store.use(service):`` for a block), so two
servers in one process keep apart. Nothing is opened when it is built: a process opens
its connection (SQLite file or Redis pool) on its first call, so a worker forked
afterwards gets its own. Plugins call ``store.default()`` in their hooks::

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
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any

from ..core.scope import Scoped
from ..plugin import DECLINED, DENYSOFT, Plugin
from .store_base import Lease, Store, StoreUnavailable
from .store_sqlite import EmbeddedStore

__all__ = ["Store", "Lease", "StoreUnavailable", "EmbeddedStore", "Service", "from_options", "default",
           "current", "use", "bind", "degraded", "stats", "open_store", "FAIL_MESSAGE"]

log = logging.getLogger("qpgevent.store")

#: The reply text of a ``fail = temp`` refusal (the reply table picks 4xx by hook).
FAIL_MESSAGE = "4.3.0 Temporary policy failure, please try again later"



@dataclass(eq=False)
class Service:
    """One server's store, what its failure means (``[store] fail``: open or temp), and the
    degraded decisions its plugins took, by plugin."""

    store: Store
    fail: str = "open"
    degraded: collections.Counter[str] = field(default_factory=collections.Counter)


#: The service of the server whose session runs in this context (see qpgevent.dns: the same rule).
_current: contextvars.ContextVar[Service | None] = contextvars.ContextVar("qpgevent_store", default=None)
_fallback: Service | None = None


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


def from_options(backend: str = "embedded", fail: str = "open", **options: Any) -> Service:
    """A server's store service from its ``[store]`` options (nothing is connected yet)."""
    return Service(open_store(backend, **options), fail)


def current() -> Service:
    """The store service in use here: the current server's; outside any, an embedded store
    in the current folder (made on first use)."""
    global _fallback
    service = _current.get()
    if service is not None:
        return service
    if _fallback is None:
        _fallback = Service(EmbeddedStore("store.sqlite"))
    return _fallback


def default() -> Store:
    """The store of the server running this session (what plugins call)."""
    return current().store


def bind(service: Service | None) -> None:
    """Make ``service`` current for the rest of this context (a session's greenlet)."""
    _current.set(service)


def use(service: Service) -> Scoped[Service]:
    """``with store.use(service):`` the module-level calls inside use ``service``."""
    return Scoped(_current, service)


def degraded(plugin: Plugin, error: StoreUnavailable) -> Any:
    """The decision a plugin returns when the store failed it: ``[store] fail`` says which."""
    service = current()
    service.degraded[plugin.name] += 1
    if service.fail == "temp":
        plugin.log.warning("store unavailable, refusing temporarily: %s", error)
        return DENYSOFT, FAIL_MESSAGE
    plugin.log.warning("store unavailable, check skipped (fail open): %s", error)
    return DECLINED


def stats(service: Service | None = None) -> dict[str, Any]:
    """Counters for metrics: a store's operations and failures, degraded decisions (the current one's)."""
    service = service or current()
    store = service.store
    return {"backend": store.backend, "down": store.is_down, **store.stats,
            "degraded": sum(service.degraded.values()), "degraded_by_plugin": dict(service.degraded)}

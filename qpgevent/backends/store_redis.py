"""The Redis store: state shared by every worker of every host behind a balancer.

One bounded connection pool per worker process (redis-py's ``BlockingConnectionPool``,
re-made after a fork), socket and connect timeouts, and no client-side retries: a
failed call raises ``StoreUnavailable`` at once, and the circuit breaker of
``store_base`` decides when to try again. Sockets are cooperative under gevent, so
a slow Redis never blocks the hub.

With Sentinel (``[store] sentinels``), the pool asks the Sentinels for the primary each
time it opens a connection. After a failed call every pooled connection is dropped, so
the call after the circuit breaker's pause reaches whichever server the Sentinels name
then: a failover is followed without a restart, and in the meantime the plugins follow
``[store] fail``. Retrying inside one call would not help: redis-py reconnects to the
stale address there (redis/redis-py#3874).

Windows and leases run as Lua scripts, atomic on the server, and take their clock
from Redis (``TIME``), so hosts with skewed clocks still agree:

- a window is a sorted set of events scored by time (microseconds); old ones are
  trimmed on each hit, and the key expires with its window;
- a lease key is a sorted set of tokens scored by expiry (milliseconds); lapsed
  tokens are trimmed before counting, the heartbeat pushes the scores of live ones
  forward (``ZADD XX``: a lease already trimmed is not brought back), and the key
  itself expires once no lease in it can be alive.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Callable

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from .store_base import Entry, Lease, Store, StoreUnavailable

# Redis 5 and 6 need this before a script writes after TIME; Redis 7 always does it.
_EFFECTS = "if redis.replicate_commands then redis.replicate_commands() end\n"

_NOW_MS = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

_EXTEND = """
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

HIT = _EFFECTS + """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
end
return count + 1
"""

COUNT = """
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
return redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')
"""

ACQUIRE = _EFFECTS + _NOW_MS + _EXTEND + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
extend(KEYS[1], tonumber(ARGV[2]))
return 1
"""

REFRESH = _EFFECTS + _NOW_MS + _EXTEND + """
for i, key in ipairs(KEYS) do
  local ms = tonumber(ARGV[2 * i])
  redis.call('ZADD', key, 'XX', now + ms, ARGV[2 * i - 1])
  extend(key, ms)
end
return #KEYS
"""

HOLDERS = _NOW_MS + "return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')\n"

#: The pools' own words when every connection is busy: load, not an outage.
_POOL_EXHAUSTED = {"No connection available.", "Too many connections"}


class RedisStore(Store):
    backend = "redis"

    def __init__(self, url: str, *, timeout: float = 1.0, pool_size: int = 50,
                 sentinels: list[str] | tuple[str, ...] = (), sentinel_master: str = "mymaster",
                 **options: Any) -> None:
        super().__init__(**options)
        self.url = url
        self.timeout = timeout
        self.pool_size = pool_size
        #: ``host:port`` of each Sentinel; empty: ``url`` names the server itself.
        self.sentinels = [_host_port(address) for address in sentinels]
        self.sentinel_master = sentinel_master
        self._connect()

    def _connect(self) -> None:
        timeouts = {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout}
        if self.sentinels:
            # The url still gives the database, user and password of the primary.
            server = {key: value for key, value in parse_url(self.url).items()
                      if key in ("db", "username", "password")}
            sentinel = Sentinel(self.sentinels, sentinel_kwargs=dict(timeouts), **timeouts)
            self._pool = SentinelConnectionPool(
                self.sentinel_master, sentinel, max_connections=self.pool_size,
                retry=Retry(NoBackoff(), 0), decode_responses=True, **server, **timeouts)
        else:
            # Waiting for a free pooled connection is bounded too, a little longer than a call.
            self._pool = redis.BlockingConnectionPool.from_url(
                self.url, max_connections=self.pool_size, timeout=self.timeout * 2,
                retry=Retry(NoBackoff(), 0), decode_responses=True, **timeouts)
        self._redis = redis.Redis(connection_pool=self._pool, retry=Retry(NoBackoff(), 0))
        self._hit = self._redis.register_script(HIT)
        self._count = self._redis.register_script(COUNT)
        self._acquire = self._redis.register_script(ACQUIRE)
        self._refresh = self._redis.register_script(REFRESH)
        self._holders = self._redis.register_script(HOLDERS)

    def _execute(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except redis.RedisError as error:
            where = f"Sentinel {self.sentinel_master}" if self.sentinels else self.url
            unavailable = StoreUnavailable(f"{where}: {type(error).__name__}: {error}")
            unavailable.trip = str(error) not in _POOL_EXHAUSTED  # type: ignore[attr-defined]
            if self.sentinels and unavailable.trip:  # type: ignore[attr-defined]
                # The primary may have moved: no pooled connection keeps the old address.
                self._pool.disconnect()
            raise unavailable from None

    def _after_fork(self) -> None:
        # redis-py also notices a fork, but a pool of our own per process is plainer.
        self._connect()

    def _do_close(self) -> None:
        self._pool.disconnect()

    # -- operations ------------------------------------------------------------
    def _do_get(self, key: str) -> str | None:
        return self._redis.get(key)

    def _do_set(self, key: str, value: str, ttl: float | None) -> None:
        self._redis.set(key, value, px=_ms(ttl) if ttl else None)

    def _do_delete(self, key: str) -> None:
        self._redis.delete(key)

    def _do_incr(self, key: str, amount: int, ttl: float | None) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.incrby(key, amount)
        if ttl:
            pipe.pexpire(key, _ms(ttl))
        return pipe.execute()[0]

    def _do_hit(self, key: str, limit: int, window: float) -> int:
        member = f"{os.getpid()}:{os.urandom(6).hex()}"
        return self._hit(keys=[key], args=[limit, max(1, round(window * 1_000_000)), member])

    def _do_count(self, key: str, window: float) -> int:
        return self._count(keys=[key], args=[max(1, round(window * 1_000_000))])

    def _do_acquire(self, lease: Lease, limit: int) -> bool:
        return bool(self._acquire(keys=[lease.key], args=[limit, _ms(lease.ttl), lease.token]))

    def _do_refresh(self, leases: list[Lease]) -> None:
        args: list[Any] = []
        for lease in leases:
            args += [lease.token, _ms(lease.ttl)]
        self._refresh(keys=[lease.key for lease in leases], args=args)

    def _do_release(self, lease: Lease) -> None:
        self._redis.zrem(lease.key, lease.token)

    def _do_holders(self, key: str) -> int:
        return self._holders(keys=[key])

    # -- for the operator --------------------------------------------------------
    def _do_entries(self, prefix: str, limit: int, exact: bool) -> list[Entry]:
        if exact:
            keys = [prefix]
        else:  # SCAN walks the keyspace in bounded steps: no KEYS on a live server
            keys = []
            for key in self._redis.scan_iter(match=_glob_escape(prefix) + "*", count=1000):
                keys.append(key)
                if len(keys) >= limit:
                    break
        found = []
        now = time.time()
        for key in keys:
            entry = self._describe(key, now)
            if entry is not None:
                found.append(entry)
        return found

    def _describe(self, key: str, now: float) -> Entry | None:
        kind = self._redis.type(key)
        ttl_ms = self._redis.pttl(key)
        expires = now + ttl_ms / 1000 if ttl_ms > 0 else None
        if kind == "string":
            value = self._redis.get(key)
            return None if value is None else Entry(key, "value", value, 1, expires)
        if kind != "zset":
            return None  # not one of ours: the prefix is shared with something else
        last = self._redis.zrange(key, -1, -1, withscores=True)
        if not last:
            return None
        # Windows score events by time in microseconds (~1.7e15), leases by expiry in
        # milliseconds (~1.7e12): the scale tells them apart.
        if last[0][1] > 1e14:
            return Entry(key, "events", None, self._redis.zcard(key), expires)
        seconds, micros = self._redis.time()
        live = self._redis.zcount(key, f"({seconds * 1000 + micros // 1000}", "+inf")
        return Entry(key, "leases", None, live, expires) if live else None

    def _do_forget(self, key: str) -> int:
        return int(self._redis.delete(key))


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN pattern (greylisting keys hold ``<`` ``>`` ``[``...)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    return host.strip("[]"), int(port)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


__all__ = ["RedisStore"]

"""The Redis store: state shared by every worker of every host behind a balancer.

One bounded connection pool per worker process (redis-py's ``BlockingConnectionPool``,
re-made after a fork), socket and connect timeouts, and no client-side retries: a
failed call raises ``StoreUnavailable`` at once, and the circuit breaker of
``store_base`` decides when to try again. Sockets are cooperative under gevent, so
a slow Redis never blocks the hub.

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
from typing import Any, Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .store_base import Lease, Store, StoreUnavailable

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

#: The pool's own words when every connection is busy: load, not an outage.
_POOL_EXHAUSTED = "No connection available."


class RedisStore(Store):
    backend = "redis"

    def __init__(self, url: str, *, timeout: float = 1.0, pool_size: int = 50, **options: Any) -> None:
        super().__init__(**options)
        self.url = url
        self.timeout = timeout
        self.pool_size = pool_size
        self._connect()

    def _connect(self) -> None:
        # Waiting for a free pooled connection is bounded too, a little longer than a call.
        self._pool = redis.BlockingConnectionPool.from_url(
            self.url, max_connections=self.pool_size, timeout=self.timeout * 2,
            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0), decode_responses=True)
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
            unavailable = StoreUnavailable(f"{self.url}: {type(error).__name__}: {error}")
            unavailable.trip = str(error) != _POOL_EXHAUSTED  # type: ignore[attr-defined]
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


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


__all__ = ["RedisStore"]

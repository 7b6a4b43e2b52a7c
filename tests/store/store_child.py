"""A second process using the store, as another worker would:

    store_child.py hold BACKEND WHERE KEY COUNT TTL   take COUNT leases (limit COUNT), print
                                                      "held N", keep them alive until killed
    store_child.py hit BACKEND WHERE KEY LIMIT N      hit KEY N times (window 60 s), print how
                                                      many hits were allowed

WHERE is the SQLite file or the Redis URL. Run under ``python -m gevent.monkey``, as the
server runs.
"""

import sys

import gevent

from qpgevent.backends.store_redis import RedisStore
from qpgevent.backends.store_sqlite import EmbeddedStore

mode, backend, where, key = sys.argv[1:5]
store = RedisStore(where, timeout=5) if backend == "redis" else EmbeddedStore(where, timeout=5)
if mode == "hold":
    count, ttl = int(sys.argv[5]), float(sys.argv[6])
    leases = [store.acquire(key, count, ttl) for _ in range(count)]
    assert all(leases), leases
    print(f"held {len(leases)}", flush=True)
    gevent.sleep(3600)
else:
    limit, hits = int(sys.argv[5]), int(sys.argv[6])
    print(sum(store.hit(key, limit, 60) <= limit for _ in range(hits)), flush=True)

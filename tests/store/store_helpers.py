"""Helpers of the store tests (a module of its own: conftest modules cannot be imported by name)."""

from __future__ import annotations

from qpgevent.backends.store_redis import RedisStore
from qpgevent.backends.store_sqlite import EmbeddedStore


def make_store(backend: str, request, tmp_path, **options):
    """A fresh store of ``backend``: a new SQLite file, or the flushed session Redis."""
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        if server.process is None:  # a test stopped it and failed before starting it again
            server.start()
        server.flush()
        return RedisStore(server.url, timeout=1.0, **options)
    return EmbeddedStore(str(tmp_path / "store.sqlite"), timeout=1.0, **options)

"""Fixtures for plugin tests that need the shared store: a real redis-server for the
session, and ``policy_server``, the in-process server with a ``[store]`` of each backend
(tests that take ``backend`` run twice: embedded SQLite in tmp_path, and Redis)."""

from __future__ import annotations

import pytest

from qpgevent.testing.redis_server import LoopbackRedis


@pytest.fixture(scope="session")
def redis_server():
    with LoopbackRedis() as server:
        yield server


@pytest.fixture(params=["embedded", "redis"])
def backend(request, tmp_path):
    """The ``[store]`` settings of a fresh store: a new SQLite file, or the flushed Redis."""
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        if server.process is None:  # a test stopped it and failed before starting it again
            server.start()
        server.flush()
        return {"store_backend": "redis", "store_url": server.url}
    return {"store_backend": "embedded", "store_path": str(tmp_path / "store.sqlite")}


@pytest.fixture
def policy_server(make_server, backend):
    """``policy_server(plugins, **settings)``: make_server with the backend's [store]."""

    def make(plugins: str, **settings):
        return make_server(plugins, **{**backend, **settings})

    return make

"""Fixtures for the store tests: a real redis-server for the session, and a store of
each backend (``store`` is parametrized: every test runs on embedded and on Redis)."""

from __future__ import annotations

import pytest

from qpgevent.testing.redis_server import LoopbackRedis
from store_helpers import make_store


@pytest.fixture(scope="session")
def redis_server():
    with LoopbackRedis() as server:
        yield server


@pytest.fixture(params=["embedded", "redis"])
def backend(request):
    return request.param


@pytest.fixture
def store(backend, request, tmp_path):
    made = make_store(backend, request, tmp_path)
    yield made
    made.close()

"""Shared fixtures. `redis_url`: a clean database on a real redis-server started for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from redis_server import RedisServer
from tools.ensure_redis import find_redis_server

REDIS_MISSING = "redis-server not installed: run `python -m tests.tools.ensure_redis` as root"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session (skips where none is installed)."""
    binary = find_redis_server()
    if binary is None:
        pytest.skip(REDIS_MISSING)
    with RedisServer(binary) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, emptied before each test (it may have been stopped by a test)."""
    redis_server.start()
    with redis.Redis.from_url(redis_server.url, socket_timeout=5) as client:
        client.flushall()
    yield redis_server.url

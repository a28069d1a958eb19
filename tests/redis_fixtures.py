"""The real Redis the store and API tests run against, one unique key prefix per test (or module).

``REDIS_TEST_URL`` names it (default: database 15 of a local server). Every fixture here
deletes its prefix's keys afterwards (SCAN + DEL) and closes its connections. Where Redis
cannot be reached the tests skip, except on CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from redis.exceptions import RedisError

from app.settings import Settings
from tools.stack import redis_prefix

REDIS_TEST_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")


def require_redis(url: str = REDIS_TEST_URL) -> None:
    """Skip (fail on CI) unless Redis answers at ``url``."""
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
    try:
        client.ping()
    except (RedisError, OSError) as error:
        reason = f"Redis at {url} is unreachable ({error}); set REDIS_TEST_URL or start redis-server"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    finally:
        client.close()


@dataclass(frozen=True)
class RedisTarget:
    """A Redis database and a key prefix that belongs to one test (or one module) alone."""

    url: str
    prefix: str

    def settings(self, **overrides: Any) -> Settings:
        """Service settings on this Redis and prefix; models are not traced unless asked for."""
        return Settings(**{"redis_url": self.url, "redis_prefix": self.prefix, "compile_models": False, **overrides})

    @contextmanager
    def client(self) -> Iterator[redis.Redis]:
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=2.0)
        try:
            yield client
        finally:
            client.close()

    def keys(self) -> list[str]:
        """Every key under the prefix."""
        with self.client() as client:
            return sorted(key.decode() for key in client.scan_iter(match=f"{self.prefix}:*", count=500))


@contextmanager
def redis_target_scope(url: str = REDIS_TEST_URL) -> Iterator[RedisTarget]:
    require_redis(url)
    with redis_prefix(url, "dmft-test") as prefix:
        yield RedisTarget(url=url, prefix=prefix)


@pytest.fixture
def redis_target() -> Iterator[RedisTarget]:
    """A unique prefix on the test Redis for one test; its keys are deleted afterwards."""
    with redis_target_scope() as target:
        yield target


@pytest.fixture(scope="module")
def module_redis_target() -> Iterator[RedisTarget]:
    """A unique prefix on the test Redis shared by one module's tests (for module-scoped apps)."""
    with redis_target_scope() as target:
        yield target

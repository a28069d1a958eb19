"""The real Redis the store and API tests run against, one unique key prefix per test (or module).

``REDIS_TEST_URL`` names it (default: database 15 of a local server). Every fixture here
deletes its prefix's keys afterwards (SCAN + DEL) and closes its connections. Where Redis
cannot be reached the tests skip, except on CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import RedisError

from app.settings import Settings
from tools.stack import free_port, redis_prefix

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


def redis_server_command(port: int, workdir: Path, *options: str) -> list[str]:
    """Debian's ``redis-server`` on loopback ``port``, without persistence, its files in ``workdir``."""
    executable = shutil.which("redis-server")
    if executable is None:
        reason = "redis-server is not installed"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    workdir.mkdir(parents=True, exist_ok=True)
    return [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir), *options]  # fmt: skip


def wait_for_redis(url: str, process: subprocess.Popen[bytes], *, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            try:
                client.ping()
                return
            except (RedisError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of this test's own, for counting its clients; its URL. Stopped afterwards."""
    port = free_port()
    process = subprocess.Popen(redis_server_command(port, workdir), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

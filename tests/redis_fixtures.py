"""The real Redis and Redis Cluster the store and API tests run against, one unique key prefix per test (or module).

``REDIS_TEST_URL`` names the Redis (default: database 15 of a local server).
``REDIS_CLUSTER_TEST_URL`` names the cluster (``.ci/run`` starts one, three masters on
127.0.0.1:7101-7103); without it the test session starts a three-master cluster of its own
from ``redis-server``. Every fixture here deletes its prefix's keys afterwards (SCAN + DEL)
and closes its connections. Where Redis cannot be reached the tests skip, except on CI
(``CI=true``), where that is a failure.
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
from typing import Any, NoReturn

import pytest
import redis
from redis.exceptions import RedisError

from app.settings import Settings
from tools.redis_cluster import free_node_ports, run_redis_cluster, sync_client
from tools.stack import free_port, redis_prefix

REDIS_TEST_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/15")
REDIS_CLUSTER_TEST_URL = os.environ.get("REDIS_CLUSTER_TEST_URL")
CLUSTER_MASTERS = 3


def skip_or_fail(reason: str) -> NoReturn:
    """Skip, except on CI, where a missing service is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_redis(url: str = REDIS_TEST_URL) -> None:
    """Skip (fail on CI) unless Redis answers at ``url``."""
    client = sync_client(url)
    try:
        client.ping()
    except (RedisError, OSError) as error:
        skip_or_fail(f"Redis at {url} is unreachable ({error}); set REDIS_TEST_URL or start redis-server")
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
    def client(self) -> Iterator[redis.Redis | redis.RedisCluster]:
        client = sync_client(self.url)
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


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test Redis Cluster's URL: ``REDIS_CLUSTER_TEST_URL``, else a cluster of this test session's own."""
    if REDIS_CLUSTER_TEST_URL:
        require_redis(REDIS_CLUSTER_TEST_URL)
        yield REDIS_CLUSTER_TEST_URL
        return
    try:
        with run_redis_cluster(tmp_path_factory.mktemp("cluster"), free_node_ports(CLUSTER_MASTERS)) as cluster:
            yield cluster.url
    except FileNotFoundError as error:
        skip_or_fail(f"no Redis Cluster for the tests: {error}")


@pytest.fixture
def cluster_target(redis_cluster_url: str) -> Iterator[RedisTarget]:
    """A unique prefix on the test Redis Cluster for one test; its keys are deleted afterwards."""
    with redis_target_scope(redis_cluster_url) as target:
        yield target


@pytest.fixture(scope="module")
def module_cluster_target(redis_cluster_url: str) -> Iterator[RedisTarget]:
    """A unique prefix on the test Redis Cluster shared by one module's tests."""
    with redis_target_scope(redis_cluster_url) as target:
        yield target


def redis_server_command(port: int, workdir: Path, *options: str) -> list[str]:
    """Debian's ``redis-server`` on loopback ``port``, without persistence, its files in ``workdir``."""
    executable = shutil.which("redis-server")
    if executable is None:
        skip_or_fail("redis-server is not installed")
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

"""Connecting to one Redis or to a Redis Cluster, named by one URL.

``redis://`` and ``rediss://`` (TLS) name one Redis, as redis-py reads them. A cluster is
``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` with TLS):
any of its nodes, and more than one so that start-up does not depend on a single node; the
client learns the rest of the cluster from them and follows its slots as they move.

Either way a process opens ``max_connections`` connections at most (per node of a cluster),
and a request that finds them all busy waits ``pool_timeout_seconds`` for one before failing
as an outage: one Redis through redis-py's blocking pool, a cluster through a gate in front of
its client, whose node pools refuse at once rather than wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

import redis.asyncio as redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
# Short timeouts: an outage should answer 503 quickly, not hang requests.
SOCKET_OPTIONS = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}


@dataclass(frozen=True)
class ClusterAddress:
    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool


def cluster_address(url: str) -> ClusterAddress | None:
    """The nodes and credentials of a cluster URL; None for a URL of one Redis."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.lower() not in CLUSTER_SCHEMES:
        return None
    location = rest.split("/", 1)[0].split("?", 1)[0]
    credentials, _, hosts = location.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    nodes = []
    for node in hosts.split(","):
        host, _, port = node.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a cluster URL lists nodes as host:port, separated by commas; got {node!r}")
        nodes.append((host.strip("[]"), int(port)))
    return ClusterAddress(
        tuple(nodes), unquote(username) or None, unquote(password) or None, CLUSTER_SCHEMES[scheme.lower()]
    )


class ClusterGate:
    """In front of a cluster client: at most ``limit`` requests use it at once, the others wait
    ``timeout_seconds`` for their turn; and it has learnt the cluster's slots before the first does (requests
    racing the client's own first discovery of the cluster fail now and then)."""

    def __init__(self, client: RedisCluster, limit: int, timeout_seconds: float) -> None:
        self._client = client
        self._slots = asyncio.Semaphore(limit)
        self._timeout = timeout_seconds
        self._discovering: asyncio.Task[RedisCluster] | None = None

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError as error:
            raise redis.ConnectionError("No connection available.") from error
        try:
            await self.discovered()
            yield
        finally:
            self._slots.release()

    async def discovered(self) -> None:
        """Once the client knows the cluster's nodes and slots (learnt once, by one task)."""
        discovering = self._discovering
        if discovering is None or (discovering.done() and (discovering.cancelled() or discovering.exception())):
            self._discovering = asyncio.get_running_loop().create_task(self._client.initialize())
        await asyncio.shield(self._discovering)


def connect(
    url: str, *, max_connections: int, pool_timeout_seconds: float
) -> tuple[redis.Redis | RedisCluster, ClusterGate | None]:
    """The client for ``url`` and, for a cluster, the gate its requests pass."""
    address = cluster_address(url)
    if address is None:
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_seconds, **SOCKET_OPTIONS
        )
        return redis.Redis.from_pool(pool), None
    client = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        username=address.username,
        password=address.password,
        ssl=address.tls,
        # One more than the gate admits: the subscriber connection of session news comes from the node's pool.
        max_connections=max_connections + 1,
        **SOCKET_OPTIONS,
    )
    return client, ClusterGate(client, max_connections, pool_timeout_seconds)


def subscriber(url: str, client: redis.Redis | RedisCluster) -> redis.Redis | RedisCluster:
    """The client whose pub/sub carries session news: a cluster's own (it follows slots as they move), or one
    connection of its own beside a single Redis's pool."""
    if isinstance(client, RedisCluster):
        return client
    return redis.Redis.from_url(url, **SOCKET_OPTIONS)

"""Where a session's keys go (its shard, the shard's hash tag) and how a Redis URL names a cluster."""

from __future__ import annotations

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from app.store.redis_client import ClusterAddress, cluster_address
from app.store.redis_store import RedisStore
from app.store.shards import shard_of, shard_tags


def test_shard_tags_of_the_default_sixteen_shards_never_change() -> None:
    """Sessions and their webhook cursors are found under these tags: other tags would strand a deployment's data."""
    assert shard_tags(16) == (
        "s7920", "s28308", "s10209", "s3175", "s45693", "s1683", "s12132", "s66936",
        "s115497", "s23461", "s3313", "s42471", "s4397", "s12799", "s1028", "s12354",
    )  # fmt: skip


@pytest.mark.parametrize("shards", [1, 3, 16, 100, 1024])
def test_shard_tags_spread_their_slots_evenly(shards: int) -> None:
    slots = [key_slot(tag.encode()) for tag in shard_tags(shards)]
    assert slots == [shard * REDIS_CLUSTER_HASH_SLOTS // shards for shard in range(shards)]


def test_sessions_spread_over_the_shards() -> None:
    counts = [0] * 16
    for index in range(16_000):
        counts[shard_of(f"home-{index}", 16)] += 1
    assert min(counts) > 900 and max(counts) < 1100
    assert shard_of("kitchen-1", 16) == shard_of("kitchen-1", 16)


@pytest.mark.parametrize("shards", [0, 16385])
def test_a_shard_count_outside_the_slots_is_refused(shards: int) -> None:
    with pytest.raises(ValueError, match="shards"):
        shard_tags(shards)


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis+cluster://10.0.0.1:7000", ClusterAddress((("10.0.0.1", 7000),), None, None, tls=False)),
        (
            "redis+cluster://10.0.0.1:7000,10.0.0.2:7001/0",
            ClusterAddress((("10.0.0.1", 7000), ("10.0.0.2", 7001)), None, None, tls=False),
        ),
        (
            "rediss+cluster://app:p%40ss@a.example:6379,b.example:6379",
            ClusterAddress((("a.example", 6379), ("b.example", 6379)), "app", "p@ss", tls=True),
        ),
        ("redis+cluster://:secret@[::1]:7000", ClusterAddress((("::1", 7000),), None, "secret", tls=False)),
        ("redis://127.0.0.1:6379/0", None),
        ("rediss://cache.example:6380", None),
    ],
)
def test_a_cluster_url_names_its_nodes_and_credentials(url: str, address: ClusterAddress | None) -> None:
    assert cluster_address(url) == address


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://host", "redis+cluster://a:1,b"])
def test_a_cluster_url_without_host_and_port_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        cluster_address(url)


@pytest.mark.parametrize("prefix", ["dmft{a}", "a}b"])
def test_a_key_prefix_with_braces_is_refused(prefix: str) -> None:
    """Braces in the prefix would make it the hash tag of every key: one slot for the whole deployment."""
    with pytest.raises(ValueError, match="prefix"):
        RedisStore("redis://127.0.0.1:6379/15", prefix=prefix)

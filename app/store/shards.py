"""Sessions spread over a fixed number of shards, each shard's keys in one Redis Cluster hash slot.

A Lua script may only touch keys of one slot in a cluster. A commit writes the session and
queues its transitions for webhooks atomically, and an append keeps the index of active
sessions, so a session's keys live in the slot of its shard, beside that shard's part of the
index and of the outbox: each shard's keys share its hash tag. The shards' tags are chosen so
that their slots are evenly spaced over the 16384, which a cluster's masters divide into
contiguous ranges: every master gets its share of shards.

The shard of a session and the tag of a shard depend on nothing but the session id and the
number of shards, so every process finds the same keys; neither may change while a deployment
keeps data under its prefix.
"""

from __future__ import annotations

import functools
import zlib

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot


def shard_of(session_id: str, shards: int) -> int:
    return zlib.crc32(session_id.encode()) % shards


@functools.cache
def shard_tags(shards: int) -> tuple[str, ...]:
    """For each shard, a short hash tag whose slot is ``shard * 16384 // shards``: the first of ``s0, s1, ...``
    that lands there."""
    if not 1 <= shards <= REDIS_CLUSTER_HASH_SLOTS:
        raise ValueError(f"shards must be between 1 and {REDIS_CLUSTER_HASH_SLOTS}")
    wanted = {shard * REDIS_CLUSTER_HASH_SLOTS // shards: shard for shard in range(shards)}
    tags: dict[int, str] = {}
    candidate = 0
    while len(tags) < shards:
        tag = f"s{candidate}"
        shard = wanted.get(key_slot(tag.encode()))
        if shard is not None and shard not in tags:
            tags[shard] = tag
        candidate += 1
    return tuple(tags[shard] for shard in range(shards))

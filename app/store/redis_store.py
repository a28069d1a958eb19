"""Sessions in Redis or a Redis Cluster: Lua scripts append and commit atomically, with key TTLs for expiry.

Sessions are spread over ``shards`` shards (``app.store.shards``), and every key of a shard
carries its hash tag, so that each script touches the keys of one cluster slot. A session's
keys are ``<prefix>:{<tag>}:session:<id>:meta`` (seq, layout, counters, tracker state),
``:buf`` (one binary float32 field per modality), ``:pred`` (recent predictions, scored by
window index), ``:events`` (a stream: the event log that server-sent events read, its ids
the event ids) and ``:history`` (a list of closed segments); expiry is Redis's own key TTL.
Beside them, the shard's ``<prefix>:{<tag>}:sessions`` (a sorted set, score: last activity)
indexes its active sessions, kept by the append script, and ``<prefix>:{<tag>}:outbox`` (a
stream) queues its sessions' transitions for webhooks. The overview and the active-session
count read every shard's index.

A commit queues its transitions in its shard's outbox in the same script that records them,
once webhook delivery has created the outbox (``open_outbox``), so a transition is never
recorded without being queued, and a session's transitions are queued in order. Webhook
delivery keeps, per target, a lease and the last entry delivered from each shard, under the
tag ``{delivery:<target>}``; its position in the whole outbox is those ids, one per shard,
joined by commas.

The scripts that start, commit and end a session publish on its channel
``<prefix>:{<tag>}:session:<id>:news`` (sharded pub/sub), and a commit that queues transitions on
its shard's ``<prefix>:{<tag>}:outbox:news``; ``RedisNews`` wakes the readers of every process
with them. A reader reads with a short command, never a blocking one, so open event streams
hold no connection of the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.exceptions import AskError, ClusterError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store.base import (
    LAST_ID_PART,
    AppendResult,
    BufferOverflow,
    CommitResult,
    Event,
    EventBatch,
    EventPosition,
    ModalityMismatch,
    OutboxEntry,
    Retention,
    SeqConflict,
    SessionSnapshot,
    SessionStore,
    StoreUnavailable,
    StreamLayout,
    parse_event_id,
)
from app.store.redis_client import connect, subscriber
from app.store.redis_news import RedisNews
from app.store.shards import shard_of, shard_tags
from app.store.wakeups import wait_for_news

SCRIPTS = Path(__file__).parent
# Each script is sent with the shared window arithmetic in front of it.
APPEND_SCRIPT = (SCRIPTS / "windows.lua").read_text() + (SCRIPTS / "append.lua").read_text()
COMMIT_SCRIPT = (SCRIPTS / "windows.lua").read_text() + (SCRIPTS / "commit.lua").read_text()
# Redis unreachable or too slow, and a cluster between two owners of a slot (failing over, resharding): each
# answered 503, and a retry succeeds once the cluster has settled. redis-py's cluster client says that no node
# answers, or that a slot has no owner, with RedisClusterException (SlotNotCoveredError).
OUTAGE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,
    TryAgainError,
    AskError,
    RedisClusterException,
)
EVENT_PAGE = 500  # events read at once
EXPIRY_MARGIN_SECONDS = 0.05  # a reader waiting for a session's expiry looks this long after it is due
# Create the outbox, empty, unless it exists: an entry added and trimmed away at once (Redis keeps
# an empty stream), in one script so that no entry another process queued meanwhile is trimmed.
OPEN_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('XADD', KEYS[1], 'MAXLEN', 0, '*', 'opened', 1) end
"""
# Take or renew the lease (KEYS[1]) for its holder ARGV[1], for ARGV[2] ms; shards without a cursor yet in the
# cursors hash (KEYS[2]) start after ARGV[3]; the cursors of shards 0 .. ARGV[4]-1, in order.
HOLD_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local cursors = {}
for shard = 0, tonumber(ARGV[4]) - 1 do
  redis.call('HSETNX', KEYS[2], shard, ARGV[3])
  cursors[#cursors + 1] = redis.call('HGET', KEYS[2], shard)
end
return cursors
"""
# Move the cursors of shards 0, 1, ... to ARGV[2], ARGV[3], ... while ARGV[1] holds the lease.
ADVANCE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for j = 2, #ARGV do redis.call('HSET', KEYS[2], j - 2, ARGV[j]) end
return 1
"""
# Ending a session removes its keys and its entry in the index, and tells its event readers.
# KEYS: meta, buffers, predictions, events, history, the shard's index; ARGV: the session's id and channel.
DELETE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('SPUBLISH', ARGV[2], 'ended')
return 1
"""
# The session's generation (nil: no session), its time to live in ms, and up to ARGV[2] events after id ARGV[1].
# KEYS: meta, events.
READ_EVENTS_SCRIPT = """
local generation = redis.call('HGET', KEYS[1], 'generation')
if not generation then return {false, 0, {}} end
local entries = {}
if tonumber(ARGV[2]) > 0 then entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+', 'COUNT', ARGV[2]) end
return {generation, redis.call('PTTL', KEYS[1]), entries}
"""
# Sessions of one shard, each its meta hash (flat) and predictions as one commit left them.
# KEYS: meta, predictions of the first session, then of the second ...
SNAPSHOTS_SCRIPT = """
local snapshots = {}
for i = 1, #KEYS, 2 do
  snapshots[#snapshots + 1] = {redis.call('HGETALL', KEYS[i]), redis.call('ZRANGE', KEYS[i + 1], 0, -1)}
end
return snapshots
"""
# The session's generation (nil: no session) and its newest event's id. KEYS: meta, events.
EVENT_POSITION_SCRIPT = """
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return {redis.call('HGET', KEYS[1], 'generation'), newest[1] and newest[1][1] or '0-0'}
"""


@dataclass(frozen=True)
class _SessionKeys:
    meta: str
    buffers: str
    predictions: str
    events: str
    history: str
    index: str  # the shard's
    outbox: str  # the shard's
    news: str  # the session's channel
    outbox_news: str  # the shard outbox's channel

    @property
    def data(self) -> list[str]:
        return [self.meta, self.buffers, self.predictions, self.events, self.history]


class RedisStore(SessionStore):
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "dmft",
        shards: int = 16,
        max_connections: int = 50,
        pool_timeout_seconds: float = 5.0,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("a Redis key prefix may not hold '{' or '}': they would take the shard's hash tag over")
        self._redis, self._gate = connect(
            url, max_connections=max_connections, pool_timeout_seconds=pool_timeout_seconds
        )
        self._subscriber = subscriber(url, self._redis)
        self._news = RedisNews(self._subscriber, OUTAGE, self._gate.discovered if self._gate else None)
        self._prefix = prefix
        self._tags = shard_tags(shards)
        self._append = self._redis.register_script(APPEND_SCRIPT)
        self._commit = self._redis.register_script(COMMIT_SCRIPT)
        self._open = self._redis.register_script(OPEN_SCRIPT)
        self._hold = self._redis.register_script(HOLD_SCRIPT)
        self._advance = self._redis.register_script(ADVANCE_SCRIPT)
        self._delete = self._redis.register_script(DELETE_SCRIPT)
        self._read_events = self._redis.register_script(READ_EVENTS_SCRIPT)
        self._event_position = self._redis.register_script(EVENT_POSITION_SCRIPT)
        self._snapshots = self._redis.register_script(SNAPSHOTS_SCRIPT)

    # --- keys ------------------------------------------------------------------------------------

    def _shard_key(self, shard: int, name: str) -> str:
        return f"{self._prefix}:{{{self._tags[shard]}}}:{name}"

    def _keys(self, session_id: str) -> _SessionKeys:
        shard = shard_of(session_id, len(self._tags))
        session = self._shard_key(shard, f"session:{session_id}")
        outbox = self._shard_key(shard, "outbox")
        return _SessionKeys(
            meta=f"{session}:meta",
            buffers=f"{session}:buf",
            predictions=f"{session}:pred",
            events=f"{session}:events",
            history=f"{session}:history",
            index=self._shard_key(shard, "sessions"),
            outbox=outbox,
            news=f"{session}:news",
            outbox_news=f"{outbox}:news",
        )

    def _delivery_keys(self, target: str) -> list[str]:
        tag = f"{self._prefix}:{{delivery:{target}}}"
        return [f"{tag}:lease", f"{tag}:cursors"]

    # --- talking to Redis ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _using_redis(self) -> AsyncIterator[None]:
        """One request's use of Redis: its turn at a connection, and an outage turned into ``StoreUnavailable``."""
        try:
            if self._gate is None:
                yield
            else:
                async with self._gate.turn():
                    yield
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error

    async def _pipelined(self, queue: Callable[[Pipeline | ClusterPipeline], None]) -> list[Any]:
        """The replies of the commands ``queue`` puts in one pipeline (one round trip per node of a cluster,
        which runs no scripts in pipelines)."""
        async with self._using_redis(), self._redis.pipeline(transaction=False) as pipe:
            queue(pipe)
            return await pipe.execute()

    # --- sessions --------------------------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        *,
        seq: int,
        model: str,
        layout: StreamLayout,
        chunk: dict[str, bytes],
        now: float,
        origin: float,
        ttl_seconds: int,
    ) -> AppendResult:
        keys = self._keys(session_id)
        args: list[str | bytes | int] = [
            seq,
            ttl_seconds * 1000,
            repr(now),
            model,
            json.dumps(layout.to_dict()),
            repr(origin),
            uuid.uuid4().hex,  # the generation, if this chunk starts the session
            keys.news,
            session_id,
        ]
        for name, samples in chunk.items():
            args += [name, samples]
        async with self._using_redis():
            reply = await self._append(keys=[*keys.data, keys.index], args=args)
        status = reply[0].decode()
        if status == "conflict":
            raise SeqConflict(int(reply[1]))
        if status == "modalities":
            raise ModalityMismatch(json.loads(reply[2])["modalities"], reply[1].decode())
        if status == "overflow":
            raise BufferOverflow(reply[1].decode())
        stored = StreamLayout.from_dict(json.loads(reply[3]))
        received, offsets = json.loads(reply[5]), json.loads(reply[6])
        result = AppendResult(
            duplicate=status == "duplicate",
            seq=int(reply[1]),
            model=reply[2].decode(),
            layout=stored,
            started=float(reply[4]),
            generation=reply[10].decode(),
            received={name: int(r) for name, r in zip(stored.modalities, received, strict=True)},
            buffered={name: int(r - o) for name, r, o in zip(stored.modalities, received, offsets, strict=True)},
        )
        result.first_window, result.windows = int(reply[7]), int(reply[8])
        result.tracker = json.loads(reply[9]) if reply[9] else None
        result.spans = dict(zip(stored.modalities, reply[11:], strict=True)) if result.windows else {}
        return result

    async def commit(
        self,
        session_id: str,
        first_window: int,
        predictions: list[dict],
        *,
        generation: str,
        tracker: dict,
        events: list[Event],
        segments: list[dict],
        retention: Retention,
        ttl_seconds: int,
    ) -> CommitResult:
        keys = self._keys(session_id)
        args: list[str | int] = [
            ttl_seconds * 1000,
            retention.predictions,
            first_window,
            _json(tracker),
            retention.events,
            retention.segments,
            math.ceil(retention.outbox / len(self._tags)),  # the outbox's size, shared by its shards
            session_id,
            generation,
            keys.news,
            keys.outbox_news,
            len(predictions),
            *map(_json, predictions),
            len(segments),
            *map(_json, segments),
        ]
        for event in events:
            args += [event.type, event.data]
        async with self._using_redis():
            reply = await self._commit(keys=[*keys.data, keys.outbox], args=args)
        status = reply[0].decode()
        if status == "gone":
            return CommitResult(recorded=[], buffered={})
        if status == "stale":
            return CommitResult(
                recorded=[],
                buffered={},
                stale=True,
                next_window=int(reply[1]),
                tracker=json.loads(reply[2]) if reply[2] else None,
            )
        return CommitResult(
            recorded=list(range(first_window, first_window + len(predictions))),
            buffered={name: int(count) for name, count in json.loads(reply[1]).items()},
            event_ids=[event_id.decode() for event_id in reply[2:]],
            next_window=first_window + len(predictions),
        )

    async def get(self, session_id: str) -> SessionSnapshot | None:
        [snapshot] = await self.get_many([session_id])
        return snapshot

    async def get_many(self, session_ids: list[str]) -> list[SessionSnapshot | None]:
        """One script per shard reads that shard's sessions, the shards at the same time."""
        by_shard: dict[int, list[str]] = {}
        for session_id in dict.fromkeys(session_ids):
            by_shard.setdefault(shard_of(session_id, len(self._tags)), []).append(session_id)

        async def read(ids: list[str]) -> dict[str, SessionSnapshot | None]:
            keys = [
                key for session_id in ids for key in (self._keys(session_id).meta, self._keys(session_id).predictions)
            ]
            async with self._using_redis():
                replies = await self._snapshots(keys=keys)
            return {session_id: _snapshot(*reply) for session_id, reply in zip(ids, replies, strict=True)}

        snapshots: dict[str, SessionSnapshot | None] = {}
        for found in await asyncio.gather(*(read(ids) for ids in by_shard.values())):
            snapshots.update(found)
        return [snapshots[session_id] for session_id in session_ids]

    async def history(self, session_id: str) -> list[dict]:
        async with self._using_redis():
            segments = await self._redis.lrange(self._keys(session_id).history, 0, -1)
        return [json.loads(segment) for segment in segments]

    async def delete(self, session_id: str) -> bool:
        keys = self._keys(session_id)
        async with self._using_redis():
            deleted = await self._delete(keys=[*keys.data, keys.index], args=[session_id, keys.news])
        return deleted > 0

    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int:
        def queue(pipe: Pipeline | ClusterPipeline) -> None:
            for shard in range(len(self._tags)):
                pipe.zcount(self._shard_key(shard, "sessions"), now - ttl_seconds, "+inf")

        return sum(await self._pipelined(queue))

    async def recent_sessions(self, *, now: float, ttl_seconds: int, limit: int) -> list[str]:
        def queue(pipe: Pipeline | ClusterPipeline) -> None:
            for shard in range(len(self._tags)):
                key = self._shard_key(shard, "sessions")
                pipe.zrevrangebyscore(key, "+inf", now - ttl_seconds, start=0, num=limit, withscores=True)

        shards = await self._pipelined(queue)
        newest = heapq.nlargest(limit, (pair for shard in shards for pair in shard), key=lambda pair: pair[1])
        return [session_id.decode() for session_id, _ in newest]

    async def ping(self) -> None:
        async with self._using_redis():
            await self._redis.ping()

    async def close(self) -> None:
        await self._news.close()
        if self._subscriber is not self._redis:
            await self._subscriber.aclose()
        await self._redis.aclose()

    # --- events ----------------------------------------------------------------------------------

    async def event_position(self, session_id: str) -> EventPosition:
        keys = self._keys(session_id)
        async with self._using_redis():
            generation, last_id = await self._event_position(keys=[keys.meta, keys.events])
        return EventPosition(generation.decode() if generation else None, last_id.decode())

    async def read_events(
        self, session_id: str, after: str, *, generation: str | None, wait_seconds: float
    ) -> EventBatch:
        # Nothing can follow the last id there is, and Redis refuses a range that starts after it.
        page = 0 if parse_event_id(after) == (LAST_ID_PART, LAST_ID_PART) else EVENT_PAGE
        keys = self._keys(session_id)
        deadline = time.monotonic() + wait_seconds
        while True:
            async with self._news.watch(keys.news) as news:
                async with self._using_redis():
                    current, ttl_ms, entries = await self._read_events(
                        keys=[keys.meta, keys.events], args=[after, page]
                    )
                current = current.decode() if current else None
                remaining = deadline - time.monotonic()
                if entries or current != generation or remaining <= 0:
                    return EventBatch([_event(entry_id, fields) for entry_id, fields in entries], current)
                if current is not None:  # expiry is news too, though nothing announces it
                    remaining = min(remaining, max(ttl_ms, 0) / 1000 + EXPIRY_MARGIN_SECONDS)
                await wait_for_news(news, remaining)

    # --- the outbox and webhook delivery ---------------------------------------------------------

    def _outbox(self, shard: int) -> str:
        return self._shard_key(shard, "outbox")

    def _positions(self, cursor: str) -> list[str]:
        """One id per shard, from a position in the whole outbox (one id stands for itself in every shard);
        ValueError for anything else."""
        positions = cursor.split(",") if "," in cursor else [cursor] * len(self._tags)
        if len(positions) != len(self._tags):
            raise ValueError(f"an outbox position of {len(self._tags)} shards, not {cursor!r}")
        for position in positions:
            parse_event_id(position)
        return positions

    async def open_outbox(self) -> None:
        async with self._using_redis():
            await asyncio.gather(*(self._open(keys=[self._outbox(shard)]) for shard in range(len(self._tags))))

    async def read_outbox(self, after: str, *, limit: int, wait_seconds: float) -> list[OutboxEntry]:
        positions = self._positions(after)

        def queue(pipe: Pipeline | ClusterPipeline) -> None:
            for shard, position in enumerate(positions):
                pipe.xread({self._outbox(shard): position}, count=limit)

        deadline = time.monotonic() + wait_seconds
        channels = [f"{self._outbox(shard)}:news" for shard in range(len(self._tags))]
        while True:
            async with self._news.watch(*channels) as news:
                replies = await self._pipelined(queue)
                entries = _merged(positions, replies, limit)
                remaining = deadline - time.monotonic()
                if entries or remaining <= 0:
                    return entries
                await wait_for_news(news, remaining)

    async def hold_delivery(self, target: str, owner: str, *, lease_seconds: float, start_after: str) -> str | None:
        parse_event_id(start_after)  # one id, for every shard
        async with self._using_redis():
            cursors = await self._hold(
                keys=self._delivery_keys(target),
                args=[owner, int(lease_seconds * 1000), start_after, len(self._tags)],
            )
        return ",".join(cursor.decode() for cursor in cursors) if cursors else None

    async def advance_delivery(self, target: str, owner: str, outbox_id: str) -> bool:
        positions = self._positions(outbox_id)
        async with self._using_redis():
            return bool(await self._advance(keys=self._delivery_keys(target), args=[owner, *positions]))


def _merged(positions: list[str], replies: list[Any], limit: int) -> list[OutboxEntry]:
    """The oldest ``limit`` entries of all shards (each shard's in order), each with the position after it."""
    read = []
    for shard, reply in enumerate(replies):
        for entry_id, fields in reply[0][1] if reply else []:
            read.append((parse_event_id(entry_id.decode()), shard, entry_id.decode(), fields))
    read.sort(key=lambda item: item[:2])
    entries, current = [], list(positions)
    for _, shard, entry_id, fields in read[:limit]:
        current[shard] = entry_id
        entries.append(
            OutboxEntry(
                id=entry_id,
                session_id=fields[b"session"].decode(),
                event_id=fields[b"event"].decode(),
                data=fields[b"data"].decode(),
                position=",".join(current),
            )
        )
    return entries


def _snapshot(fields: list[bytes], members: list[bytes]) -> SessionSnapshot | None:
    if not fields:
        return None
    meta = {key.decode(): value.decode() for key, value in zip(fields[::2], fields[1::2], strict=True)}
    layout = StreamLayout.from_dict(json.loads(meta["layout"]))
    received = {name: int(meta[f"received:{name}"]) for name in layout.modalities}
    return SessionSnapshot(
        seq=int(meta["seq"]),
        model=meta["model"],
        layout=layout,
        started=float(meta["started"]),
        updated=float(meta.get("updated", meta["started"])),
        windows=int(meta["next_window"]),
        received=received,
        buffered={name: received[name] - int(meta[f"offset:{name}"]) for name in layout.modalities},
        predictions=[json.loads(member.split(b":", 1)[1]) for member in members],
        tracker=json.loads(meta["tracker"]) if meta.get("tracker") else None,
        generation=meta["generation"],
    )


def _event(entry_id: bytes, fields: list[bytes]) -> Event:
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    return Event(values[b"type"].decode(), values[b"data"].decode(), entry_id.decode())


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))

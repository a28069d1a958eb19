"""Sessions in Redis: Lua scripts append and commit atomically, with Redis key TTLs for expiry.

Keys of a session share the hash tag ``{<session>}``: ``<prefix>:{<id>}:meta`` (seq,
layout, counters, tracker state), ``:buf`` (one binary float32 field per modality),
``:pred`` (recent predictions, scored by window index), ``:events`` (a stream: the
event log that server-sent events read, its ids the event ids) and ``:history`` (a
list of closed segments). Expiry is Redis's own key TTL. A sorted set
``<prefix>:sessions`` (score: last activity) counts the active sessions. The scripts
that start, commit and end a session publish on its channel ``<prefix>:{<id>}:news``
(sharded pub/sub), which wakes the event readers of every process (``RedisNews``); a
reader reads with a short command, never a blocking one, so open event streams hold
no connection of the pool.

Transitions also go to the stream ``<prefix>:outbox`` in the same commit, once webhook
delivery has created that stream (``open_outbox``), so a transition is never recorded
without being queued for its webhooks; the commit then publishes on ``<prefix>:outbox:news``.
That one script touches keys of two hash slots: this store wants a single Redis (or a
primary with replicas), not a Cluster. Webhook delivery keeps
``<prefix>:delivery:<target>:cursor`` and a lease ``:lease`` per target.

Requests share one blocking pool of ``max_connections`` connections: a request finding
them all busy waits up to ``pool_timeout_seconds`` for one, then fails as an outage (503).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis.asyncio as redis
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
from app.store.redis_news import RedisNews
from app.store.wakeups import wait_for_news

SCRIPTS = Path(__file__).parent
# Each script is sent with the shared window arithmetic in front of it.
APPEND_SCRIPT = (SCRIPTS / "windows.lua").read_text() + (SCRIPTS / "append.lua").read_text()
COMMIT_SCRIPT = (SCRIPTS / "windows.lua").read_text() + (SCRIPTS / "commit.lua").read_text()
OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)
EVENT_PAGE = 500  # events read at once
EXPIRY_MARGIN_SECONDS = 0.05  # a reader waiting for a session's expiry looks this long after it is due
# Renew a lease only for its holder, and move a cursor only while holding the lease.
# Create the outbox, empty, unless it exists: an entry added and trimmed away at once (Redis keeps
# an empty stream), in one script so that no entry another process queued meanwhile is trimmed.
OPEN_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('XADD', KEYS[1], 'MAXLEN', 0, '*', 'opened', 1) end
"""
HOLD_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'NX')
return redis.call('GET', KEYS[2])
"""
# Ending a session removes its keys and tells its event readers. KEYS: the session's keys; ARGV: its channel.
DELETE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', unpack(KEYS))
redis.call('SPUBLISH', ARGV[1], 'ended')
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
# A session's meta hash (flat) and predictions, as one commit left them. KEYS: meta, predictions.
SNAPSHOT_SCRIPT = """
return {redis.call('HGETALL', KEYS[1]), redis.call('ZRANGE', KEYS[2], 0, -1)}
"""
# The session's generation (nil: no session) and its newest event's id. KEYS: meta, events.
EVENT_POSITION_SCRIPT = """
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return {redis.call('HGET', KEYS[1], 'generation'), newest[1] and newest[1][1] or '0-0'}
"""
ADVANCE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


class RedisStore(SessionStore):
    def __init__(
        self, url: str, *, prefix: str = "dmft", max_connections: int = 50, pool_timeout_seconds: float = 5.0
    ) -> None:
        # Short timeouts: a Redis outage should answer 503 quickly, not hang requests.
        options = {"socket_connect_timeout": 1.0, "socket_timeout": 2.0}
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_seconds, **options
        )
        self._redis = redis.Redis(connection_pool=pool)
        # Subscriptions keep a connection of their own, outside the requests' pool.
        self._news = RedisNews(redis.Redis.from_url(url, **options), OUTAGE)
        self._prefix = prefix
        self._append = self._redis.register_script(APPEND_SCRIPT)
        self._commit = self._redis.register_script(COMMIT_SCRIPT)
        self._open = self._redis.register_script(OPEN_SCRIPT)
        self._hold = self._redis.register_script(HOLD_SCRIPT)
        self._advance = self._redis.register_script(ADVANCE_SCRIPT)
        self._delete = self._redis.register_script(DELETE_SCRIPT)
        self._read_events = self._redis.register_script(READ_EVENTS_SCRIPT)
        self._event_position = self._redis.register_script(EVENT_POSITION_SCRIPT)
        self._snapshot = self._redis.register_script(SNAPSHOT_SCRIPT)

    def _keys(self, session_id: str) -> tuple[str, str, str, str, str]:
        """meta, buffers, predictions, events, history."""
        tag = f"{self._prefix}:{{{session_id}}}"
        return f"{tag}:meta", f"{tag}:buf", f"{tag}:pred", f"{tag}:events", f"{tag}:history"

    def _channel(self, session_id: str) -> str:
        return f"{self._prefix}:{{{session_id}}}:news"

    @property
    def _outbox_channel(self) -> str:
        return f"{self._outbox}:news"

    @property
    def _index(self) -> str:
        return f"{self._prefix}:sessions"

    @property
    def _outbox(self) -> str:
        return f"{self._prefix}:outbox"

    def _delivery_keys(self, target: str) -> list[str]:
        return [f"{self._prefix}:delivery:{target}:lease", f"{self._prefix}:delivery:{target}:cursor"]

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
        args: list[str | bytes | int] = [
            seq,
            ttl_seconds * 1000,
            repr(now),
            model,
            json.dumps(layout.to_dict()),
            repr(origin),
            uuid.uuid4().hex,  # the generation, if this chunk starts the session
            self._channel(session_id),
        ]
        for name, samples in chunk.items():
            args += [name, samples]
        with _unavailable_on_outage():
            reply = await self._append(keys=list(self._keys(session_id)), args=args)
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
        with _unavailable_on_outage():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self._index, {session_id: now})
                pipe.zremrangebyscore(self._index, "-inf", now - ttl_seconds)
                await pipe.execute()
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
        args: list[str | int] = [
            ttl_seconds * 1000,
            retention.predictions,
            first_window,
            _json(tracker),
            retention.events,
            retention.segments,
            retention.outbox,
            session_id,
            generation,
            self._channel(session_id),
            self._outbox_channel,
            len(predictions),
            *map(_json, predictions),
            len(segments),
            *map(_json, segments),
        ]
        for event in events:
            args += [event.type, event.data]
        with _unavailable_on_outage():
            reply = await self._commit(keys=[*self._keys(session_id), self._outbox], args=args)
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
        if not session_ids:
            return []
        with _unavailable_on_outage():
            async with self._redis.pipeline(transaction=False) as pipe:
                for session_id in session_ids:
                    meta, _, predictions, _, _ = self._keys(session_id)
                    # A commit changes both in one script: the script reads them as they were together.
                    await self._snapshot(keys=[meta, predictions], client=pipe)
                replies = await pipe.execute()
        return [_snapshot(fields, members) for fields, members in replies]

    async def history(self, session_id: str) -> list[dict]:
        with _unavailable_on_outage():
            segments = await self._redis.lrange(self._keys(session_id)[4], 0, -1)
        return [json.loads(segment) for segment in segments]

    async def event_position(self, session_id: str) -> EventPosition:
        meta, _, _, events, _ = self._keys(session_id)
        with _unavailable_on_outage():
            generation, last_id = await self._event_position(keys=[meta, events])
        return EventPosition(generation.decode() if generation else None, _text(last_id))

    async def read_events(
        self, session_id: str, after: str, *, generation: str | None, wait_seconds: float
    ) -> EventBatch:
        # Nothing can follow the last id there is, and Redis refuses a range that starts after it.
        page = 0 if parse_event_id(after) == (LAST_ID_PART, LAST_ID_PART) else EVENT_PAGE
        meta, _, _, events, _ = self._keys(session_id)
        deadline = time.monotonic() + wait_seconds
        with _unavailable_on_outage():
            while True:
                async with self._news.watch(self._channel(session_id)) as news:
                    current, ttl_ms, entries = await self._read_events(keys=[meta, events], args=[after, page])
                    current = current.decode() if current else None
                    remaining = deadline - time.monotonic()
                    if entries or current != generation or remaining <= 0:
                        return EventBatch([_event(entry_id, fields) for entry_id, fields in entries], current)
                    if current is not None:  # expiry is news too, though nothing announces it
                        remaining = min(remaining, max(ttl_ms, 0) / 1000 + EXPIRY_MARGIN_SECONDS)
                    await wait_for_news(news, remaining)

    async def open_outbox(self) -> None:
        with _unavailable_on_outage():
            await self._open(keys=[self._outbox])

    async def read_outbox(self, after: str, *, limit: int, wait_seconds: float) -> list[OutboxEntry]:
        deadline = time.monotonic() + wait_seconds
        with _unavailable_on_outage():
            while True:
                async with self._news.watch(self._outbox_channel) as news:
                    reply = await self._redis.xread({self._outbox: after}, count=limit)
                    remaining = deadline - time.monotonic()
                    if reply or remaining <= 0:
                        return [
                            OutboxEntry(entry_id.decode(), _text(f[b"session"]), _text(f[b"event"]), _text(f[b"data"]))
                            for entry_id, f in (reply[0][1] if reply else [])
                        ]
                    await wait_for_news(news, remaining)

    async def hold_delivery(self, target: str, owner: str, *, lease_seconds: float, start_after: str) -> str | None:
        with _unavailable_on_outage():
            cursor = await self._hold(
                keys=self._delivery_keys(target), args=[owner, int(lease_seconds * 1000), start_after]
            )
        return cursor.decode() if cursor else None

    async def advance_delivery(self, target: str, owner: str, outbox_id: str) -> bool:
        with _unavailable_on_outage():
            return bool(await self._advance(keys=self._delivery_keys(target), args=[owner, outbox_id]))

    async def delete(self, session_id: str) -> bool:
        with _unavailable_on_outage():
            async with self._redis.pipeline(transaction=False) as pipe:
                # A script in a pipeline is loaded by the pipeline when Redis doesn't know it yet.
                await self._delete(keys=list(self._keys(session_id)), args=[self._channel(session_id)], client=pipe)
                pipe.zrem(self._index, session_id)
                deleted, _ = await pipe.execute()
        return deleted > 0

    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int:
        with _unavailable_on_outage():
            return await self._redis.zcount(self._index, now - ttl_seconds, "+inf")

    async def recent_sessions(self, *, now: float, ttl_seconds: int, limit: int) -> list[str]:
        with _unavailable_on_outage():
            ids = await self._redis.zrevrangebyscore(self._index, "+inf", now - ttl_seconds, start=0, num=limit)
        return [session_id.decode() for session_id in ids]

    async def ping(self) -> None:
        with _unavailable_on_outage():
            await self._redis.ping()

    async def close(self) -> None:
        await self._news.close()
        await self._redis.aclose(close_connection_pool=True)


@contextmanager
def _unavailable_on_outage() -> Iterator[None]:
    """Redis unreachable or too slow to answer: ``StoreUnavailable``, which the service answers with 503."""
    try:
        yield
    except OUTAGE as error:
        raise StoreUnavailable(str(error)) from error


def _snapshot(fields: list[bytes], members: list[bytes]) -> SessionSnapshot | None:
    if not fields:
        return None
    meta = {_text(key): _text(value) for key, value in zip(fields[::2], fields[1::2], strict=True)}
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
    return Event(_text(values[b"type"]), _text(values[b"data"]), _text(entry_id))


def _text(value: bytes) -> str:
    return value.decode()


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))

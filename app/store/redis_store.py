"""Sessions in Redis: Lua scripts append and commit atomically, with Redis key TTLs for expiry.

Keys of a session share the hash tag ``{<session>}``: ``<prefix>:{<id>}:meta`` (seq,
layout, counters, tracker state), ``:buf`` (one binary float32 field per modality),
``:pred`` (recent predictions, scored by window index), ``:events`` (a stream: the
event log that server-sent events read, its ids the event ids) and ``:history`` (a
list of closed segments). Expiry is Redis's own key TTL. A sorted set
``<prefix>:sessions`` (score: last activity) counts the active sessions.

Transitions also go to the stream ``<prefix>:outbox`` in the same commit, once webhook
delivery has created that stream (``open_outbox``), so a transition is never recorded
without being queued for its webhooks. That one script
touches keys of two hash slots: this store wants a single Redis (or a primary with
replicas), not a Cluster. Webhook delivery keeps ``<prefix>:delivery:<target>:cursor``
and a lease ``:lease`` per target.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store.base import (
    AppendResult,
    BufferOverflow,
    CommitResult,
    Event,
    EventBatch,
    ModalityMismatch,
    OutboxEntry,
    Retention,
    SeqConflict,
    SessionSnapshot,
    SessionStore,
    StoreUnavailable,
    StreamLayout,
)

SCRIPTS = Path(__file__).parent
# Each script is sent with the shared window arithmetic in front of it.
APPEND_SCRIPT = (SCRIPTS / "windows.lua").read_text() + (SCRIPTS / "append.lua").read_text()
COMMIT_SCRIPT = (SCRIPTS / "windows.lua").read_text() + (SCRIPTS / "commit.lua").read_text()
OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)
MAX_WAIT_SECONDS = 30.0  # longest blocking read
END_LINGER_MS = 60_000  # how long an ended session's log keeps its 'end' event
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
# Ending a session leaves one 'end' event in its log, briefly, to wake its blocked event readers.
DELETE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[5])
redis.call('XADD', KEYS[4], '*', 'type', 'end', 'data', ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return 1
"""
ADVANCE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


class RedisStore(SessionStore):
    def __init__(self, url: str, *, prefix: str = "dmft") -> None:
        # Short timeouts: a Redis outage should answer 503 quickly, not hang requests.
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        # Blocking stream reads wait longer than that on purpose: they get connections of their own.
        self._waiting = redis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=MAX_WAIT_SECONDS + 2.0, max_connections=1000
        )
        self._prefix = prefix
        self._append = self._redis.register_script(APPEND_SCRIPT)
        self._commit = self._redis.register_script(COMMIT_SCRIPT)
        self._open = self._redis.register_script(OPEN_SCRIPT)
        self._hold = self._redis.register_script(HOLD_SCRIPT)
        self._advance = self._redis.register_script(ADVANCE_SCRIPT)
        self._delete = self._redis.register_script(DELETE_SCRIPT)

    def _keys(self, session_id: str) -> tuple[str, str, str, str, str]:
        """meta, buffers, predictions, events, history."""
        tag = f"{self._prefix}:{{{session_id}}}"
        return f"{tag}:meta", f"{tag}:buf", f"{tag}:pred", f"{tag}:events", f"{tag}:history"

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
        meta, _, key, _, _ = self._keys(session_id)
        with _unavailable_on_outage():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(meta)
                pipe.zrange(key, 0, -1)
                fields, members = await pipe.execute()
        if not fields:
            return None
        fields = {k.decode(): v.decode() for k, v in fields.items()}
        layout = StreamLayout.from_dict(json.loads(fields["layout"]))
        received = {name: int(fields[f"received:{name}"]) for name in layout.modalities}
        return SessionSnapshot(
            seq=int(fields["seq"]),
            model=fields["model"],
            layout=layout,
            started=float(fields["started"]),
            updated=float(fields.get("updated", fields["started"])),
            windows=int(fields["next_window"]),
            received=received,
            buffered={name: received[name] - int(fields[f"offset:{name}"]) for name in layout.modalities},
            predictions=[json.loads(member.split(b":", 1)[1]) for member in members],
            tracker=json.loads(fields["tracker"]) if fields.get("tracker") else None,
            generation=fields["generation"],
        )

    async def history(self, session_id: str) -> list[dict]:
        with _unavailable_on_outage():
            segments = await self._redis.lrange(self._keys(session_id)[4], 0, -1)
        return [json.loads(segment) for segment in segments]

    async def last_event_id(self, session_id: str) -> str:
        with _unavailable_on_outage():
            newest = await self._redis.xrevrange(self._keys(session_id)[3], count=1)
        return newest[0][0].decode() if newest else "0-0"

    async def read_events(self, session_id: str, after: str, *, wait_seconds: float) -> EventBatch:
        meta, _, _, events, _ = self._keys(session_id)
        with _unavailable_on_outage():
            # A blocking read holds its connection for the wait: the pool opens one per waiting reader.
            reply = await self._waiting.xread({events: after}, block=_block_ms(wait_seconds))
            alive = bool(await self._redis.exists(meta))
        entries = reply[0][1] if reply else []
        return EventBatch(
            [
                Event(fields[b"type"].decode(), fields[b"data"].decode(), entry_id.decode())
                for entry_id, fields in entries
            ],
            alive=alive,
        )

    async def open_outbox(self) -> None:
        with _unavailable_on_outage():
            await self._open(keys=[self._outbox])

    async def read_outbox(self, after: str, *, limit: int, wait_seconds: float) -> list[OutboxEntry]:
        with _unavailable_on_outage():
            reply = await self._waiting.xread({self._outbox: after}, count=limit, block=_block_ms(wait_seconds))
        return [
            OutboxEntry(
                entry_id.decode(), fields[b"session"].decode(), fields[b"event"].decode(), fields[b"data"].decode()
            )
            for entry_id, fields in (reply[0][1] if reply else [])
        ]

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
        end = _json({"session_id": session_id, "reason": "ended"})
        with _unavailable_on_outage():
            async with self._redis.pipeline(transaction=False) as pipe:
                # A script in a pipeline is loaded by the pipeline when Redis doesn't know it yet.
                await self._delete(keys=list(self._keys(session_id)), args=[end, END_LINGER_MS], client=pipe)
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
        await self._redis.aclose()
        await self._waiting.aclose()


@contextmanager
def _unavailable_on_outage() -> Iterator[None]:
    """Redis unreachable or too slow to answer: ``StoreUnavailable``, which the service answers with 503."""
    try:
        yield
    except OUTAGE as error:
        raise StoreUnavailable(str(error)) from error


def _block_ms(wait_seconds: float) -> int:
    return max(1, int(min(wait_seconds, MAX_WAIT_SECONDS) * 1000))


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))

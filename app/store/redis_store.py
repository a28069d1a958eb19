"""Sessions in Redis: Lua scripts append and commit atomically, with Redis key TTLs for expiry.

Keys of a session share the hash tag ``{<session>}`` so the script may touch all of
them on a Redis Cluster too: ``<prefix>:{<id>}:meta`` (seq, layout, counters),
``:buf`` (one binary float32 field per modality) and ``:pred`` (recent predictions,
scored by window index). Expiry is Redis's own key TTL. A sorted set
``<prefix>:sessions`` (score: last activity) counts the active sessions.
"""

from __future__ import annotations

import json
from pathlib import Path

import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.store.base import (
    AppendResult,
    BufferOverflow,
    CommitResult,
    ModalityMismatch,
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


class RedisStore(SessionStore):
    def __init__(self, url: str, *, prefix: str = "dmft") -> None:
        # Short timeouts: a Redis outage should answer 503 quickly, not hang requests.
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        self._prefix = prefix
        self._append = self._redis.register_script(APPEND_SCRIPT)
        self._commit = self._redis.register_script(COMMIT_SCRIPT)

    def _keys(self, session_id: str) -> tuple[str, str, str]:
        tag = f"{self._prefix}:{{{session_id}}}"
        return f"{tag}:meta", f"{tag}:buf", f"{tag}:pred"

    @property
    def _index(self) -> str:
        return f"{self._prefix}:sessions"

    async def append(
        self,
        session_id: str,
        *,
        seq: int,
        model: str,
        layout: StreamLayout,
        chunk: dict[str, bytes],
        now: float,
        ttl_seconds: int,
    ) -> AppendResult:
        args: list[str | bytes | int] = [seq, ttl_seconds * 1000, repr(now), model, json.dumps(layout.to_dict())]
        for name, samples in chunk.items():
            args += [name, samples]
        try:
            reply = await self._append(keys=list(self._keys(session_id)), args=args)
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error
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
            received={name: int(r) for name, r in zip(stored.modalities, received, strict=True)},
            buffered={name: int(r - o) for name, r, o in zip(stored.modalities, received, offsets, strict=True)},
        )
        result.first_window, result.windows = int(reply[7]), int(reply[8])
        result.spans = dict(zip(stored.modalities, reply[9:], strict=True)) if result.windows else {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self._index, {session_id: now})
                pipe.zremrangebyscore(self._index, "-inf", now - ttl_seconds)
                await pipe.execute()
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error
        return result

    async def commit(
        self, session_id: str, first_window: int, predictions: list[dict], *, keep: int, ttl_seconds: int
    ) -> CommitResult:
        args = [ttl_seconds * 1000, keep, first_window, *(json.dumps(p, separators=(",", ":")) for p in predictions)]
        try:
            recorded, buffered = await self._commit(keys=list(self._keys(session_id)), args=args)
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error
        # cjson writes an empty list as {}: "or" turns it back into no windows.
        return CommitResult(
            recorded=[int(window) for window in json.loads(recorded) or []],
            buffered={name: int(count) for name, count in json.loads(buffered).items()},
        )

    async def get(self, session_id: str) -> SessionSnapshot | None:
        meta, _, key = self._keys(session_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(meta)
                pipe.zrange(key, 0, -1)
                fields, members = await pipe.execute()
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error
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
        )

    async def delete(self, session_id: str) -> bool:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(*self._keys(session_id))
                pipe.zrem(self._index, session_id)
                deleted, _ = await pipe.execute()
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error
        return deleted > 0

    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int:
        try:
            return await self._redis.zcount(self._index, now - ttl_seconds, "+inf")
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except OUTAGE as error:
            raise StoreUnavailable(str(error)) from error

    async def close(self) -> None:
        await self._redis.aclose()

"""The embedded store: sessions in this process, same contract as Redis, expiry checked on access."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

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
    StreamLayout,
    parse_event_id,
)

T = TypeVar("T")


class _Ids:
    """Event ids as Redis streams make them: milliseconds, then a sequence within the millisecond."""

    def __init__(self) -> None:
        self.last = (0, 0)

    def next(self) -> str:
        now = int(time.time() * 1000)
        self.last = (now, 0) if now > self.last[0] else (self.last[0], self.last[1] + 1)
        return f"{self.last[0]}-{self.last[1]}"


def _keep_newest(log: deque, keep: int) -> None:
    while len(log) > keep:
        log.popleft()


def _after(entries: deque, after: str) -> list:
    position = parse_event_id(after)
    return [entry for entry in entries if parse_event_id(entry.id) > position]


@dataclass
class _Session:
    model: str
    layout: StreamLayout
    started: float
    updated: float
    expires: float
    generation: str
    seq: int = -1
    next_window: int = 0
    received: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)  # absolute index of the first buffered sample
    buffers: list[bytearray] = field(default_factory=list)
    predictions: dict[int, dict] = field(default_factory=dict)
    tracker: dict | None = None
    events: deque[Event] = field(default_factory=deque)
    history: deque[dict] = field(default_factory=deque)


class MemoryStore(SessionStore):
    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Condition(self._lock)  # new events, or a session gone
        self._ids = _Ids()
        self._outbox: deque[OutboxEntry] = deque()
        self._outbox_open = False
        self._leases: dict[str, tuple[str, float]] = {}  # target -> (owner, expiry)
        self._cursors: dict[str, str] = {}

    def _live(self, session_id: str) -> _Session | None:
        session = self._sessions.get(session_id)
        if session is not None and session.expires <= time.time():
            del self._sessions[session_id]
            return None
        return session

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
        async with self._lock:
            session = self._live(session_id)
            if session is None:
                if seq != 0:
                    raise SeqConflict(0)
                count = len(layout.modalities)
                session = _Session(
                    model=model,
                    layout=layout,
                    started=origin,
                    generation=uuid.uuid4().hex,
                    updated=now,
                    expires=now + ttl_seconds,
                    received=[0] * count,
                    offset=[0] * count,
                    buffers=[bytearray() for _ in range(count)],
                )
            duplicate = seq == session.seq
            if not duplicate:
                self._append(session, seq, chunk)  # raises before changing anything
                session.updated = now
                self._sessions[session_id] = session
            session.expires = now + ttl_seconds
            return self._pending(session, duplicate=duplicate)

    @staticmethod
    def _append(session: _Session, seq: int, chunk: dict[str, bytes]) -> None:
        layout = session.layout
        if seq != session.seq + 1:
            raise SeqConflict(session.seq + 1)
        if set(chunk) - set(layout.modalities):
            raise ModalityMismatch(list(layout.modalities), session.model)
        added = [len(chunk.get(name, b"")) // layout.bytes_per_sample(i) for i, name in enumerate(layout.modalities)]
        for i, name in enumerate(layout.modalities):
            if session.received[i] + added[i] - session.offset[i] > layout.max_buffer[i]:
                raise BufferOverflow(name)
        for i, name in enumerate(layout.modalities):
            session.buffers[i] += chunk.get(name, b"")
            session.received[i] += added[i]
        session.seq = seq

    @staticmethod
    def _complete_windows(session: _Session) -> int:
        """Windows that every modality covers completely."""
        layout = session.layout
        return min(
            (received - window) // hop + 1 if received >= window else 0
            for received, window, hop in zip(session.received, layout.window, layout.hop, strict=True)
        )

    def _pending(self, session: _Session, *, duplicate: bool) -> AppendResult:
        """The result with the samples of every complete window not committed yet."""
        layout = session.layout
        first = session.next_window
        count = max(0, self._complete_windows(session) - first)
        spans = {}
        if count:
            for i, name in enumerate(layout.modalities):
                size = layout.bytes_per_sample(i)
                start = first * layout.hop[i] - session.offset[i]
                stop = (first + count - 1) * layout.hop[i] + layout.window[i] - session.offset[i]
                spans[name] = bytes(session.buffers[i][start * size : stop * size])
        result = self._result(session, duplicate=duplicate)
        result.first_window, result.windows, result.spans = first, count, spans
        result.tracker = session.tracker
        return result

    def _result(self, session: _Session, *, duplicate: bool) -> AppendResult:
        names = session.layout.modalities
        return AppendResult(
            duplicate=duplicate,
            seq=session.seq,
            model=session.model,
            layout=session.layout,
            started=session.started,
            generation=session.generation,
            received=dict(zip(names, session.received, strict=True)),
            buffered={name: r - o for name, r, o in zip(names, session.received, session.offset, strict=True)},
        )

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
        async with self._lock:
            session = self._live(session_id)
            if session is None or session.generation != generation:  # ended, expired, or started again
                return CommitResult(recorded=[], buffered={})
            if first_window != session.next_window:
                return CommitResult(
                    recorded=[],
                    buffered=self._result(session, duplicate=False).buffered,
                    stale=True,
                    next_window=session.next_window,
                    tracker=session.tracker,
                )
            if first_window + len(predictions) > self._complete_windows(session):
                raise ValueError("a commit may only record complete windows")
            recorded = list(range(first_window, first_window + len(predictions)))
            session.predictions.update(zip(recorded, predictions, strict=True))
            session.next_window += len(predictions)
            session.tracker = tracker
            layout = session.layout
            for i in range(len(layout.modalities)):
                # Samples before the next window's start are needed by no future window.
                keep_from = min(session.next_window * layout.hop[i], session.received[i])
                if keep_from > session.offset[i]:
                    del session.buffers[i][: (keep_from - session.offset[i]) * layout.bytes_per_sample(i)]
                    session.offset[i] = keep_from
            for window in [w for w in session.predictions if w < session.next_window - retention.predictions]:
                del session.predictions[window]
            event_ids = []
            for event in events:
                stored = Event(event.type, event.data, self._ids.next())
                session.events.append(stored)
                event_ids.append(stored.id)
                if event.type == "transition" and self._outbox_open:
                    self._outbox.append(OutboxEntry(self._ids.next(), session_id, stored.id, event.data))
                    _keep_newest(self._outbox, retention.outbox)
            session.history.extend(segments)
            _keep_newest(session.events, retention.events)
            _keep_newest(session.history, retention.segments)
            session.expires = time.time() + ttl_seconds
            if events:
                self._changed.notify_all()
            return CommitResult(
                recorded=recorded,
                buffered=self._result(session, duplicate=False).buffered,
                event_ids=event_ids,
                next_window=session.next_window,
            )

    async def get(self, session_id: str) -> SessionSnapshot | None:
        async with self._lock:
            session = self._live(session_id)
            if session is None:
                return None
            result = self._result(session, duplicate=False)
            return SessionSnapshot(
                seq=session.seq,
                model=session.model,
                layout=session.layout,
                started=session.started,
                updated=session.updated,
                windows=session.next_window,
                received=result.received,
                buffered=result.buffered,
                predictions=[session.predictions[w] for w in sorted(session.predictions)],
                tracker=session.tracker,
                generation=session.generation,
            )

    async def history(self, session_id: str) -> list[dict]:
        async with self._lock:
            session = self._live(session_id)
            return list(session.history) if session else []

    async def last_event_id(self, session_id: str) -> str:
        async with self._lock:
            session = self._live(session_id)
            return session.events[-1].id if session and session.events else "0-0"

    async def _wait(self, look: Callable[[], tuple[bool, T]], wait_seconds: float) -> T:
        """``look``'s answer (under the lock) once it has found something, or when ``wait_seconds`` have
        passed; commits and deletes wake it to look again."""
        deadline = time.monotonic() + wait_seconds
        async with self._changed:
            while True:
                found, answer = look()
                remaining = deadline - time.monotonic()
                if found or remaining <= 0:
                    return answer
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    async def read_events(self, session_id: str, after: str, *, wait_seconds: float) -> EventBatch:
        def look() -> tuple[bool, EventBatch]:
            session = self._live(session_id)
            if session is None:
                return True, EventBatch([], alive=False)
            events = _after(session.events, after)
            return bool(events), EventBatch(events, alive=True)

        return await self._wait(look, wait_seconds)

    async def open_outbox(self) -> None:
        self._outbox_open = True

    async def read_outbox(self, after: str, *, limit: int, wait_seconds: float) -> list[OutboxEntry]:
        def look() -> tuple[bool, list[OutboxEntry]]:
            entries = _after(self._outbox, after)[:limit]
            return bool(entries), entries

        return await self._wait(look, wait_seconds)

    async def hold_delivery(self, target: str, owner: str, *, lease_seconds: float, start_after: str) -> str | None:
        async with self._lock:
            holder, expires = self._leases.get(target, (owner, 0.0))
            now = time.monotonic()
            if holder != owner and expires > now:
                return None
            self._leases[target] = (owner, now + lease_seconds)
            return self._cursors.setdefault(target, start_after)

    async def advance_delivery(self, target: str, owner: str, outbox_id: str) -> bool:
        async with self._lock:
            holder, expires = self._leases.get(target, ("", 0.0))
            if holder != owner or expires <= time.monotonic():
                return False
            self._cursors[target] = outbox_id
            return True

    async def delete(self, session_id: str) -> bool:
        async with self._changed:
            deleted = self._live(session_id) is not None and self._sessions.pop(session_id, None) is not None
            self._changed.notify_all()
            return deleted

    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int:
        async with self._lock:
            for session_id in [sid for sid, s in self._sessions.items() if s.expires <= now]:
                del self._sessions[session_id]
            return len(self._sessions)

    async def recent_sessions(self, *, now: float, ttl_seconds: int, limit: int) -> list[str]:
        async with self._lock:
            live = [(s.updated, sid) for sid, s in self._sessions.items() if s.expires > now]
            return [sid for _, sid in sorted(live, reverse=True)[:limit]]

    async def ping(self) -> None:
        return None

"""The embedded store: sessions in this process, same contract as Redis.

Every method runs to completion without awaiting anything, so the event loop itself keeps
them atomic: there is no lock, and nothing a cancelled reader leaves behind can stop the
store. Readers wait for news of their own session (``Wakeups``) and read only the events
after the id they give. Expired sessions are purged every ``PURGE_INTERVAL_SECONDS`` (and a
session found expired on access is gone at once); ``max_sessions`` caps how many it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.store.base import (
    FIRST_EVENT_ID,
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
    SessionLimitReached,
    SessionSnapshot,
    SessionStore,
    StreamLayout,
    parse_event_id,
)
from app.store.wakeups import Wakeups, wait_for_news

PURGE_INTERVAL_SECONDS = 1.0
OUTBOX = ""  # the one key of the outbox's readers
T = TypeVar("T")


class _Ids:
    """Event ids as Redis streams make them: milliseconds, then a sequence within the millisecond."""

    def __init__(self) -> None:
        self.last = (0, 0)

    def next(self) -> tuple[int, int]:
        now = int(time.time() * 1000)
        self.last = (now, 0) if now > self.last[0] else (self.last[0], self.last[1] + 1)
        return self.last


def _id_text(position: tuple[int, int]) -> str:
    return f"{position[0]}-{position[1]}"


class _Log(Generic[T]):
    """Entries with increasing ids, the newest ``keep``: reading after an id costs what it returns."""

    def __init__(self) -> None:
        self._entries: deque[tuple[tuple[int, int], T]] = deque()

    def append(self, position: tuple[int, int], entry: T, keep: int) -> None:
        self._entries.append((position, entry))
        while len(self._entries) > keep:
            self._entries.popleft()

    def after(self, after: str, limit: int | None = None) -> list[T]:
        """The entries after id ``after``, oldest first, the oldest ``limit`` of them."""
        position = parse_event_id(after)
        newer = []
        for entry_position, entry in reversed(self._entries):
            if entry_position <= position:
                break
            newer.append(entry)
        newer.reverse()
        return newer[:limit] if limit is not None else newer

    def last_id(self) -> str:
        return _id_text(self._entries[-1][0]) if self._entries else FIRST_EVENT_ID


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
    events: _Log[Event] = field(default_factory=_Log)
    history: deque[dict] = field(default_factory=deque)


class MemoryStore(SessionStore):
    def __init__(self, *, max_sessions: int | None = None) -> None:
        self._sessions: dict[str, _Session] = {}
        self._max_sessions = max_sessions
        # (expires, session, generation), pushed when a session starts; a later write only moves ``expires``
        # on, so an entry found early is pushed again with the session's current expiry.
        self._expiries: list[tuple[float, str, str]] = []
        self._purging: asyncio.Task[None] | None = None
        self._session_news = Wakeups()
        self._outbox_news = Wakeups()
        self._ids = _Ids()
        self._outbox: _Log[OutboxEntry] = _Log()
        self._outbox_open = False
        self._leases: dict[str, tuple[str, float]] = {}  # target -> (owner, expiry)
        self._cursors: dict[str, str] = {}

    def _live(self, session_id: str) -> _Session | None:
        session = self._sessions.get(session_id)
        if session is not None and session.expires <= time.time():
            self._remove(session_id)
            return None
        return session

    def _remove(self, session_id: str) -> None:
        del self._sessions[session_id]
        self._session_news.wake(session_id)

    def _purge(self, now: float) -> None:
        """Remove every session that has expired."""
        while self._expiries and self._expiries[0][0] <= now:
            _, session_id, generation = heapq.heappop(self._expiries)
            session = self._sessions.get(session_id)
            if session is None or session.generation != generation:
                continue  # ended, or started again with an entry of its own
            if session.expires <= now:
                self._remove(session_id)
            else:
                heapq.heappush(self._expiries, (session.expires, session_id, generation))

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(PURGE_INTERVAL_SECONDS)
            self._purge(time.time())

    def _start_purging(self) -> None:
        if self._purging is None:
            self._purging = asyncio.get_running_loop().create_task(self._purge_forever(), name="purge-sessions")

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
        session = self._live(session_id)
        fresh = session is None
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
        if fresh:
            self._admit(session_id, session, now)
        session.expires = now + ttl_seconds
        return self._pending(session, duplicate=duplicate)

    def _admit(self, session_id: str, session: _Session, now: float) -> None:
        """Hold a new session, if there is room for it."""
        self._purge(now)
        if self._max_sessions is not None and len(self._sessions) >= self._max_sessions:
            raise SessionLimitReached(self._max_sessions)
        self._sessions[session_id] = session
        heapq.heappush(self._expiries, (session.expires, session_id, session.generation))
        self._start_purging()
        self._session_news.wake(session_id)  # readers waiting for it to start

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
            position = self._ids.next()
            stored = Event(event.type, event.data, _id_text(position))
            session.events.append(position, stored, retention.events)
            event_ids.append(stored.id)
            if event.type == "transition" and self._outbox_open:
                queued = self._ids.next()
                entry_id = _id_text(queued)
                entry = OutboxEntry(entry_id, session_id, stored.id, event.data, position=entry_id)
                self._outbox.append(queued, entry, retention.outbox)
                self._outbox_news.wake(OUTBOX)
        session.history.extend(segments)
        while len(session.history) > retention.segments:
            session.history.popleft()
        session.expires = time.time() + ttl_seconds
        if events:
            self._session_news.wake(session_id)
        return CommitResult(
            recorded=recorded,
            buffered=self._result(session, duplicate=False).buffered,
            event_ids=event_ids,
            next_window=session.next_window,
        )

    async def get(self, session_id: str) -> SessionSnapshot | None:
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

    async def get_many(self, session_ids: list[str]) -> list[SessionSnapshot | None]:
        return [await self.get(session_id) for session_id in session_ids]

    async def history(self, session_id: str) -> list[dict]:
        session = self._live(session_id)
        return list(session.history) if session else []

    async def event_position(self, session_id: str) -> EventPosition:
        session = self._live(session_id)
        if session is None:
            return EventPosition(None, FIRST_EVENT_ID)
        return EventPosition(session.generation, session.events.last_id())

    async def read_events(
        self, session_id: str, after: str, *, generation: str | None, wait_seconds: float
    ) -> EventBatch:
        parse_event_id(after)
        deadline = time.monotonic() + wait_seconds
        while True:
            with self._session_news.watch(session_id) as news:
                session = self._live(session_id)
                current = session.generation if session else None
                events = session.events.after(after) if session else []
                remaining = deadline - time.monotonic()
                if events or current != generation or remaining <= 0:
                    return EventBatch(events, current)
                if session is not None:  # expiry is news too, though nothing announces it
                    remaining = min(remaining, session.expires - time.time())
                await wait_for_news(news, remaining)

    async def open_outbox(self) -> None:
        self._outbox_open = True

    async def read_outbox(self, after: str, *, limit: int, wait_seconds: float) -> list[OutboxEntry]:
        deadline = time.monotonic() + wait_seconds
        while True:
            with self._outbox_news.watch(OUTBOX) as news:
                entries = self._outbox.after(after, limit)
                remaining = deadline - time.monotonic()
                if entries or remaining <= 0:
                    return entries
                await wait_for_news(news, remaining)

    async def hold_delivery(self, target: str, owner: str, *, lease_seconds: float, start_after: str) -> str | None:
        holder, expires = self._leases.get(target, (owner, 0.0))
        now = time.monotonic()
        if holder != owner and expires > now:
            return None
        self._leases[target] = (owner, now + lease_seconds)
        return self._cursors.setdefault(target, start_after)

    async def advance_delivery(self, target: str, owner: str, position: str) -> bool:
        holder, expires = self._leases.get(target, ("", 0.0))
        if holder != owner or expires <= time.monotonic():
            return False
        self._cursors[target] = position
        return True

    async def delete(self, session_id: str) -> bool:
        if self._live(session_id) is None:
            return False
        self._remove(session_id)
        return True

    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int:
        self._purge(now)
        return len(self._sessions)

    async def recent_sessions(self, *, now: float, ttl_seconds: int, limit: int) -> list[str]:
        self._purge(now)
        return [
            session_id
            for _, session_id in sorted(((s.updated, sid) for sid, s in self._sessions.items()), reverse=True)[:limit]
        ]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        if self._purging is not None:
            self._purging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purging
            self._purging = None

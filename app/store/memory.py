"""The embedded store: sessions in this process, same contract as Redis, expiry checked on access."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from app.store.base import (
    AppendResult,
    BufferOverflow,
    CommitResult,
    ModalityMismatch,
    SeqConflict,
    SessionSnapshot,
    SessionStore,
    StreamLayout,
)


@dataclass
class _Session:
    model: str
    layout: StreamLayout
    started: float
    updated: float
    expires: float
    seq: int = -1
    next_window: int = 0
    received: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)  # absolute index of the first buffered sample
    buffers: list[bytearray] = field(default_factory=list)
    predictions: dict[int, dict] = field(default_factory=dict)


class MemoryStore(SessionStore):
    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._lock = asyncio.Lock()

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
                    started=now,
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
        return result

    def _result(self, session: _Session, *, duplicate: bool) -> AppendResult:
        names = session.layout.modalities
        return AppendResult(
            duplicate=duplicate,
            seq=session.seq,
            model=session.model,
            layout=session.layout,
            started=session.started,
            received=dict(zip(names, session.received, strict=True)),
            buffered={name: r - o for name, r, o in zip(names, session.received, session.offset, strict=True)},
        )

    async def commit(
        self, session_id: str, first_window: int, predictions: list[dict], *, keep: int, ttl_seconds: int
    ) -> CommitResult:
        async with self._lock:
            session = self._live(session_id)
            if session is None:
                return CommitResult(recorded=[], buffered={})
            ready = self._complete_windows(session)
            recorded = []
            for window, prediction in enumerate(predictions, start=first_window):
                # Recorded once: never below the next uncommitted window, never twice, never incomplete.
                if session.next_window <= window < ready and window not in session.predictions:
                    session.predictions[window] = prediction
                    recorded.append(window)
            while session.next_window in session.predictions:
                session.next_window += 1
            layout = session.layout
            for i in range(len(layout.modalities)):
                # Samples before the next window's start are needed by no future window.
                keep_from = min(session.next_window * layout.hop[i], session.received[i])
                if keep_from > session.offset[i]:
                    del session.buffers[i][: (keep_from - session.offset[i]) * layout.bytes_per_sample(i)]
                    session.offset[i] = keep_from
            # Keep the newest committed predictions, and any recorded ahead of a gap.
            for window in [w for w in session.predictions if w < session.next_window - keep]:
                del session.predictions[window]
            session.expires = time.time() + ttl_seconds
            return CommitResult(recorded=recorded, buffered=self._result(session, duplicate=False).buffered)

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
            )

    async def delete(self, session_id: str) -> bool:
        async with self._lock:
            return self._live(session_id) is not None and self._sessions.pop(session_id, None) is not None

    async def active_sessions(self, *, now: float, ttl_seconds: int) -> int:
        async with self._lock:
            for session_id in [sid for sid, s in self._sessions.items() if s.expires <= now]:
                del self._sessions[session_id]
            return len(self._sessions)

    async def ping(self) -> None:
        return None

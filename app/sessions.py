"""Streaming sessions: chunks of samples in, a prediction for every complete window out.

A session's modalities and model are fixed by its first chunk (``seq`` 0), and so is
its time origin: the chunk's ``timestamp`` (client clock) or else the server's clock.
Windows start every ``hop_seconds`` and are classified as soon as every modality
covers one; the store hands out complete windows and records each window's prediction
once, even when several API processes serve one session. A window whose
classification failed (overload, store outage) stays pending: retrying the chunk
classifies it then. Each commit also advances the session's activity tracker
(an online hidden-Markov filter, ``app.tracker``) and logs the predictions and transitions as events.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import numpy as np

from app import metrics
from app.decoding import Chunk
from app.engine import InferenceEngine
from app.exceptions import InvalidInput, SeqOutOfOrder, SessionCapacity, SessionNotFound
from app.schemas import (
    FeedItem,
    History,
    SamplesResponse,
    Segment,
    SessionState,
    SessionSummary,
    Transition,
    WindowPrediction,
)
from app.settings import Settings
from app.store import (
    FIRST_EVENT_ID,
    AppendResult,
    BufferOverflow,
    Event,
    ModalityMismatch,
    Retention,
    SeqConflict,
    SessionLimitReached,
    SessionSnapshot,
    SessionStore,
    StoreUnavailable,
    StreamLayout,
)
from app.tracker import SegmentRecord, TrackerState, WindowLabel, advance, tracker_config

log = logging.getLogger(__name__)


def _timestamp(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, tz=UTC)


def _segment(record: SegmentRecord, *, ongoing: bool) -> Segment:
    return Segment(
        activity=record.activity,
        start=_timestamp(record.start),
        end=_timestamp(record.end),
        mean_confidence=record.mean_confidence,
        windows=record.windows,
        ongoing=ongoing,
    )


class SessionService:
    def __init__(self, store: SessionStore, engine: InferenceEngine, settings: Settings) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings
        self.retention = Retention(
            predictions=settings.recent_predictions,
            events=settings.retained_events,
            segments=settings.retained_segments,
            outbox=settings.outbox_size,
        )
        self.tracker = tracker_config(settings, engine.reference.window_seconds)

    def layout_for(self, modalities: list[str]) -> StreamLayout:
        window = self.engine.reference.window_samples
        chosen = [spec for name, spec in self.engine.specs.items() if name in modalities]  # model order
        return StreamLayout(
            modalities=tuple(spec.name for spec in chosen),
            channels=tuple(spec.channels for spec in chosen),
            window=tuple(window[spec.name] for spec in chosen),
            hop=tuple(max(1, round(self.settings.hop_seconds * spec.sample_rate)) for spec in chosen),
            max_buffer=tuple(
                window[spec.name] + round(self.settings.max_buffer_seconds * spec.sample_rate) for spec in chosen
            ),
        )

    async def append(self, session_id: str, chunk: Chunk) -> SamplesResponse:
        """Append a decoded chunk (``app.decoding.decode_chunk``: checked samples, a timestamp in range)."""
        arrays = chunk.samples
        now = time.time()
        try:
            result = await self.store.append(
                session_id,
                seq=chunk.seq,
                model=chunk.model,
                layout=self.layout_for(list(arrays)),
                chunk={name: array.tobytes() for name, array in arrays.items()},
                now=now,
                origin=chunk.timestamp.timestamp() if chunk.timestamp else now,
                ttl_seconds=self.settings.session_ttl_seconds,
            )
        except SeqConflict as error:
            raise SeqOutOfOrder(chunk.seq, error.expected) from error
        except ModalityMismatch as error:
            raise InvalidInput(
                f"this session streams {', '.join(error.session_modalities)}; got {', '.join(arrays)}"
            ) from error
        except SessionLimitReached as error:
            raise SessionCapacity(f"no room for a new session: {error}; retry when sessions have ended") from error
        except BufferOverflow as error:
            raise InvalidInput(
                f"{error.modality}: more than {self.settings.max_buffer_seconds:g} s buffered beyond a window; "
                "send the other modalities' samples too"
            ) from error
        if not result.duplicate:
            for name, array in arrays.items():
                metrics.INGESTED_SAMPLES.labels(modality=name).inc(len(array))
        predictions, transitions, buffered = [], [], result.buffered
        if result.windows:
            predictions = await self._classify(result)
            transitions, buffered = await self._commit(session_id, result, predictions)
        return SamplesResponse(
            session_id=session_id,
            seq=result.seq,
            duplicate=result.duplicate,
            predictions=predictions,
            transitions=transitions,
            received=result.received,
            buffered=buffered,
        )

    async def _classify(self, result: AppendResult) -> list[WindowPrediction]:
        """Predictions for the pending windows, timed from the session's origin."""
        layout = result.layout
        spans = {
            name: np.frombuffer(result.spans[name], dtype="<f4").reshape(-1, layout.channels[i])
            for i, name in enumerate(layout.modalities)
        }
        windows, bounds = [], []
        for offset in range(result.windows):
            index = result.first_window + offset
            start = {name: index * layout.hop[i] for i, name in enumerate(layout.modalities)}
            end = {name: start[name] + layout.window[i] for i, name in enumerate(layout.modalities)}
            windows.append(
                {
                    name: spans[name][offset * layout.hop[i] : offset * layout.hop[i] + layout.window[i]]
                    for i, name in enumerate(layout.modalities)
                }
            )
            bounds.append((index, start, end))
        answers = await self.engine.predict_windows(windows, result.model)
        recorded_at = datetime.now(UTC)
        classes = self.engine.reference.class_names
        window_seconds = self.engine.reference.window_seconds
        predictions = []
        for (index, start, end), answer in zip(bounds, answers, strict=True):
            best = int(answer.probabilities.argmax())
            start_seconds = index * self.settings.hop_seconds
            predictions.append(
                WindowPrediction(
                    window=index,
                    start_seconds=start_seconds,
                    end_seconds=start_seconds + window_seconds,
                    start_time=_timestamp(result.started + start_seconds),
                    end_time=_timestamp(result.started + start_seconds + window_seconds),
                    start_sample=start,
                    end_sample=end,
                    activity=classes[best],
                    confidence=float(answer.probabilities[best]),
                    probabilities={c: float(p) for c, p in zip(classes, answer.probabilities, strict=True)},
                    model=answer.model,
                    recorded_at=recorded_at,
                )
            )
        return predictions

    async def _commit(
        self, session_id: str, result: AppendResult, predictions: list[WindowPrediction]
    ) -> tuple[list[Transition], dict[str, int]]:
        """Advance the tracker over the windows and commit both; returns the transitions this call recorded
        and the samples still buffered.

        When another process commits some of the windows first, the store answers ``stale`` with its
        tracker state and this redoes the step for the windows left, so the tracker sees each window once.
        """
        tracker, first = TrackerState.from_dict(result.tracker), result.first_window
        # Dumped once: the store records these and logs them as events, and a stale commit is redone.
        records = {p.window: p.model_dump(mode="json") for p in predictions}
        while True:
            pending = [p for p in predictions if p.window >= first]
            if not pending:  # another process committed them all
                return [], result.buffered
            pending_records = [records[p.window] for p in pending]
            update = advance(
                tracker,
                [
                    WindowLabel(
                        p.window,
                        p.start_time.timestamp(),
                        p.end_time.timestamp(),
                        p.activity,
                        p.confidence,
                        p.probabilities,
                        p.model,
                    )
                    for p in pending
                ],
                self.tracker,
            )
            transitions = [
                Transition(
                    session_id=session_id,
                    from_activity=record.from_activity,
                    to_activity=record.to_activity,
                    time=_timestamp(record.time),
                    window=record.window,
                    confidence=record.confidence,
                    model=record.model,
                )
                for record in update.transitions
            ]
            committed = await self.store.commit(
                session_id,
                first,
                pending_records,
                generation=result.generation,
                tracker=update.state.to_dict(),
                events=self._events(session_id, pending_records, transitions, update.confirmed_at),
                segments=[vars(segment) for segment in update.closed_segments],
                retention=self.retention,
                ttl_seconds=self.settings.session_ttl_seconds,
            )
            if committed.stale:
                tracker, first = TrackerState.from_dict(committed.tracker), committed.next_window
                continue
            if not committed.recorded:  # the session expired or ended meanwhile
                return [], result.buffered
            # Counted once per window and transition, by the process whose commit recorded it.
            for prediction in pending:
                metrics.PREDICTIONS.labels(model=prediction.model, activity=prediction.activity).inc()
            for transition in transitions:
                metrics.TRANSITIONS.labels(activity=transition.to_activity).inc()
            return transitions, committed.buffered

    @staticmethod
    def _events(
        session_id: str, predictions: list[dict], transitions: list[Transition], confirmed_at: list[int]
    ) -> list[Event]:
        """Each prediction (as recorded), followed by the transition it confirmed, if any."""
        events = []
        for position, prediction in enumerate(predictions):
            data = json.dumps({"session_id": session_id, **prediction}, separators=(",", ":"))
            events.append(Event("prediction", data))
            events += [
                Event("transition", transition.model_dump_json())
                for transition, at in zip(transitions, confirmed_at, strict=True)
                if at == position
            ]
        return events

    async def state(self, session_id: str) -> SessionState:
        return self._state(session_id, await self._snapshot(session_id))

    @staticmethod
    def _state(session_id: str, snapshot: SessionSnapshot) -> SessionState:
        tracker = TrackerState.from_dict(snapshot.tracker)
        return SessionState(
            session_id=session_id,
            model=snapshot.model,
            modalities=list(snapshot.layout.modalities),
            seq=snapshot.seq,
            started_at=_timestamp(snapshot.started),
            updated_at=_timestamp(snapshot.updated),
            activity=tracker.activity,
            confidence=tracker.confidence,
            since=_timestamp(tracker.since) if tracker.since is not None else None,
            windows=snapshot.windows,
            received=snapshot.received,
            buffered=snapshot.buffered,
            recent=[WindowPrediction.model_validate(p) for p in snapshot.predictions],
        )

    async def history(self, session_id: str, since: datetime | None, until: datetime | None) -> History:
        """The session's activity segments overlapping ``[since, until]``, the ongoing one last."""
        snapshot = await self._snapshot(session_id)
        closed = await self.store.history(session_id)
        segments = [_segment(SegmentRecord(**record), ongoing=False) for record in closed]
        ongoing = TrackerState.from_dict(snapshot.tracker).segment
        if ongoing is not None and ongoing.windows > 0:
            segments.append(_segment(ongoing, ongoing=True))
        return History(
            session_id=session_id,
            segments=[
                segment
                for segment in segments
                if (since is None or segment.end >= since) and (until is None or segment.start <= until)
            ],
        )

    async def events(self, session_id: str, last_event_id: str | None) -> AsyncIterator[Event | None]:
        """The session's events after ``last_event_id`` (else from now on), ``None`` when idle for a
        keep-alive, and a final ``end`` event once the session is deleted or expires.

        A session that has not started yet is waited for, and followed from its first event. Resuming
        after an event of a session that is gone meanwhile (any id but ``FIRST_EVENT_ID``) ends at once.
        """
        position = await self.store.event_position(session_id)
        if position.generation is None and last_event_id not in (None, FIRST_EVENT_ID):
            return self._ended(session_id)
        return self._follow(session_id, last_event_id or position.last_id, position.generation)

    async def _follow(self, session_id: str, after: str, generation: str | None) -> AsyncIterator[Event | None]:
        """Events of the session's ``generation`` after ``after``; with none, of the session that starts next."""
        while True:
            try:
                batch = await self.store.read_events(
                    session_id, after, generation=generation, wait_seconds=self.settings.sse_keepalive_seconds
                )
            except StoreUnavailable:
                return  # the client reconnects with the last id it saw
            if generation is None:
                generation = batch.generation  # the session started (or is still awaited)
            if batch.generation != generation:  # ended, expired, or ended and started again
                async for event in self._ended(session_id):
                    yield event
                return
            for event in batch.events:
                yield event
                after = event.id
            if not batch.events:
                yield None

    @staticmethod
    async def _ended(session_id: str) -> AsyncIterator[Event]:
        yield Event("end", json.dumps({"session_id": session_id, "reason": "ended or expired"}))

    async def overview(self, limit: int, feed: int) -> tuple[int, list[SessionSummary], list[FeedItem]]:
        """The live-session count, the ``limit`` sessions updated last and their ``feed`` newest predictions."""
        now, ttl = time.time(), self.settings.session_ttl_seconds
        count = await self.store.active_sessions(now=now, ttl_seconds=ttl)
        ids = await self.store.recent_sessions(now=now, ttl_seconds=ttl, limit=limit)
        snapshots = await self.store.get_many(ids)
        sessions, items = [], []
        for session_id, snapshot in zip(ids, snapshots, strict=True):
            if snapshot is None:  # ended between the two reads
                continue
            try:
                state = self._state(session_id, snapshot)
            except (ValueError, OverflowError):
                # One session's unreadable record (e.g. times beyond the calendar, written before they were
                # refused) must not take the overview away from every other session.
                log.exception("session %s left out of the overview", session_id)
                continue
            last_window = state.recent[-1] if state.recent else None
            lasted = (last_window.end_time - state.since).total_seconds() if last_window and state.since else None
            # The summary is the fields of the state it names, plus the last window and how long the activity lasted.
            sessions.append(
                SessionSummary.model_validate({**dict(state), "last_window": last_window, "activity_seconds": lasted})
            )
            items += [FeedItem.model_validate({**dict(p), "session_id": session_id}) for p in state.recent[-feed:]]
        # Server time orders them: sessions may each keep a clock of their own.
        items.sort(key=lambda item: (item.recorded_at, item.window), reverse=True)
        return count, sessions, items[:feed]

    async def delete(self, session_id: str) -> None:
        if not await self.store.delete(session_id):
            raise SessionNotFound(session_id)

    async def _snapshot(self, session_id: str) -> SessionSnapshot:
        snapshot = await self.store.get(session_id)
        if snapshot is None:
            raise SessionNotFound(session_id)
        return snapshot

    async def refresh_active_gauge(self) -> None:
        """Count the live sessions when metrics are scraped, rather than on every chunk."""
        try:
            count = await self.store.active_sessions(now=time.time(), ttl_seconds=self.settings.session_ttl_seconds)
        except StoreUnavailable:
            return  # an outage must not fail the scrape: the gauge keeps its last count
        metrics.ACTIVE_SESSIONS.set(count)

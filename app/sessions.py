"""Streaming sessions: chunks of samples in, a prediction for every complete window out.

A session's modalities and model are fixed by its first chunk (``seq`` 0). Windows
start every ``hop_seconds`` and are classified as soon as every modality covers one;
the store hands out complete windows and records each window's prediction once, even
when several API processes serve one session. A window whose classification failed
(overload, store outage) stays pending: retrying the chunk classifies it then.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np

from app import metrics
from app.engine import InferenceEngine
from app.errors import ApiError, invalid_input, unavailable
from app.schemas import SamplesChunk, SamplesResponse, SessionState, WindowPrediction
from app.settings import Settings
from app.store import (
    AppendResult,
    BufferOverflow,
    ModalityMismatch,
    SeqConflict,
    SessionSnapshot,
    SessionStore,
    StoreUnavailable,
    StreamLayout,
)


def _timestamp(epoch_seconds: float) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, tz=UTC)


class SessionService:
    def __init__(self, store: SessionStore, engine: InferenceEngine, settings: Settings) -> None:
        self.store = store
        self.engine = engine
        self.settings = settings

    def _unavailable(self, error: StoreUnavailable) -> ApiError:
        return unavailable(
            "store_unavailable", f"session store unreachable: {error}", self.settings.retry_after_seconds
        )

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

    async def append(self, session_id: str, chunk: SamplesChunk) -> SamplesResponse:
        arrays = {name: self.engine.to_samples(name, rows) for name, rows in chunk.modalities.items()}
        try:
            result = await self.store.append(
                session_id,
                seq=chunk.seq,
                model=chunk.model,
                layout=self.layout_for(list(arrays)),
                chunk={name: array.astype("<f4").tobytes() for name, array in arrays.items()},
                now=time.time(),
                ttl_seconds=self.settings.session_ttl_seconds,
            )
        except StoreUnavailable as error:
            raise self._unavailable(error) from error
        except SeqConflict as error:
            raise ApiError(
                409,
                "seq_conflict",
                f"seq {chunk.seq} is out of order: expected {error.expected}",
                details=[{"expected_seq": error.expected}],
            ) from error
        except ModalityMismatch as error:
            raise invalid_input(
                f"this session streams {', '.join(error.session_modalities)}; got {', '.join(arrays)}"
            ) from error
        except BufferOverflow as error:
            raise invalid_input(
                f"{error.modality}: more than {self.settings.max_buffer_seconds:g} s buffered beyond a window; "
                "send the other modalities' samples too"
            ) from error
        if not result.duplicate:
            for name, array in arrays.items():
                metrics.INGESTED_SAMPLES.labels(modality=name).inc(len(array))
        predictions, buffered = await self._classify(session_id, result) if result.windows else ([], result.buffered)
        return SamplesResponse(
            session_id=session_id,
            seq=result.seq,
            duplicate=result.duplicate,
            predictions=predictions,
            received=result.received,
            buffered=buffered,
        )

    async def _classify(self, session_id: str, result: AppendResult) -> tuple[list[WindowPrediction], dict[str, int]]:
        """Classify the pending windows and commit them; returns them and the samples still buffered."""
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
                )
            )
        try:
            committed = await self.store.commit(
                session_id,
                result.first_window,
                [p.model_dump(mode="json") for p in predictions],
                keep=self.settings.recent_predictions,
                ttl_seconds=self.settings.session_ttl_seconds,
            )
        except StoreUnavailable as error:
            raise self._unavailable(error) from error
        # Counted once per window, by the process whose commit recorded it.
        for prediction in predictions:
            if prediction.window in committed.recorded:
                metrics.PREDICTIONS.labels(model=prediction.model, activity=prediction.activity).inc()
        return predictions, committed.buffered

    async def state(self, session_id: str) -> SessionState:
        snapshot = await self._snapshot(session_id)
        recent = [WindowPrediction.model_validate(p) for p in snapshot.predictions]
        activity, confidence, since = self._current_activity(recent)
        return SessionState(
            session_id=session_id,
            model=snapshot.model,
            modalities=list(snapshot.layout.modalities),
            seq=snapshot.seq,
            started_at=_timestamp(snapshot.started),
            updated_at=_timestamp(snapshot.updated),
            activity=activity,
            confidence=confidence,
            since=since,
            windows=snapshot.windows,
            received=snapshot.received,
            buffered=snapshot.buffered,
            recent=recent,
        )

    def _current_activity(self, recent: list[WindowPrediction]) -> tuple[str | None, float | None, datetime | None]:
        """Mean probabilities over the last few windows; since = start of the run of that smoothed activity."""
        if not recent:
            return None, None, None
        classes = self.engine.reference.class_names
        probabilities = np.array([[p.probabilities[c] for c in classes] for p in recent])
        k = self.settings.smoothing_windows
        smoothed = [probabilities[max(0, i - k + 1) : i + 1].mean(axis=0) for i in range(len(recent))]
        labels = [int(s.argmax()) for s in smoothed]
        first = len(labels) - 1
        while first > 0 and labels[first - 1] == labels[-1]:
            first -= 1
        return classes[labels[-1]], float(smoothed[-1].max()), recent[first].start_time

    async def delete(self, session_id: str) -> None:
        try:
            deleted = await self.store.delete(session_id)
        except StoreUnavailable as error:
            raise self._unavailable(error) from error
        if not deleted:
            raise ApiError(404, "session_not_found", f"no session {session_id!r} (ended or expired)")

    async def _snapshot(self, session_id: str) -> SessionSnapshot:
        try:
            snapshot = await self.store.get(session_id)
        except StoreUnavailable as error:
            raise self._unavailable(error) from error
        if snapshot is None:
            raise ApiError(404, "session_not_found", f"no session {session_id!r} (never started, ended or expired)")
        return snapshot

    async def refresh_active_gauge(self) -> None:
        """Count the live sessions when metrics are scraped, rather than on every chunk."""
        try:
            count = await self.store.active_sessions(now=time.time(), ttl_seconds=self.settings.session_ttl_seconds)
        except StoreUnavailable:
            return  # an outage must not fail the scrape: the gauge keeps its last count
        metrics.ACTIVE_SESSIONS.set(count)

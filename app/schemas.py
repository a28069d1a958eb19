"""Request and response bodies of the API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

# A sample value: a JSON number, never a string, boolean, NaN or infinity.
Sample = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# Rows of samples of one modality: ``[[x, y, z], ...]``, one row per sample.
Rows = list[list[Sample]]
ModalityName = Annotated[str, Field(min_length=1)]
ModelChoice = Literal["student", "teacher", "cascade"]
# A session id, chosen by the client: it names Redis keys and MQTT topics, so it is kept plain.
SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
SESSION_ID_RULE = "use 1 to 128 letters, digits, '.', '_', ':' or '-'"


# The request bodies below document what the routes decode themselves (``app.decoding``); the
# OpenAPI document shows them with examples sized to the served models (``app.openapi``).


class WindowSamples(BaseModel):
    modalities: dict[ModalityName, Rows] = Field(
        min_length=1,
        description="One window per modality: exactly the model's samples per window, one row of channels each.",
    )


class Window(WindowSamples):
    model: ModelChoice = "student"


class PackedSamples(BaseModel):
    """Samples of one modality in the MessagePack body: ``shape`` [samples, channels] and their float32 bytes."""

    shape: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=1)]]
    data: bytes = Field(description="samples x channels little-endian float32 values, row by row (MessagePack bin).")


class PackedWindowSamples(BaseModel):
    modalities: dict[ModalityName, PackedSamples] = Field(min_length=1)


class PackedWindow(PackedWindowSamples):
    model: ModelChoice = "student"


class Prediction(BaseModel):
    activity: str
    confidence: float
    probabilities: dict[str, float]
    model: str = Field(description="The model that answered (in a cascade, the student or the teacher).")
    model_version: str
    modalities_used: list[str]
    latency_ms: float


class BatchRequest(BaseModel):
    windows: list[WindowSamples] = Field(min_length=1, description="At most DMFT_MAX_BATCH_WINDOWS.")
    model: ModelChoice = "student"


class PackedBatchRequest(BaseModel):
    windows: list[PackedWindowSamples] = Field(min_length=1, description="At most DMFT_MAX_BATCH_WINDOWS.")
    model: ModelChoice = "student"


class BatchResponse(BaseModel):
    predictions: list[Prediction]


class ModalityInfo(BaseModel):
    name: str
    channels: int
    sample_rate: float
    samples_per_window: int


class ModelInfo(BaseModel):
    name: str
    version: str
    params: int
    window_seconds: float
    modalities: list[ModalityInfo]
    classes: list[str]
    metrics: dict = Field(description="Held-out evaluation stored in the bundle.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    cascade_threshold: float


class _ChunkFields(BaseModel):
    seq: int = Field(ge=0, description="0 for the first chunk of a session, then one more per chunk.")
    model: ModelChoice = Field(default="student", description="Fixed by the session's first chunk.")
    timestamp: AwareDatetime | None = Field(
        default=None,
        description="The client's clock at the chunk's first sample, from 1970-01-01 to before 2200-01-01. On seq 0 "
        "it becomes the session's time origin, so window and transition times are in the client's clock; otherwise "
        "server time is used.",
    )


class SamplesChunk(_ChunkFields):
    modalities: dict[ModalityName, Rows] = Field(
        min_length=1, description="Samples per modality, any count, at its rate."
    )


class PackedSamplesChunk(_ChunkFields):
    modalities: dict[ModalityName, PackedSamples] = Field(
        min_length=1, description="Samples per modality, any count, at its rate."
    )


class WindowPrediction(BaseModel):
    window: int = Field(description="Index of the window in the session, from 0.")
    start_seconds: float = Field(description="Start of the window, seconds after the session's first sample.")
    end_seconds: float
    start_time: datetime
    end_time: datetime
    start_sample: dict[str, int] = Field(description="Index of the window's first sample, per modality.")
    end_sample: dict[str, int] = Field(description="Index one past the window's last sample, per modality.")
    activity: str
    confidence: float
    probabilities: dict[str, float]
    model: str
    recorded_at: datetime = Field(description="When the service classified the window (server clock).")


class Transition(BaseModel):
    """The tracked activity of a session changed; ``time`` is the start of the new activity's first window."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    session_id: str
    from_activity: str = Field(alias="from", description="Activity left: a class, or 'unknown'.")
    to_activity: str = Field(alias="to", description="Activity entered: a class, or 'unknown'.")
    time: datetime
    window: int = Field(description="Index of the first window of the new activity.")
    confidence: float = Field(description="Mean confidence of the windows that confirmed the new activity.")
    model: str


class SamplesResponse(BaseModel):
    session_id: str
    seq: int
    duplicate: bool = Field(description="True when this seq was already appended; nothing was appended again.")
    predictions: list[WindowPrediction]
    transitions: list[Transition] = Field(description="Activity changes these windows confirmed, oldest first.")
    received: dict[str, int] = Field(description="Samples received so far, per modality.")
    buffered: dict[str, int] = Field(description="Samples held for windows still to come, per modality.")


class SessionState(BaseModel):
    session_id: str
    model: str
    modalities: list[str]
    seq: int
    started_at: datetime
    updated_at: datetime
    activity: str = Field(description="The tracked activity (with hysteresis), 'unknown' until one is confirmed.")
    confidence: float | None = Field(description="Mean confidence of the windows that confirmed it.")
    since: datetime | None = Field(description="Start of the first window of the current activity.")
    windows: int = Field(description="Windows classified so far.")
    received: dict[str, int]
    buffered: dict[str, int]
    recent: list[WindowPrediction] = Field(description="Latest predictions, newest last.")


class Segment(BaseModel):
    activity: str
    start: datetime
    end: datetime = Field(description="End of the segment's last window so far when ongoing.")
    mean_confidence: float = Field(description="Mean probability the segment's windows gave its activity.")
    windows: int
    ongoing: bool


class History(BaseModel):
    session_id: str
    segments: list[Segment] = Field(description="Oldest first; those overlapping [since, until] when given.")


class SessionSummary(BaseModel):
    session_id: str
    model: str
    modalities: list[str]
    activity: str
    confidence: float | None
    since: datetime | None
    updated_at: datetime
    windows: int
    last_window: WindowPrediction | None
    activity_seconds: float | None = Field(
        description="How long the tracked activity had lasted at the last window, in the session's clock: add the "
        "time since the last window's recorded_at for how long it lasts now."
    )


class FeedItem(BaseModel):
    session_id: str
    window: int
    activity: str
    confidence: float
    model: str
    end_time: datetime = Field(description="End of the window, in the session's clock.")
    recorded_at: datetime = Field(description="When it was classified (server clock): the feed's order.")


class LatencyHistogram(BaseModel):
    """A Prometheus histogram of this process (or all workers), cumulative since start."""

    bounds: list[float] = Field(description="Bucket upper bounds in seconds; a last bucket (+Inf) follows.")
    counts: list[float] = Field(description="Cumulative count per bucket, +Inf last (the total).")
    quantiles_ms: dict[str, float | None] = Field(description="p50, p95, p99 since start, interpolated.")


class Overview(BaseModel):
    generated_at: datetime
    active_sessions: int
    sessions: list[SessionSummary] = Field(description="The most recently updated live sessions, newest first.")
    recent_predictions: list[FeedItem] = Field(description="Their latest window predictions, newest recorded first.")
    request_latency: LatencyHistogram = Field(description="API requests, without scrapes and this page's polling.")
    inference_latency: dict[str, LatencyHistogram] = Field(description="Forward passes, per model.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. 'invalid_input', 'seq_conflict'.")
    message: str
    details: list[dict] = Field(
        description="Machine-readable specifics, e.g. the field and problem, or the expected seq; at most 5."
    )
    request_id: str = Field(description="The answer's X-Request-ID; the service's log names it beside the details.")


class ErrorResponse(BaseModel):
    error: ErrorBody

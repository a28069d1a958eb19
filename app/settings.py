"""Every setting of the service, read from the environment (prefix ``DMFT_``, plus ``REDIS_URL``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, AnyHttpUrl, BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SHIPPED_BUNDLES = Path(__file__).resolve().parent.parent / "model" / "weights"


class WebhookTarget(BaseModel):
    url: AnyHttpUrl
    secret: SecretStr = Field(min_length=16, description="Signs each request (HMAC-SHA256).")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DMFT_", extra="ignore")

    bundles: Path = Field(
        default=SHIPPED_BUNDLES, description="Directory holding the 'teacher/' and 'student/' bundles."
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "DMFT_REDIS_URL"),
        description="Redis for session buffers (redis+cluster://host:port,... for a cluster); unset keeps sessions "
        "in this process.",
    )
    redis_prefix: str = Field(default="dmft", description="Prefix of every Redis key.")
    redis_shards: int = Field(
        default=16,
        ge=1,
        le=16384,
        description="Parts of the session index and webhook outbox, each in one cluster slot; fixed for the life of "
        "the data under the prefix.",
    )
    redis_max_connections: int = Field(
        default=50, ge=1, description="Connections to Redis per process (per node of a cluster) at most."
    )
    redis_pool_timeout_seconds: float = Field(
        default=5.0, gt=0, description="How long a request waits for a free Redis connection before 503."
    )
    max_sessions: int = Field(default=1000, ge=1, description="Sessions the embedded store holds at most.")
    compile_models: bool = Field(default=True, description="Trace and freeze the networks at start-up.")
    torch_threads: int = Field(default=1, ge=1, description="Intra-op threads per forward pass.")

    cascade_threshold: float = Field(
        default=0.8, ge=0, le=1, description="In 'cascade', the teacher answers when the student is less sure."
    )
    max_batch_size: int = Field(default=64, ge=1, description="Windows per forward pass at most.")
    # 0: a batch is whatever queued while the previous forward pass ran, so batches grow
    # with load and a lone request waits for nothing (2 ms cut one client to a quarter).
    max_batch_delay_ms: float = Field(default=0.0, ge=0, description="How long a window waits for others to join.")
    queue_size: int = Field(default=1024, ge=1, description="Windows waiting per model before 503.")
    retry_after_seconds: int = Field(default=1, ge=1, description="Retry-After of overload and outage answers.")
    # Longer than a busy teacher's queue takes to drain (about 1.3 s for a full queue of 1,024 windows),
    # far shorter than a client waits before it gives up and sends again.
    queue_timeout_seconds: float = Field(
        default=2.0, ge=0, description="Windows queued longer are answered 503 and not computed (0: no deadline)."
    )
    # Far beyond any sensor's range in any unit, far below what overflows the networks (about 1e20).
    max_sample_magnitude: float = Field(
        default=1e6, gt=0, le=1e30, description="Samples of larger magnitude are refused with 422, naming their row."
    )

    hop_seconds: float = Field(default=1.0, gt=0, description="A session is classified every this many seconds.")
    session_ttl_seconds: int = Field(default=900, ge=1, description="An idle session expires after this.")
    # Both chosen on validation streams by bench/tracking.py (the README's tracking section).
    transition_delay_seconds: float = Field(
        default=3.5,
        gt=0,
        description="A change backed by clear windows is reported this long after it happens; "
        "longer means fewer false transitions.",
    )
    transition_windows: int | None = Field(
        default=None,
        ge=1,
        description="Deprecated: use transition_delay_seconds; N stands for one window plus N-1 hops.",
    )
    transition_min_confidence: float = Field(
        default=0.5, ge=0, lt=1, description="Below this top probability a window counts towards 'unknown'."
    )
    recent_predictions: int = Field(default=50, ge=1, description="Predictions kept per session.")
    retained_events: int = Field(default=1000, ge=1, description="Events kept per session for SSE resumption.")
    retained_segments: int = Field(default=1000, ge=1, description="Closed activity segments kept per session.")
    outbox_size: int = Field(default=100_000, ge=1, description="Transitions queued for webhook delivery, in all.")
    sse_keepalive_seconds: float = Field(default=15.0, gt=0, description="Comment sent on an idle event stream.")
    max_buffer_seconds: float = Field(
        default=120.0, gt=0, description="Samples a session may hold per modality ahead of a full window."
    )

    max_body_bytes: int = Field(default=4_000_000, ge=1024, description="Larger request bodies get 413.")
    # Slow clients: uvicorn bounds only the idle time between requests, dmft serve the rest.
    header_timeout_seconds: float = Field(
        default=10.0, gt=0, description="A request's headers must arrive within this, else 408."
    )
    body_timeout_seconds: float = Field(
        default=30.0, gt=0, description="A request's body must arrive within this after its headers, else 408."
    )
    keepalive_timeout_seconds: int = Field(default=5, ge=1, description="An idle kept-alive connection is closed.")
    max_connections: int = Field(
        default=2048, ge=1, description="Open connections per worker process; more are closed when accepted."
    )
    max_batch_windows: int = Field(default=256, ge=1, description="Windows in one /v1/predict/batch request.")

    webhooks: list[WebhookTarget] = Field(
        default=[], description='Targets of transition events, as JSON: [{"url": "...", "secret": "..."}].'
    )
    webhook_timeout_seconds: float = Field(default=5.0, gt=0, description="Per delivery attempt.")
    webhook_initial_backoff_seconds: float = Field(default=0.5, gt=0, description="First retry delay; doubles.")
    webhook_max_backoff_seconds: float = Field(default=60.0, gt=0, description="Longest delay between retries.")
    webhook_give_up_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="An event still failing this long after its transition is dropped (counted); delivery moves on.",
    )
    webhook_lease_seconds: float = Field(
        default=10.0, gt=0, description="One API process delivers per target; another takes over after this."
    )

    @model_validator(mode="after")
    def _webhook_attempts_fit_in_the_lease(self) -> Settings:
        # A POST starts only right after the lease is renewed; it must end before the lease can pass
        # to another process, or that process could send the next event first.
        if self.webhook_timeout_seconds >= self.webhook_lease_seconds:
            raise ValueError("webhook_timeout_seconds must be shorter than webhook_lease_seconds")
        return self

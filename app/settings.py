"""Every setting of the service, read from the environment (prefix ``DMFT_``, plus ``REDIS_URL``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SHIPPED_BUNDLES = Path(__file__).resolve().parent.parent / "model" / "weights"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DMFT_", extra="ignore")

    bundles: Path = Field(
        default=SHIPPED_BUNDLES, description="Directory holding the 'teacher/' and 'student/' bundles."
    )
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "DMFT_REDIS_URL"),
        description="Redis for session buffers; unset keeps sessions in this process.",
    )
    redis_prefix: str = Field(default="dmft", description="Prefix of every Redis key.")
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

    hop_seconds: float = Field(default=1.0, gt=0, description="A session is classified every this many seconds.")
    session_ttl_seconds: int = Field(default=900, ge=1, description="An idle session expires after this.")
    smoothing_windows: int = Field(default=3, ge=1, description="Windows averaged for a session's activity.")
    recent_predictions: int = Field(default=50, ge=1, description="Predictions kept per session.")
    max_buffer_seconds: float = Field(
        default=120.0, gt=0, description="Samples a session may hold per modality ahead of a full window."
    )

    max_body_bytes: int = Field(default=4_000_000, ge=1024, description="Larger request bodies get 413.")
    max_batch_windows: int = Field(default=256, ge=1, description="Windows in one /v1/predict/batch request.")

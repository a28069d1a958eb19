"""What one MQTT bridge carries at most (apart from the bridge, so that the CLI reads the defaults
without loading the models)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BridgeLimits:
    max_sessions: int = 1000  # session workers alive at once
    max_queued_chunks: int = 100  # chunks waiting for one session's worker
    # A session's worker retires after this long without a chunk (its next chunk starts another).
    idle_seconds: float = 60.0

"""Session stores: per-session sample buffers and predictions, in Redis or in this process."""

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
    StoreUnavailable,
    StreamLayout,
    parse_event_id,
)

__all__ = [
    "AppendResult",
    "BufferOverflow",
    "CommitResult",
    "Event",
    "EventBatch",
    "ModalityMismatch",
    "OutboxEntry",
    "Retention",
    "SeqConflict",
    "SessionSnapshot",
    "SessionStore",
    "StoreUnavailable",
    "StreamLayout",
    "parse_event_id",
]

"""Session stores: per-session sample buffers and predictions, in Redis or in this process."""

from app.store.base import (
    AppendResult,
    BufferOverflow,
    CommitResult,
    ModalityMismatch,
    SeqConflict,
    SessionSnapshot,
    SessionStore,
    StoreUnavailable,
    StreamLayout,
)

__all__ = [
    "AppendResult",
    "BufferOverflow",
    "CommitResult",
    "ModalityMismatch",
    "SeqConflict",
    "SessionSnapshot",
    "SessionStore",
    "StoreUnavailable",
    "StreamLayout",
]

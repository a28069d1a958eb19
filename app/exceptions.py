"""What can go wrong below the routes, in the service's own words.

The engine, the inference process's supervisor, request decoding and the session logic raise
these; they know nothing of HTTP. ``app.errors`` maps each class to a status, a code and
headers, once, for every route (and the MQTT bridge publishes the same shape).
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A request the service cannot carry out; ``message`` is for people, ``details`` for programs."""

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class InvalidInput(DomainError):
    """The request's content is wrong: the message names where and how."""


class UnsupportedMediaType(DomainError):
    """A body in a format the service does not read."""


class TooManyWindows(DomainError):
    """A batch request over the configured number of windows."""


class SessionNotFound(DomainError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session {session_id!r} (never started, ended or expired)")


class SeqOutOfOrder(DomainError):
    def __init__(self, seq: int, expected: int) -> None:
        super().__init__(f"seq {seq} is out of order: expected {expected}", details=[{"expected_seq": expected}])
        self.expected = expected


class Overloaded(DomainError):
    """The model's queue has no room for the request's windows, or the service is shutting down."""


class SessionCapacity(DomainError):
    """The session store holds as many sessions as it may; a new one can start once others end."""


class QueueTimeout(DomainError):
    """Windows waited longer than the queue deadline; they were not computed."""


class InferenceUnavailable(DomainError):
    """The inference process is not running (it failed and is being restarted); nothing was computed."""

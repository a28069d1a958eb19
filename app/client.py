"""A typed Python client of the activity service: ``ActivityClient`` (sync) and ``AsyncActivityClient``.

Both clients share one description of every call (``_Api``: the request to send and how to read
its answer into the models of ``app.schemas``); each owns only its transport loop, so the two
cannot drift apart. Transport failures, 502, 503 (after its ``Retry-After``) and 504 are retried
with exponential backoff. Re-sending a chunk is safe because it goes out with the same ``seq``:
the server acknowledges a repeat of a session's last ``seq`` as ``duplicate`` and appends nothing,
so a chunk whose answer was lost on the way back is never counted twice.

Any other error answer raises ``ServiceError``, which carries the service's one error shape
``{"error": {"code", "message", "details", "request_id"}}``.

With ``binary=True`` the samples of predictions and chunks go out as MessagePack, each modality as
its shape and little-endian float32 bytes (``Content-Type: application/msgpack``): smaller bodies
that the service reads without parsing numbers. Answers are JSON either way.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote

import httpx
import msgspec
import numpy as np
from pydantic import BaseModel

from app.schemas import (
    SESSION_ID_PATTERN,
    BatchResponse,
    History,
    ModelChoice,
    ModelsResponse,
    Prediction,
    SamplesResponse,
    SessionState,
    Transition,
    WindowPrediction,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
# Samples per modality: rows of channels, as nested sequences or a (T, C) array.
Modalities = Mapping[str, Sequence[Sequence[float]] | np.ndarray]

MSGPACK_MEDIA_TYPE = "application/msgpack"
# What the API accepts as a session id.
SESSION_ID = re.compile(SESSION_ID_PATTERN)
RETRY_STATUSES = frozenset({502, 503, 504})
# Failures after which the request may be sent again (a malformed URL or a bad proxy setting may not).
TRANSIENT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# The server sends keep-alive comments far more often than this; an event stream silent this long is dead.
EVENTS_READ_TIMEOUT = 60.0


class ClientError(Exception):
    """Anything the client could not get done."""


class ServiceError(ClientError):
    """The service answered with an error: its status and ``{"error": {code, message, details}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.retry_after = retry_after

    @property
    def expected_seq(self) -> int | None:
        """On a 409 ``seq_conflict``: the ``seq`` the session expects next."""
        for detail in self.details:
            if isinstance(detail.get("expected_seq"), int):
                return detail["expected_seq"]
        return None

    @classmethod
    def from_response(cls, response: httpx.Response) -> ServiceError:
        try:
            error = response.json()["error"]
            code, message, details = str(error["code"]), str(error["message"]), error.get("details")
        except (ValueError, KeyError, TypeError):
            # Not the service's shape: a proxy in between answered, or something else listens there.
            code, message, details = "http_error", response.text[:200] or response.reason_phrase, None
        return cls(response.status_code, code, message, details, _retry_after(response))


class ServiceUnreachable(ClientError):
    """No answer came back, after every retry (connection refused, timed out, dropped)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries of one request in all; 5 wait up to 3 s in all
    backoff: float = 0.2  # seconds before the second try, doubling after each
    max_backoff: float = 5.0  # a longer Retry-After is not waited for: the error goes to the caller

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait after failed try ``attempt`` (from 0); None when the failure is final."""
        if attempt + 1 >= self.attempts or (retry_after is not None and retry_after > self.max_backoff):
            return None
        # Half-jittered, so that clients cut off together do not come back together.
        backoff = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        return max(backoff, retry_after or 0.0)


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds, given as seconds or as an HTTP date."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, (email.utils.parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


def _require_zone(name: str, value: datetime) -> None:
    """The service reads times with a zone only: a naive one would be a guess."""
    if value.tzinfo is None:
        raise ValueError(f"{name} must carry a time zone (e.g. datetime.now(UTC))")


def _rows(modalities: Modalities) -> dict[str, Any]:
    return {name: rows.tolist() if isinstance(rows, np.ndarray) else rows for name, rows in modalities.items()}


def _packed(modalities: Modalities) -> dict[str, Any]:
    """Each modality as ``{"shape": [samples, channels], "data": <little-endian float32 bytes>}``."""
    packed = {}
    for name, rows in modalities.items():
        array = np.ascontiguousarray(rows, dtype="<f4")
        if array.ndim != 2:
            raise ValueError(f"{name}: samples must be rows of channels (2-D), got shape {array.shape}")
        packed[name] = {"shape": list(array.shape), "data": array.tobytes()}
    return packed


def _reader(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.model_validate_json(response.content)


def _batch_predictions(response: httpx.Response) -> list[Prediction]:
    return BatchResponse.model_validate_json(response.content).predictions


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API call, independent of transport: what to send and how to read a success."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    body: Any = None
    params: dict[str, str] | None = None
    binary: bool = False  # the body goes as MessagePack rather than JSON
    # Answers that mean an earlier try, whose answer was lost, already did it (a DELETE finds nothing left).
    done_if_resent: frozenset[int] = frozenset()

    def content(self) -> dict[str, Any]:
        """The body's arguments of an ``httpx`` request."""
        if self.body is None:
            return {}
        if self.binary:
            return {"content": msgspec.msgpack.encode(self.body), "headers": {"content-type": MSGPACK_MEDIA_TYPE}}
        return {"json": self.body}

    def result(self, response: httpx.Response, resent: bool) -> T:
        if response.is_success or (resent and response.status_code in self.done_if_resent):
            return self.read(response)
        raise ServiceError.from_response(response)


class PredictionEvent(WindowPrediction):
    session_id: str


class SessionEnd(BaseModel):
    session_id: str
    reason: str


_EVENT_PAYLOADS: dict[str, type[PredictionEvent] | type[Transition] | type[SessionEnd]] = {
    "prediction": PredictionEvent,
    "transition": Transition,
    "end": SessionEnd,
}


@dataclass(frozen=True)
class SessionEvent:
    """One event of a session's stream: ``type`` is 'prediction', 'transition' or 'end'."""

    id: str | None
    type: str
    data: PredictionEvent | Transition | SessionEnd


@dataclass
class _EventFeed:
    """One subscription to a session's events across reconnections: SSE parsing, last id, failures."""

    path: str
    retry: RetryPolicy
    last_event_id: str | None
    failures: int = 0
    reconnect_delay: float | None = None  # the stream's own ``retry:`` field, when it sent one
    _type: str = ""
    _data: list[str] = field(default_factory=list)
    _id: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
        if self.last_event_id is not None:
            headers["last-event-id"] = self.last_event_id
        return headers

    def opened(self, response: httpx.Response) -> float | None:
        """After the answer's head (and, for an error, its body): None to read on, or seconds to wait and reopen."""
        self._type, self._data, self._id = "", [], self.last_event_id
        if response.is_success:
            return None
        wait = self.retry.delay(self.failures, _retry_after(response))
        if response.status_code not in RETRY_STATUSES or wait is None:
            raise ServiceError.from_response(response)
        self.failures += 1
        return wait

    def line(self, line: str) -> SessionEvent | None:
        """Feed one line of the stream (server-sent events format); returns an event when one is complete."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: the server's keep-alive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.reconnect_delay = int(value) / 1000
        return None

    def _dispatch(self) -> SessionEvent | None:
        kind, data, self._type, self._data = self._type or "message", self._data, "", []
        if self._id is not None:
            self.last_event_id = self._id
        payload = _EVENT_PAYLOADS.get(kind)
        if not data or payload is None:
            return None  # an event type this client does not know yet is skipped, not an error
        self.failures = 0
        return SessionEvent(self._id, kind, payload.model_validate_json("\n".join(data)))

    def dropped(self, error: Exception | None) -> float:
        """The connection failed or closed before the 'end' event: seconds to wait before reopening."""
        wait = self.retry.delay(self.failures)
        if wait is None:
            raise ServiceUnreachable(f"GET {self.path}: the event stream kept failing ({error or 'closed'})") from error
        self.failures += 1
        return self.reconnect_delay if self.reconnect_delay is not None else wait


class _Api:
    """Every call of the service as a ``_Call``, and the retry decision; no I/O."""

    def __init__(self, retry: RetryPolicy | None, binary: bool) -> None:
        self.retry = retry or RetryPolicy()
        self.binary = binary

    def _samples(self, modalities: Modalities) -> dict[str, Any]:
        return _packed(modalities) if self.binary else _rows(modalities)

    def _wait(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before sending again; None when this answer (or failure) is final."""
        if response is None:
            return self.retry.delay(attempt)
        if response.status_code not in RETRY_STATUSES:
            return None
        return self.retry.delay(attempt, _retry_after(response))

    @staticmethod
    def _session_path(session_id: str, suffix: str = "") -> str:
        return f"/v1/sessions/{quote(session_id, safe='')}{suffix}"

    def _predict(self, modalities: Modalities, model: ModelChoice) -> _Call[Prediction]:
        body = {"modalities": self._samples(modalities), "model": model}
        return _Call("POST", "/v1/predict", _reader(Prediction), body, binary=self.binary)

    def _predict_batch(self, windows: Sequence[Modalities], model: ModelChoice) -> _Call[list[Prediction]]:
        body = {"windows": [{"modalities": self._samples(window)} for window in windows], "model": model}
        return _Call("POST", "/v1/predict/batch", _batch_predictions, body, binary=self.binary)

    def _models(self) -> _Call[ModelsResponse]:
        return _Call("GET", "/v1/models", _reader(ModelsResponse))

    def _chunk(
        self, session_id: str, seq: int, modalities: Modalities, model: ModelChoice, timestamp: datetime | None
    ) -> _Call[SamplesResponse]:
        body: dict[str, Any] = {"seq": seq, "modalities": self._samples(modalities), "model": model}
        if timestamp is not None:
            _require_zone("timestamp", timestamp)
            body["timestamp"] = timestamp.isoformat()
        path = self._session_path(session_id, "/samples")
        return _Call("POST", path, _reader(SamplesResponse), body, binary=self.binary)

    def _session(self, session_id: str) -> _Call[SessionState]:
        return _Call("GET", self._session_path(session_id), _reader(SessionState))

    def _history(self, session_id: str, since: datetime | None, until: datetime | None) -> _Call[History]:
        for name, value in (("since", since), ("until", until)):
            if value is not None:
                _require_zone(name, value)
        params = {key: value.isoformat() for key, value in (("since", since), ("until", until)) if value is not None}
        return _Call("GET", self._session_path(session_id, "/history"), _reader(History), params=params)

    def _end(self, session_id: str) -> _Call[None]:
        return _Call("DELETE", self._session_path(session_id), lambda _: None, done_if_resent=frozenset({404}))

    def _events(self, session_id: str, last_event_id: str | None) -> _EventFeed:
        return _EventFeed(self._session_path(session_id, "/events"), self.retry, last_event_id)


class ActivityClient(_Api):
    """Blocking client; ``binary`` sends samples as MessagePack; ``**options`` go to ``httpx.Client``
    (transport, headers, auth, trust_env ...)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        binary: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(retry, binary)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, **options)

    def _send(self, call: _Call[T]) -> T:
        attempt, resent = 0, False
        while True:
            try:
                response = self._http.request(call.method, call.path, params=call.params, **call.content())
            except TRANSIENT_ERRORS as error:
                wait = self._wait(attempt, None)
                if wait is None:
                    raise ServiceUnreachable(f"{call.method} {call.path}: {error!r}") from error
            else:
                wait = self._wait(attempt, response)
                if wait is None:
                    return call.result(response, resent)
            log.debug("retrying %s %s in %.2f s", call.method, call.path, wait)
            time.sleep(wait)
            attempt, resent = attempt + 1, True

    def predict(self, modalities: Modalities, model: ModelChoice = "student") -> Prediction:
        return self._send(self._predict(modalities, model))

    def predict_batch(self, windows: Sequence[Modalities], model: ModelChoice = "student") -> list[Prediction]:
        return self._send(self._predict_batch(windows, model))

    def models(self) -> ModelsResponse:
        return self._send(self._models())

    def send_chunk(
        self,
        session_id: str,
        seq: int,
        modalities: Modalities,
        model: ModelChoice = "student",
        timestamp: datetime | None = None,
    ) -> SamplesResponse:
        """Append one chunk. When a retry answers ``duplicate``, the lost answer's predictions are in ``session()``."""
        return self._send(self._chunk(session_id, seq, modalities, model, timestamp))

    def stream(self, session_id: str, model: ModelChoice = "student", start_seq: int = 0) -> ChunkStream:
        return ChunkStream(self, session_id, model, start_seq)

    def session(self, session_id: str) -> SessionState:
        return self._send(self._session(session_id))

    def history(self, session_id: str, since: datetime | None = None, until: datetime | None = None) -> History:
        return self._send(self._history(session_id, since, until))

    def end_session(self, session_id: str) -> None:
        self._send(self._end(session_id))

    def events(self, session_id: str, last_event_id: str | None = None) -> Iterator[SessionEvent]:
        """The session's events as they happen (after ``last_event_id`` when given), until its 'end' event.

        A dropped connection is reopened with ``Last-Event-ID``, so no retained event is missed or repeated.
        """
        feed = self._events(session_id, last_event_id)
        timeout = httpx.Timeout(self._http.timeout.connect, read=EVENTS_READ_TIMEOUT)
        while True:
            try:
                with self._http.stream("GET", feed.path, headers=feed.headers(), timeout=timeout) as response:
                    if not response.is_success:
                        response.read()
                    wait = feed.opened(response)
                    if wait is None:
                        for line in response.iter_lines():
                            event = feed.line(line)
                            if event is not None:
                                yield event
                                if event.type == "end":
                                    return
                        wait = feed.dropped(None)
            except TRANSIENT_ERRORS as error:
                wait = feed.dropped(error)
            time.sleep(wait)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncActivityClient(_Api):
    """The asyncio client; ``binary`` and ``**options`` (for ``httpx.AsyncClient``) as in ``ActivityClient``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        binary: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(retry, binary)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, **options)

    async def _send(self, call: _Call[T]) -> T:
        attempt, resent = 0, False
        while True:
            try:
                response = await self._http.request(call.method, call.path, params=call.params, **call.content())
            except TRANSIENT_ERRORS as error:
                wait = self._wait(attempt, None)
                if wait is None:
                    raise ServiceUnreachable(f"{call.method} {call.path}: {error!r}") from error
            else:
                wait = self._wait(attempt, response)
                if wait is None:
                    return call.result(response, resent)
            log.debug("retrying %s %s in %.2f s", call.method, call.path, wait)
            await asyncio.sleep(wait)
            attempt, resent = attempt + 1, True

    async def predict(self, modalities: Modalities, model: ModelChoice = "student") -> Prediction:
        return await self._send(self._predict(modalities, model))

    async def predict_batch(self, windows: Sequence[Modalities], model: ModelChoice = "student") -> list[Prediction]:
        return await self._send(self._predict_batch(windows, model))

    async def models(self) -> ModelsResponse:
        return await self._send(self._models())

    async def send_chunk(
        self,
        session_id: str,
        seq: int,
        modalities: Modalities,
        model: ModelChoice = "student",
        timestamp: datetime | None = None,
    ) -> SamplesResponse:
        """Append one chunk. When a retry answers ``duplicate``, the lost answer's predictions are in ``session()``."""
        return await self._send(self._chunk(session_id, seq, modalities, model, timestamp))

    def stream(self, session_id: str, model: ModelChoice = "student", start_seq: int = 0) -> AsyncChunkStream:
        return AsyncChunkStream(self, session_id, model, start_seq)

    async def session(self, session_id: str) -> SessionState:
        return await self._send(self._session(session_id))

    async def history(self, session_id: str, since: datetime | None = None, until: datetime | None = None) -> History:
        return await self._send(self._history(session_id, since, until))

    async def end_session(self, session_id: str) -> None:
        await self._send(self._end(session_id))

    async def events(self, session_id: str, last_event_id: str | None = None) -> AsyncIterator[SessionEvent]:
        """The session's events as they happen (after ``last_event_id`` when given), until its 'end' event.

        A dropped connection is reopened with ``Last-Event-ID``, so no retained event is missed or repeated.
        """
        feed = self._events(session_id, last_event_id)
        timeout = httpx.Timeout(self._http.timeout.connect, read=EVENTS_READ_TIMEOUT)
        while True:
            try:
                async with self._http.stream("GET", feed.path, headers=feed.headers(), timeout=timeout) as response:
                    if not response.is_success:
                        await response.aread()
                    wait = feed.opened(response)
                    if wait is None:
                        async for line in response.aiter_lines():
                            event = feed.line(line)
                            if event is not None:
                                yield event
                                if event.type == "end":
                                    return
                        wait = feed.dropped(None)
            except TRANSIENT_ERRORS as error:
                wait = feed.dropped(error)
            await asyncio.sleep(wait)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ChunkStream:
    """Sends one session's chunks with ``seq`` 0, 1, 2 ... (or from ``start_seq``); a failed chunk keeps its seq."""

    def __init__(self, client: ActivityClient, session_id: str, model: ModelChoice, start_seq: int = 0) -> None:
        self.client, self.session_id, self.model, self.seq = client, session_id, model, start_seq

    def send(self, modalities: Modalities, timestamp: datetime | None = None) -> SamplesResponse:
        response = self.client.send_chunk(self.session_id, self.seq, modalities, self.model, timestamp)
        self.seq += 1
        return response


class AsyncChunkStream:
    """``ChunkStream`` for the asyncio client."""

    def __init__(self, client: AsyncActivityClient, session_id: str, model: ModelChoice, start_seq: int = 0) -> None:
        self.client, self.session_id, self.model, self.seq = client, session_id, model, start_seq

    async def send(self, modalities: Modalities, timestamp: datetime | None = None) -> SamplesResponse:
        response = await self.client.send_chunk(self.session_id, self.seq, modalities, self.model, timestamp)
        self.seq += 1
        return response

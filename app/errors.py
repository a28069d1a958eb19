"""One error shape for every 4xx and 5xx, and one table from domain exceptions to HTTP answers.

Every error answer is ``{"error": {"code", "message", "details": [...], "request_id"}}``: ``details``
is always a list (at most ``MAX_DETAILS`` entries; the message says how many more there were), and
``request_id`` is the ``X-Request-ID`` of the answer, which the log line of a server-side failure
names too. Messages never carry internal addresses or exception class names: those go to the log.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app import metrics
from app.exceptions import (
    DomainError,
    InferenceUnavailable,
    InvalidInput,
    Overloaded,
    QueueTimeout,
    SeqOutOfOrder,
    SessionCapacity,
    SessionNotFound,
    TooManyWindows,
    UnsupportedMediaType,
)
from app.store import StoreUnavailable

log = logging.getLogger(__name__)

MAX_DETAILS = 5
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# A client's X-Request-ID is kept when it is short and plain enough to log and echo safely.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
# Ids made here: random per process, then counted, so that they are unique without a system call each.
_ID_PREFIX = secrets.token_hex(5)
_id_counter = itertools.count()


def current_request_id() -> str:
    """The id of the request being answered (a fresh one outside a request, e.g. for an MQTT message)."""
    return _request_id.get() or new_request_id()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):06x}"


def bind_request_id(header: str | None) -> tuple[str, Token[str | None]]:
    """Adopt the client's id when sane, else a new one; returns it and the token that unbinds it."""
    request_id = header if header is not None and SANE_REQUEST_ID.fullmatch(header) else new_request_id()
    return request_id, _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)


class ApiError(Exception):
    """An error answer: status, code, message, details and headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The error shape of every answer and every published error message."""
        details = self.details[:MAX_DETAILS]
        message = self.message
        if len(self.details) > MAX_DETAILS:
            message += f" ({len(self.details) - MAX_DETAILS} more problems not listed)"
        return {
            "error": {"code": self.code, "message": message, "details": details, "request_id": current_request_id()}
        }


@dataclass(frozen=True)
class _Rule:
    status: int
    code: str
    retry: bool = False  # answered with Retry-After: the same request may succeed later
    public_message: str | None = None  # said instead of the exception's text, which may name internals


RULES: dict[type[Exception], _Rule] = {
    InvalidInput: _Rule(422, "invalid_input"),
    UnsupportedMediaType: _Rule(415, "unsupported_media_type"),
    TooManyWindows: _Rule(413, "too_many_windows"),
    SessionNotFound: _Rule(404, "session_not_found"),
    SeqOutOfOrder: _Rule(409, "seq_conflict"),
    Overloaded: _Rule(503, "overloaded", retry=True),
    QueueTimeout: _Rule(503, "queue_timeout", retry=True),
    SessionCapacity: _Rule(503, "session_limit", retry=True),
    InferenceUnavailable: _Rule(503, "inference_unavailable", retry=True),
    StoreUnavailable: _Rule(503, "store_unavailable", retry=True, public_message="session store unreachable"),
}


def describe(error: DomainError | StoreUnavailable, *, retry_after: int) -> ApiError:
    """The answer to a domain exception, by the first class of its MRO in ``RULES``."""
    rule = next(RULES[cls] for cls in type(error).__mro__ if cls in RULES)
    if rule.public_message is not None:
        log.warning("request %s: %s: %s", current_request_id(), rule.public_message, error)
        message, details = f"{rule.public_message}; retry shortly" if rule.retry else rule.public_message, []
    else:
        message, details = str(error), error.details if isinstance(error, DomainError) else []
    headers = {"Retry-After": str(retry_after)} if rule.retry else None
    return ApiError(rule.status, rule.code, message, details=details, headers=headers)


def invalid_fields(errors: list[dict[str, Any]]) -> ApiError:
    """422 for pydantic's validation ``errors`` (path and query parameters), each field written as
    ``modalities.accelerometer[3][1]``."""
    details = [{"field": _location(tuple(e["loc"])), "message": e["msg"], "type": e["type"]} for e in errors]
    first = details[0]
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return ApiError(422, "invalid_input", f"{first['field']}: {first['message']}{more}", details=details)


def error_response(error: ApiError) -> JSONResponse:
    metrics.ERRORS.labels(reason=error.code).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def internal_error() -> ApiError:
    return ApiError(
        500, "internal_error", f"internal error; the service's log has the details under request {current_request_id()}"
    )


def _location(loc: tuple[Any, ...]) -> str:
    # ("body", "modalities", "accelerometer", 3, 1) -> "modalities.accelerometer[3][1]"
    text = ""
    for part in loc[1:] if loc and loc[0] in ("body", "path", "query", "header") else loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: a 405 lists them all, not one route's."""
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)
    ]


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(invalid_fields(list(exc.errors())))


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError | StoreUnavailable)
    return error_response(describe(exc, retry_after=request.app.state.settings.retry_after_seconds))


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    path = request.url.path
    if exc.status_code == 404:
        return error_response(ApiError(404, "not_found", f"no resource at {path}"))
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        message = f"{request.method} is not allowed on {path}; allowed: {', '.join(allowed)}"
        return error_response(ApiError(405, "method_not_allowed", message, headers={"Allow": ", ".join(allowed)}))
    code = "payload_too_large" if exc.status_code == 413 else "http_error"
    return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers))


def install_error_handlers(app: FastAPI) -> None:
    """Errors raised below the routes; anything unexpected is answered by ``RequestContextMiddleware``."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(StoreUnavailable, _domain_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

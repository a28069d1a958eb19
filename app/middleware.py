"""ASGI middleware: request ids and unexpected errors, request metrics, and the request body limit."""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import ApiError, bind_request_id, error_response, internal_error, unbind_request_id

log = logging.getLogger(__name__)


class RequestContextMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` when sane) and echoes it on the answer.

    Outermost of the service's middleware, it also answers an unexpected exception with a 500 in the
    error shape and logs it under the request id. Starlette's own last resort answers too, but then
    re-raises, and the server drops the keep-alive connection without saying so.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, token = bind_request_id(Headers(scope=scope).get("x-request-id"))
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                answered = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request %s: %s %s failed", request_id, scope["method"], scope["path"])
            if answered:
                raise  # the answer is under way: nothing else can be said on this connection
            await error_response(internal_error())(scope, receive, send_with_id)
        finally:
            unbind_request_id(token)


class RequestMetricsMiddleware:
    """Observes every HTTP request's duration under its route template, never its raw path.

    Event streams are left out: they last as long as their client listens.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        streaming = False

        async def observe_status(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                streaming = any(
                    name == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message["headers"]
                )
            await send(message)

        try:
            await self.app(scope, receive, observe_status)
        finally:
            # An event stream lasts as long as its client listens: not a request latency.
            if not streaming:
                route = scope.get("route")
                metrics.REQUEST_DURATION.labels(
                    route=getattr(route, "path", "unmatched"), method=scope["method"], status=str(status)
                ).observe(time.perf_counter() - started)


class BodyLimitMiddleware:
    """413 in the service's error shape for bodies over ``max_bytes``, declared or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self) -> ApiError:
        return ApiError(413, "payload_too_large", f"request body over the limit of {self.max_bytes} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error())(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing to the error handlers.
                    raise HTTPException(413, self._error().message)
            return message

        await self.app(scope, limited_receive, send)

"""uvicorn's HTTP protocol with the limits it lacks against slow and numerous clients.

uvicorn closes a kept-alive connection that stays idle between requests, but it waits for
good on a request that never finishes arriving: a client may open connections and never send
a whole header, or trickle its body a byte at a time, and hold a file descriptor each. Here
every request has a deadline for its headers (from the connection's opening, or from its
first byte on a kept-alive connection) and one for its body (from the end of its headers);
when one passes the client is answered 408 in the service's error shape and the connection
closed. Connections beyond a per-process limit are closed as soon as they are accepted, so
that clients cannot take every file descriptor the process has.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from app import metrics
from app.errors import ApiError
from app.server import ServerConfig


class GuardedHttpProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: ServerConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits
        self._deadline: asyncio.TimerHandle | None = None
        self._request_begun = False  # a byte of the current request has arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(cast(asyncio.Transport, transport))
        if len(self.connections) > self.limits.max_connections:
            metrics.ERRORS.labels(reason="connection_limit").inc()
            self.transport.close()
            return
        self._arm(self.limits.header_timeout, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_begun = True
        if self._deadline is None:  # a later request on a kept-alive connection
            self._arm(self.limits.header_timeout, self._headers_late)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        self._arm(self.limits.body_timeout, self._body_late)

    def on_message_complete(self) -> None:
        self._disarm()
        self._request_begun = False
        super().on_message_complete()

    def _arm(self, seconds: float, late: Callable[[], None]) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._request_begun:
            self._refuse(f"the request's headers did not arrive within {self.limits.header_timeout:g} s")
        else:  # nothing was asked: there is nothing to answer
            metrics.ERRORS.labels(reason="request_timeout").inc()
            self.transport.close()

    def _body_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle.response_started:
            self.transport.close()
        else:
            self._refuse(f"the request's body did not arrive within {self.limits.body_timeout:g} s")
        # The app, waiting for the rest of the body, hears that the client is gone.
        cycle.disconnected = True
        cycle.message_event.set()

    def _refuse(self, message: str) -> None:
        """Answer 408 in the service's error shape, and close the connection."""
        error = ApiError(408, "request_timeout", message)
        metrics.ERRORS.labels(reason=error.code).inc()
        body = json.dumps(error.body()).encode()
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()

"""A webhook endpoint on loopback that checks signatures: for the tests of deliveries and for recorded runs."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tools.stack import free_port

SECRET = "test-secret-0123456789"


@dataclass
class Receiver:
    """A webhook endpoint on loopback: checks each signature, records each event."""

    port: int
    answer_after_s: float = 0.0  # a slow receiver
    received: list[dict] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)  # headers and raw body, as sent
    bad_signatures: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/activity"

    def settings_env(self) -> dict[str, str]:
        """The service's environment for delivering to this receiver."""
        return {"DMFT_WEBHOOKS": json.dumps([{"url": self.url, "secret": SECRET}])}

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                time.sleep(receiver.answer_after_s)
                timestamp = self.headers["X-DMFT-Timestamp"]
                expected = hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(self.headers["X-DMFT-Signature"], f"sha256={expected}"):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                else:
                    event = json.loads(body)
                    assert event["event_id"] == self.headers["X-DMFT-Event-Id"]
                    receiver.received.append(event)
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextmanager
def receiving(answer_after_s: float = 0.0) -> Iterator[Receiver]:
    """A running receiver on a free port, stopped afterwards."""
    receiver = Receiver(free_port(), answer_after_s)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()

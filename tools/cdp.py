"""Headless Chromium driven over the Chrome DevTools Protocol: the live page's tests and its README screenshot.

No browser automation library: Chromium starts with ``--remote-debugging-port=0``, writes
the port it picked and the browser's WebSocket path to ``DevToolsActivePort`` in its
profile directory, and is then spoken to over that one WebSocket (``websockets``, which
``uvicorn[standard]`` already installs), one page attached in flat session mode.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
STARTUP_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0
FLAGS = (
    "--headless",
    "--no-sandbox",  # the tests may run as root, where Chromium refuses its sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",  # no update checks or field trials: nothing leaves the machine
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # the page is on loopback; an HTTP_PROXY of the environment must not see it
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools call failed, or the page threw."""


class DevTools:
    """The browser's one WebSocket: commands answered by id, events handed to ``on_event`` as they arrive."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection
        self._ids = itertools.count(1)
        self.on_event: Callable[[dict[str, Any]], None] = lambda message: None

    def call(self, method: str, params: dict[str, Any], *, session_id: str | None = None) -> dict[str, Any]:
        """Send one command (to the page of ``session_id``, else the browser) and return its result."""
        call_id = next(self._ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if session_id is not None:
            message["sessionId"] = session_id
        self._connection.send(json.dumps(message))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            answer = self._receive(deadline, waiting_for=method)
            if answer.get("id") == call_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return answer["result"]

    def _receive(self, deadline: float, *, waiting_for: str) -> dict[str, Any]:
        """The next message; an event is also handed to ``on_event``."""
        try:
            message = json.loads(self._connection.recv(timeout=max(deadline - time.monotonic(), 0.0)))
        except TimeoutError as error:
            raise BrowserError(f"no {waiting_for} from Chromium in time") from error
        if "method" in message:
            self.on_event(message)
        return message


class Page:
    """One tab: navigate, evaluate JavaScript, wait for a condition, take screenshots.

    Uncaught exceptions and ``console.error`` calls of the page are collected in ``errors``
    as they arrive, so a test can assert that the page never failed. Once the ``Network``
    domain is enabled, every request the page makes is collected in ``requests`` (its URL by
    request id), and those the browser refused to send in ``blocked`` (the reason, such as
    ``csp``, by request id).
    """

    def __init__(self, devtools: DevTools, session_id: str) -> None:
        self._devtools = devtools
        self._session_id = session_id
        self.errors: list[str] = []
        self.requests: dict[str, str] = {}
        self.blocked: dict[str, str] = {}
        devtools.on_event = self._event

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command to the page and return its result."""
        return self._devtools.call(method, params, session_id=self._session_id)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (promises are awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {_describe(result['exceptionDetails'])}")
        return result["result"].get("value")

    def wait_for(self, expression: str, *, timeout_s: float = 30.0, interval_s: float = 0.1) -> Any:
        """Evaluate ``expression`` until it is truthy, and return that value; fail after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{expression!r} still {value!r} after {timeout_s:.0f} s")
            time.sleep(interval_s)

    def goto(self, url: str, *, timeout_s: float = 30.0) -> None:
        """Open ``url`` and wait until it has loaded (the document at ``url`` is complete, not the one before)."""
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"cannot open {url}: {answer['errorText']}")
        loaded = f"document.readyState === 'complete' && location.href === {json.dumps(url)}"
        deadline = time.monotonic() + timeout_s
        while True:
            with suppress(BrowserError):  # the document being replaced can fail an evaluation
                if self.evaluate(loaded):
                    return
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not load within {timeout_s:.0f} s")
            time.sleep(0.05)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def _event(self, message: dict[str, Any]) -> None:
        if message.get("sessionId") != self._session_id:
            return
        method, params = message["method"], message.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(_describe(params["exceptionDetails"]))
        elif method == "Network.requestWillBeSent":
            self.requests[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed" and params.get("blockedReason"):
            self.blocked[params["requestId"]] = params["blockedReason"]
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append(" ".join(str(arg.get("value", arg.get("description", ""))) for arg in params["args"]))


@contextmanager
def chromium(workdir: Path, *, width: int = 1280, height: int = 800) -> Iterator[Page]:
    """Headless Chromium with a fresh profile under ``workdir`` and one ``width`` × ``height`` page.

    Chromium and every process it forked are killed when the block ends, whatever happens in it.
    """
    profile = workdir / "chromium-profile"
    profile.mkdir(parents=True, exist_ok=True)
    port_file = profile / "DevToolsActivePort"
    port_file.unlink(missing_ok=True)  # a reused profile keeps the last run's, which names a dead port
    log = workdir / "chromium.log"
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
    with log.open("wb") as output:
        # A process group of its own: the renderer and helper processes go with the browser.
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = _devtools_url(port_file, process, log)
        with connect(url, max_size=None, proxy=None, open_timeout=STARTUP_TIMEOUT_S) as connection:
            devtools = DevTools(connection)
            target = devtools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            attached = devtools.call("Target.attachToTarget", {"targetId": target, "flatten": True})
            page = Page(devtools, attached["sessionId"])
            page.call("Runtime.enable")
            viewport = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            page.call("Emulation.setDeviceMetricsOverride", **viewport)
            yield page
    finally:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _devtools_url(port_file: Path, process: subprocess.Popen[bytes], log: Path) -> str:
    """The browser's WebSocket URL, once Chromium has written it (port, then path, one a line)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise BrowserError(f"{CHROMIUM} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        lines = port_file.read_text().split() if port_file.is_file() else []
        if len(lines) == 2:
            port, path = lines
            return f"ws://127.0.0.1:{port}{path}"
        if time.monotonic() > deadline:
            output = log.read_text(errors="replace")
            raise BrowserError(f"no {port_file.name} within {STARTUP_TIMEOUT_S:.0f} s:\n{output}")
        time.sleep(0.05)


def _describe(details: dict[str, Any]) -> str:
    exception = details.get("exception", {})
    return str(exception.get("description") or details.get("text", "exception"))

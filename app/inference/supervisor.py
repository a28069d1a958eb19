"""The API process's end of its inference process: start it, feed it, read its answers, restart it.

The inference process is spawned as a fresh interpreter (never forked from a process that has
imported torch) with one end of a socket pair; this side reads it on the event loop
(``asyncio.Protocol``), so answers resolve their requests' futures without a thread in between.
Each model admits at most ``queue_size`` windows in flight; more are refused at once
(``Overloaded``). When the inference process dies, every request it held is answered
``InferenceUnavailable`` at once and a new one is started, after a pause that grows while it
keeps failing. ``stop`` refuses new work, waits for the requests in flight and closes the socket,
which ends the inference process.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from app import metrics
from app.exceptions import InferenceUnavailable, Overloaded
from app.inference.protocol import (
    NO_DEADLINE,
    PASS_RECORD,
    Kind,
    Result,
    json_frame,
    predict_frame,
    read_json,
    read_result,
    split_frames,
)

log = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 300.0  # tracing and freezing both bundles on a busy small machine
STOP_TIMEOUT_S = 10.0  # for the inference process to exit once its socket is closed
RESTART_DELAY_S = 0.5  # before the first restart; doubles while restarts keep failing
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 60.0  # a process that lived this long resets the restart delay
SOCKET_BUFFER_BYTES = 4 << 20  # room for the windows that queue while a forward pass runs


@dataclass(frozen=True)
class LoadRequest:
    """What the inference process loads, and how it runs it."""

    bundles: list[str]  # bundle directories, in model-id order
    compile: bool
    threads: int
    max_batch_size: int
    max_batch_delay_s: float  # how long the first window of a batch waits for others to join it


@dataclass
class _Pending:
    future: asyncio.Future[Result]
    model: int
    windows: int
    enqueued: float


class _Connection(asyncio.Protocol):
    def __init__(self, on_frame: Callable[[Kind, bytes], None], on_lost: Callable[[], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for kind, body in split_frames(self.buffer):
            self.on_frame(kind, body)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()


class InferenceSupervisor:
    def __init__(self, load: LoadRequest, *, queue_size: int, queue_timeout_s: float) -> None:
        self.load = load
        self.queue_size = queue_size
        self.queue_timeout_s = queue_timeout_s
        self.manifests: list[dict[str, Any]] = []
        self._classes = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._outgoing: list[bytes] = []  # frames to send at the end of this turn of the event loop
        self._in_flight: list[int] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self._loaded: asyncio.Future[list[dict[str, Any]]] | None = None
        self._started_at = 0.0
        self._restart_delay = RESTART_DELAY_S
        self._restarting: asyncio.Task[None] | None = None
        self._stopping = False
        self._drained = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._transport is not None and not self._stopping

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> list[dict[str, Any]]:
        """Start the inference process; the loaded bundles' manifests once it is ready."""
        self.manifests = await self._spawn()
        self._classes = len(self.manifests[0]["config"]["class_names"])
        self._in_flight = [0] * len(self.manifests)
        for model, manifest in enumerate(self.manifests):
            metrics.QUEUE_CAPACITY.labels(model=manifest["name"]).set(self.queue_size)
            self._set_depth(model)
        return self.manifests

    async def _spawn(self) -> list[dict[str, Any]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (ours, theirs):
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                end.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        command = [sys.executable, "-m", "app.inference.process", str(theirs.fileno()), str(os.getpid())]
        with theirs:
            process = subprocess.Popen(command, pass_fds=(theirs.fileno(),))
        loop = asyncio.get_running_loop()
        self._loaded = loop.create_future()
        self._process = process
        transport: asyncio.Transport | None = None
        try:
            connection = functools.partial(_Connection, self._received, self._lost)
            transport, _ = await loop.connect_accepted_socket(connection, sock=ours)
            transport.write(json_frame(Kind.LOAD, asdict(self.load)))
            manifests = await asyncio.wait_for(self._loaded, LOAD_TIMEOUT_S)
        except BaseException:
            if transport is not None:
                transport.close()
            else:
                ours.close()
            await self._reap(process)
            raise
        self._transport = transport
        self._started_at = time.monotonic()
        log.info("inference process %d ready", process.pid)
        return manifests

    def submit(
        self, model: int, fallback: int, threshold: float, mask: int, windows: int, samples: bytes
    ) -> asyncio.Future[Result]:
        """Queue one group of windows (one modality subset); the future resolves with their answers."""
        name = self.manifests[model]["name"]
        if self._stopping:
            raise Overloaded("the service is shutting down; retry on another instance")
        if self._transport is None:
            raise InferenceUnavailable("the inference process is restarting; retry shortly")
        if self._in_flight[model] + windows > self.queue_size:
            queued = self._in_flight[model]
            raise Overloaded(f"the {name} model is at capacity ({queued} windows queued); retry shortly")
        request = next(self._ids)
        now = time.monotonic()
        deadline = now + self.queue_timeout_s if self.queue_timeout_s > 0 else NO_DEADLINE
        loop = asyncio.get_running_loop()
        if not self._outgoing:
            loop.call_soon(self._flush)
        self._outgoing.append(predict_frame(request, model, fallback, threshold, mask, windows, deadline, samples))
        future: asyncio.Future[Result] = loop.create_future()
        self._pending[request] = _Pending(future, model, windows, now)
        self._in_flight[model] += windows
        self._set_depth(model)
        return future

    def _flush(self) -> None:
        """Send what the requests of this turn of the event loop queued, in one write."""
        frames, self._outgoing = self._outgoing, []
        if self._transport is not None:  # else the process died meanwhile: their requests are answered already
            self._transport.write(b"".join(frames))

    def _received(self, kind: Kind, body: bytes) -> None:
        if kind is Kind.RESULT:
            result = read_result(body, self._classes)
            pending = self._pending.pop(result.request, None)
            if pending is None:
                return
            self._release(pending)
            self._settle()
            if result.started:
                wait = result.started - pending.enqueued
                queue_wait = metrics.QUEUE_WAIT.labels(model=self.manifests[pending.model]["name"])
                for _ in range(pending.windows):
                    queue_wait.observe(wait)
            if not pending.future.done():  # a client that went away cancelled it
                pending.future.set_result(result)
        elif kind is Kind.PASS:
            model, windows, seconds = PASS_RECORD.unpack(body)
            name = self.manifests[model]["name"]
            metrics.INFERENCE_DURATION.labels(model=name).observe(seconds)
            metrics.BATCH_SIZE.labels(model=name).observe(windows)
        elif kind is Kind.READY and self._loaded is not None and not self._loaded.done():
            self._loaded.set_result(read_json(body)["manifests"])
        elif kind is Kind.LOAD_FAILED and self._loaded is not None and not self._loaded.done():
            self._loaded.set_exception(RuntimeError(f"the models could not be loaded: {read_json(body)['message']}"))

    def _lost(self) -> None:
        """The socket closed: the inference process exited, or ``stop`` closed it."""
        if self._loaded is not None and not self._loaded.done():
            self._loaded.set_exception(RuntimeError("the inference process exited while loading the models"))
        was_serving = self._transport is not None
        self._transport = None
        failure = InferenceUnavailable("the inference process stopped; retry shortly")
        for pending in self._pending.values():
            self._release(pending)
            if not pending.future.done():
                pending.future.set_exception(failure)
        self._pending.clear()
        self._settle()
        if was_serving and not self._stopping:
            lived = time.monotonic() - self._started_at
            self._restart_delay = RESTART_DELAY_S if lived > STABLE_AFTER_S else self._restart_delay
            self._restarting = asyncio.get_running_loop().create_task(self._restart(), name="inference-restart")

    async def _restart(self) -> None:
        assert self._process is not None
        code = await self._reap(self._process)
        log.error("inference process %d exited (%s); restarting it", self._process.pid, code)
        while not self._stopping:
            await asyncio.sleep(self._restart_delay)
            self._restart_delay = min(self._restart_delay * 2, MAX_RESTART_DELAY_S)
            try:
                await self._spawn()
                return
            except Exception:
                log.exception("restarting the inference process failed")

    def _release(self, pending: _Pending) -> None:
        self._in_flight[pending.model] -= pending.windows
        self._set_depth(pending.model)

    def _settle(self) -> None:
        if not self._pending:
            self._drained.set()

    def _set_depth(self, model: int) -> None:
        metrics.QUEUE_DEPTH.labels(model=self.manifests[model]["name"]).set(self._in_flight[model])

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new windows, answer those in flight (for at most ``drain_timeout_s``), then end the process."""
        self._stopping = True
        if self._restarting is not None:
            self._restarting.cancel()
            await asyncio.gather(self._restarting, return_exceptions=True)
        if self._pending:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), drain_timeout_s)
            except TimeoutError:
                log.warning("stopping with %d requests unanswered", len(self._pending))
        if self._transport is not None:
            self._transport.close()
        if self._process is not None:
            await self._reap(self._process)

    @staticmethod
    async def _reap(process: subprocess.Popen[bytes]) -> int:
        """Wait for the process to exit after its socket closed; kill it if it does not."""
        try:
            return await asyncio.to_thread(process.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            return await asyncio.to_thread(process.wait)

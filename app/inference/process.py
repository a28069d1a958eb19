"""The inference process: loads the bundles, then answers ``PREDICT`` frames until its socket closes.

Started by the API process (``python -m app.inference.process FD PARENT_PID``) with one end of a
socket pair. Each round it reads everything that queued while the previous round ran, drops the
windows whose deadline passed, groups the rest by model and modality subset, runs one forward
pass per group (at most ``max_batch_size`` windows each), asks the fallback model about the windows
the first one was unsure of, and writes all answers back at once. So batches grow with load by
themselves, and the API process's event loop never waits for a forward pass.

It exits when the socket reaches end of file, which is also what a killed parent leaves behind;
on Linux the kernel kills it with its parent as well.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.inference.protocol import (
    FLOAT32,
    NO_DEADLINE,
    NO_FALLBACK,
    PASS_RECORD,
    Kind,
    Outcome,
    PredictRequest,
    failure_frame,
    frame,
    json_frame,
    read_json,
    read_predict,
    result_frame,
    split_frames,
)
from model import Bundle, load_bundle

log = logging.getLogger("app.inference")

RECEIVE_BYTES = 1 << 20
PR_SET_PDEATHSIG = 1


@dataclass
class _Work:
    """One request's windows on their way through the passes of a round."""

    request: PredictRequest
    inputs: dict[str, np.ndarray]  # modality -> (windows, T, C)
    models: np.ndarray  # (windows,) the model that answered each window
    probabilities: np.ndarray  # (windows, K)
    started: float = 0.0  # when its first forward pass began (monotonic); 0 before
    expired: bool = False  # its deadline passed before any of its windows went through the network
    failure: str | None = None  # a forward pass over its windows raised this
    rows_left: int = 0  # windows of the current step (first model, then fallback) not yet through the network
    answered: bool = False

    def expire_if_late(self, now: float) -> bool:
        deadline = self.request.deadline
        self.expired = self.expired or (not self.started and deadline != NO_DEADLINE and now > deadline)
        return self.expired


# Windows of one model and modality subset, each as (its request's work, its rows in that request).
Groups = dict[tuple[int, int], list[tuple[_Work, np.ndarray]]]


class InferenceServer:
    def __init__(
        self, connection: socket.socket, bundles: list[Bundle], *, max_batch_size: int, max_batch_delay_s: float
    ) -> None:
        self.connection = connection
        self.bundles = bundles
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.modalities = bundles[0].modalities
        self.classes = len(bundles[0].class_names)
        self.buffer = bytearray()

    def serve(self) -> None:
        """Rounds until end of file."""
        while self._receive():
            requests = [read_predict(body) for kind, body in split_frames(self.buffer) if kind is Kind.PREDICT]
            if requests:
                self._round(requests)

    def _receive(self) -> bool:
        """Wait for data, then take all that is there, and what comes within the batch delay; False at end
        of file."""
        data = self.connection.recv(RECEIVE_BYTES)
        if not data:
            return False
        self.buffer += data
        until = time.monotonic() + self.max_batch_delay_s
        while True:
            try:
                data = self.connection.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                left = until - time.monotonic()
                if left <= 0 or not select.select([self.connection], [], [], left)[0]:
                    return True
                continue
            if not data:
                return True  # the next blocking read sees the end
            self.buffer += data

    def _round(self, requests: list[PredictRequest]) -> None:
        """The round's passes; each request is answered as soon as its last window is through, so the API
        process answers those while the next pass runs."""
        work = [self._work(request) for request in requests]
        groups: Groups = defaultdict(list)
        for item in work:
            item.rows_left = item.request.windows
            groups[(item.request.model, item.request.mask)].append((item, np.arange(item.request.windows)))
        unsure: Groups = defaultdict(list)

        def first_step_done(item: _Work) -> bytes | None:
            """The answer of a request its first model settled; None when the fallback model has a say."""
            if item.request.fallback != NO_FALLBACK and not item.expired and item.failure is None:
                rows = np.flatnonzero(item.probabilities.max(axis=1) < item.request.threshold)
                if len(rows):
                    item.rows_left = len(rows)
                    unsure[(item.request.fallback, item.request.mask)].append((item, rows))
                    return None
            return self._answer(item)

        self._passes(groups, first_step_done)
        self._passes(unsure, self._answer)

    def _work(self, request: PredictRequest) -> _Work:
        inputs, offset = {}, 0
        for index, spec in enumerate(self.modalities):
            if request.mask & (1 << index):
                shape = (request.windows, self.bundles[0].window_samples[spec.name], spec.channels)
                count = shape[0] * shape[1] * shape[2]
                inputs[spec.name] = np.frombuffer(request.samples, FLOAT32, count, offset).reshape(shape)
                offset += count * FLOAT32.itemsize
        models = np.full(request.windows, request.model, np.uint8)
        return _Work(request, inputs, models, np.zeros((request.windows, self.classes), np.float32))

    def _passes(self, groups: Groups, done: Callable[[_Work], bytes | None]) -> None:
        """Forward passes over each group's windows, ``max_batch_size`` at a time. After each, its ``PASS``
        record and the answers (from ``done``) of the requests it finished are sent.

        Before each pass, requests that have not started and whose deadline passed are dropped: the
        deadline bounds the wait for the network, also for work that arrived in this round.
        """
        for (model, _), members in groups.items():
            names = list(members[0][0].inputs)
            inputs = {name: np.concatenate([work.inputs[name][rows] for work, rows in members]) for name in names}
            entries = [(work, row) for work, rows in members for row in rows]
            waiting = [(work, row, position) for position, (work, row) in enumerate(entries)]
            while waiting:
                now = time.monotonic()
                late = {id(work): work for work, _, _ in waiting if work.expire_if_late(now) or work.failure}
                waiting = [entry for entry in waiting if id(entry[0]) not in late]
                batch, waiting = waiting[: self.max_batch_size], waiting[self.max_batch_size :]
                frames = self._pass(model, batch, inputs) if batch else []
                for work, _, _ in batch:
                    work.rows_left -= 1
                finished = list(late.values()) + [work for work, _, _ in batch if work.rows_left == 0 or work.failure]
                for work in finished:
                    if not work.answered and (answer := done(work)) is not None:
                        work.answered = True
                        frames.append(answer)
                if frames:
                    self.connection.sendall(b"".join(frames))

    def _pass(self, model: int, batch: list[tuple[_Work, int, int]], inputs: dict[str, np.ndarray]) -> list[bytes]:
        positions = [position for _, _, position in batch]
        began = time.monotonic()
        try:
            probabilities = self.bundles[model].predict({name: array[positions] for name, array in inputs.items()})
        except Exception as error:  # the requests are told; the process serves on
            log.exception("forward pass of %s failed", self.bundles[model].name)
            for work, _, _ in batch:
                work.failure = f"the {self.bundles[model].name} model failed: {error}"
            return []
        for (work, row, _), answer in zip(batch, probabilities, strict=True):
            work.probabilities[row] = answer
            work.models[row] = model
            work.started = work.started or began
        return [frame(Kind.PASS, PASS_RECORD.pack(model, len(batch), time.monotonic() - began))]

    def _answer(self, work: _Work) -> bytes:
        request = work.request.request
        if work.expired:
            return failure_frame(request, Outcome.EXPIRED, 0.0, b"")
        if work.failure is not None:
            return failure_frame(request, Outcome.FAILED, work.started, work.failure.encode())
        finite = np.isfinite(work.probabilities).all(axis=1)
        if not finite.all():
            window = int(np.flatnonzero(~finite)[0])
            return failure_frame(request, Outcome.NON_FINITE, work.started, window.to_bytes(2, "little"))
        return result_frame(request, Outcome.OK, work.started, work.models, work.probabilities)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when the parent dies; end-of-file on the socket covers the rest."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request above
        os._exit(0)


def _receive_load(connection: socket.socket) -> dict | None:
    """The first frame, which must be ``LOAD``; None when the socket closes first."""
    buffer = bytearray()
    while not (frames := split_frames(buffer)):
        data = connection.recv(RECEIVE_BYTES)
        if not data:
            return None
        buffer += data
    kind, body = frames[0]
    return read_json(body) if kind is Kind.LOAD else None


def _load(message: dict, connection: socket.socket) -> list[Bundle] | None:
    torch.set_num_threads(message["threads"])
    try:
        bundles = [load_bundle(Path(path), compile=message["compile"]) for path in message["bundles"]]
    except Exception as error:  # the API process reports it and stops starting
        log.exception("loading the bundles failed")
        connection.sendall(json_frame(Kind.LOAD_FAILED, {"message": f"{type(error).__name__}: {error}"}))
        return None
    connection.sendall(json_frame(Kind.READY, {"manifests": [bundle.manifest for bundle in bundles]}))
    return bundles


def main(argv: list[str]) -> int:
    fd, parent_pid = int(argv[0]), int(argv[1])
    _die_with_parent(parent_pid)
    # The API process stops this one by closing its socket once the requests in flight are answered:
    # a Ctrl-C or SIGTERM sent to the whole process group is the server's to handle, not this one's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     inference process %(process)d: %(message)s")
    connection = socket.socket(fileno=fd)
    message = _receive_load(connection)
    if message is None:
        return 0
    bundles = _load(message, connection)
    if bundles is None:
        return 1
    InferenceServer(
        connection,
        bundles,
        max_batch_size=message["max_batch_size"],
        max_batch_delay_s=message["max_batch_delay_s"],
    ).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

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
import signal
import socket
import sys
import time
from collections import defaultdict
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
    started: float = 0.0


# Windows of one model and modality subset, each as (its request's work, its rows in that request).
Groups = dict[tuple[int, int], list[tuple[_Work, np.ndarray]]]


class InferenceServer:
    def __init__(self, connection: socket.socket, bundles: list[Bundle], max_batch_size: int) -> None:
        self.connection = connection
        self.bundles = bundles
        self.max_batch_size = max_batch_size
        self.modalities = bundles[0].modalities
        self.classes = len(bundles[0].class_names)
        self.buffer = bytearray()

    def serve(self) -> None:
        """Rounds until end of file."""
        while self._receive():
            requests = [read_predict(body) for kind, body in split_frames(self.buffer) if kind is Kind.PREDICT]
            if requests:
                self.connection.sendall(b"".join(self._round(requests)))

    def _receive(self) -> bool:
        """Wait for data, then take all that is there; False at end of file."""
        data = self.connection.recv(RECEIVE_BYTES)
        if not data:
            return False
        self.buffer += data
        while True:
            try:
                data = self.connection.recv(RECEIVE_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            if not data:
                return True  # the next blocking read sees the end
            self.buffer += data

    def _round(self, requests: list[PredictRequest]) -> list[bytes]:
        replies: list[bytes] = []
        now = time.monotonic()
        live = []
        for request in requests:
            if request.deadline != NO_DEADLINE and now > request.deadline:
                replies.append(failure_frame(request.request, Outcome.EXPIRED, now, b""))
            else:
                live.append(self._work(request))
        # The samples are copied out of the receive buffer above, so it may change from here on.
        groups: Groups = defaultdict(list)
        for work in live:
            groups[(work.request.model, work.request.mask)].append((work, np.arange(work.request.windows)))
        failed: dict[int, str] = {}
        replies += self._passes(groups, failed)
        unsure: Groups = defaultdict(list)
        for work in live:
            if work.request.fallback != NO_FALLBACK and work.request.request not in failed:
                rows = np.flatnonzero(work.probabilities.max(axis=1) < work.request.threshold)
                if len(rows):
                    unsure[(work.request.fallback, work.request.mask)].append((work, rows))
        replies += self._passes(unsure, failed)
        for work in live:
            replies.append(self._answer(work, failed.get(work.request.request)))
        return replies

    def _work(self, request: PredictRequest) -> _Work:
        inputs, offset = {}, 0
        for index, spec in enumerate(self.modalities):
            if request.mask & (1 << index):
                shape = (request.windows, self.bundles[0].window_samples[spec.name], spec.channels)
                count = shape[0] * shape[1] * shape[2]
                inputs[spec.name] = np.frombuffer(request.samples, FLOAT32, count, offset).reshape(shape).copy()
                offset += count * FLOAT32.itemsize
        models = np.full(request.windows, request.model, np.uint8)
        return _Work(request, inputs, models, np.zeros((request.windows, self.classes), np.float32))

    def _passes(self, groups: Groups, failed: dict[int, str]) -> list[bytes]:
        """Forward passes over each group's windows, ``max_batch_size`` at a time; their ``PASS`` records."""
        records = []
        for (model, _), members in groups.items():
            names = list(members[0][0].inputs)
            inputs = {name: np.concatenate([work.inputs[name][rows] for work, rows in members]) for name in names}
            owners = [(work, row) for work, rows in members for row in rows]
            for start in range(0, len(owners), self.max_batch_size):
                batch = owners[start : start + self.max_batch_size]
                began = time.monotonic()
                try:
                    probabilities = self.bundles[model].predict(
                        {name: array[start : start + len(batch)] for name, array in inputs.items()}
                    )
                except Exception as error:  # the requests are told; the process serves on
                    log.exception("forward pass of %s failed", self.bundles[model].name)
                    for work, _ in batch:
                        failed[work.request.request] = f"the {self.bundles[model].name} model failed: {error}"
                    continue
                seconds = time.monotonic() - began
                records.append(frame(Kind.PASS, PASS_RECORD.pack(model, len(batch), seconds)))
                for (work, row), answer in zip(batch, probabilities, strict=True):
                    work.probabilities[row] = answer
                    work.models[row] = model
                    work.started = work.started or began
        return records

    def _answer(self, work: _Work, failure: str | None) -> bytes:
        request = work.request.request
        if failure is not None:
            return failure_frame(request, Outcome.FAILED, work.started, failure.encode())
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
    # The API process stops this one by closing the socket; a Ctrl-C meant for the server is not for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     inference process %(process)d: %(message)s")
    connection = socket.socket(fileno=fd)
    message = _receive_load(connection)
    if message is None:
        return 0
    bundles = _load(message, connection)
    if bundles is None:
        return 1
    InferenceServer(connection, bundles, message["max_batch_size"]).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""Frames between an API process and its inference process, over one stream socket.

Every frame is ``u32 length | u8 kind | body`` (little-endian; the length counts kind and body).
The hot path carries raw float32 bytes behind fixed ``struct`` headers, never pickles:

- ``PREDICT`` (API -> inference): request id, model, fallback model and its threshold, modality
  mask, window count and deadline, then for each present modality (model order) its
  ``windows x samples x channels`` float32 values.
- ``RESULT`` (inference -> API): request id, outcome, when its forward pass started and the window
  count, then the answering model of each window (one byte each) and ``windows x classes`` float32
  probabilities; a ``NON_FINITE`` outcome carries the index of the window instead, ``FAILED`` a message.
- ``PASS`` (inference -> API): one forward pass's model, batch size and duration, for the metrics.

Control messages carry JSON: ``LOAD`` (API -> inference: which bundles, how to run them) is answered
by ``READY`` (the loaded bundles' manifests, in model-id order) or ``LOAD_FAILED``. Another kind of
work, such as loading other bundles into a running process, is another frame kind.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

FRAME_HEADER = struct.Struct("<IB")  # length (kind and body), kind
PREDICT_HEADER = struct.Struct("<QBBfIHd")  # request, model, fallback, threshold, modality mask, windows, deadline
RESULT_HEADER = struct.Struct("<QBdH")  # request, outcome, pass started (monotonic), windows
PASS_RECORD = struct.Struct("<BHd")  # model, windows, seconds
NO_FALLBACK = 255
NO_DEADLINE = 0.0
FLOAT32 = np.dtype("<f4")


class Kind(IntEnum):
    LOAD = 1
    READY = 2
    LOAD_FAILED = 3
    PREDICT = 4
    RESULT = 5
    PASS = 6


class Outcome(IntEnum):
    OK = 0
    EXPIRED = 1  # its deadline passed before a forward pass could start: not computed
    NON_FINITE = 2  # the network gave a non-finite probability for a window
    FAILED = 3  # the forward pass raised


def frame(kind: Kind, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return FRAME_HEADER.pack(len(body) + 1, kind) + body


def json_frame(kind: Kind, message: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(message).encode())


def read_json(body: bytes) -> dict[str, Any]:
    return json.loads(bytes(body))


def split_frames(buffer: bytearray) -> list[tuple[Kind, bytes]]:
    """The complete frames at the front of ``buffer`` (copied out), which keeps the incomplete rest."""
    frames, offset = [], 0
    with memoryview(buffer) as view:
        while len(buffer) - offset >= FRAME_HEADER.size:
            length, kind = FRAME_HEADER.unpack_from(view, offset)
            end = offset + 4 + length
            if end > len(buffer):
                break
            frames.append((Kind(kind), view[offset + FRAME_HEADER.size : end].tobytes()))
            offset = end
    del buffer[:offset]
    return frames


@dataclass(frozen=True)
class PredictRequest:
    request: int
    model: int
    fallback: int  # NO_FALLBACK, or the model asked for the windows where ``model`` is less sure than threshold
    threshold: float
    mask: int  # bit i: the window holds modality i (model order)
    windows: int
    deadline: float  # time.monotonic() after which the windows are not computed; NO_DEADLINE for none
    samples: memoryview


def predict_frame(
    request: int, model: int, fallback: int, threshold: float, mask: int, windows: int, deadline: float, samples: bytes
) -> bytes:
    header = PREDICT_HEADER.pack(request, model, fallback, threshold, mask, windows, deadline)
    return frame(Kind.PREDICT, header, samples)


def read_predict(body: bytes) -> PredictRequest:
    fields = PREDICT_HEADER.unpack_from(body)
    return PredictRequest(*fields, samples=memoryview(body)[PREDICT_HEADER.size :])


@dataclass(frozen=True)
class Result:
    request: int
    outcome: Outcome
    started: float
    models: np.ndarray  # (windows,) uint8: the model that answered each window
    probabilities: np.ndarray  # (windows, classes) float32
    failed_window: int = -1  # NON_FINITE: the first window without an answer
    message: str = ""  # FAILED: why


def result_frame(
    request: int, outcome: Outcome, started: float, models: np.ndarray, probabilities: np.ndarray
) -> bytes:
    header = RESULT_HEADER.pack(request, outcome, started, len(models))
    return frame(Kind.RESULT, header, models.astype(np.uint8).tobytes(), probabilities.astype(FLOAT32).tobytes())


def failure_frame(request: int, outcome: Outcome, started: float, detail: bytes) -> bytes:
    return frame(Kind.RESULT, RESULT_HEADER.pack(request, outcome, started, 0), detail)


def read_result(body: bytes, classes: int) -> Result:
    request, outcome, started, windows = RESULT_HEADER.unpack_from(body)
    rest = memoryview(body)[RESULT_HEADER.size :]
    outcome = Outcome(outcome)
    empty = np.zeros(0, np.uint8), np.zeros((0, classes), FLOAT32)
    if outcome is Outcome.NON_FINITE:
        return Result(request, outcome, started, *empty, failed_window=int.from_bytes(rest, "little"))
    if outcome is not Outcome.OK:
        return Result(request, outcome, started, *empty, message=bytes(rest).decode(errors="replace"))
    models = np.frombuffer(rest, np.uint8, count=windows).copy()
    probabilities = np.frombuffer(rest, FLOAT32, offset=windows).reshape(windows, classes).copy()
    return Result(request, outcome, started, models, probabilities)

"""Request bodies, decoded once, straight to checked float32 arrays: JSON, or MessagePack for gateways.

A body is first decoded by msgspec against the exact shape it must have, which checks every sample's
type in C; the rows of each modality then become one ``(N, C)`` float32 array. Only a body that fails
that decode is walked again in Python, to say where the first problem is (JSON's line and column,
or the field as ``modalities.accelerometer[3][1]``). Every check stops at the first problem, so an
error costs no more than a success, whatever the body holds.

The MessagePack form (``Content-Type: application/msgpack``) carries each modality as
``{"shape": [N, C], "data": <N*C little-endian float32 bytes>}``; the rest of the body is as in JSON.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal, TypeVar

import msgspec
import numpy as np
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from app.exceptions import InvalidInput, TooManyWindows, UnsupportedMediaType
from model import ModalitySpec

MODEL_CHOICES = ("student", "teacher", "cascade")
MSGPACK_MEDIA_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
SAMPLE_DTYPE = np.dtype("<f4")
# Clients' clocks are accepted in this range: window and transition times derived from them stay representable.
EARLIEST_TIMESTAMP = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIMESTAMP = datetime(2200, 1, 1, tzinfo=UTC)

WindowArrays = dict[str, np.ndarray]  # modality -> (T, C) float32, checked


class BodyFormat(Enum):
    JSON = "json"
    MSGPACK = "msgpack"


def body_format(content_type: str | None) -> BodyFormat:
    """JSON for ``application/json``, ``*/*+json`` or no type at all; MessagePack for its media types."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if not media_type or media_type == "application/json" or media_type.endswith("+json"):
        return BodyFormat.JSON
    if media_type in MSGPACK_MEDIA_TYPES:
        return BodyFormat.MSGPACK
    raise UnsupportedMediaType(f"a body of type {media_type!r} cannot be read; send application/json or msgpack")


@dataclass(frozen=True)
class InputSpec:
    """What the served models read: modalities (in model order), samples per window, the sample bound."""

    modalities: Mapping[str, ModalitySpec]
    window_samples: Mapping[str, int]
    window_seconds: float
    max_magnitude: float


@dataclass(frozen=True)
class WindowsRequest:
    model: str
    windows: list[WindowArrays]


@dataclass(frozen=True)
class Chunk:
    seq: int
    model: str
    timestamp: datetime | None
    samples: WindowArrays  # modality -> (N, C), any N >= 1


# --- the shapes a body must have, for msgspec --------------------------------------------------

ModelName = Literal["student", "teacher", "cascade"]
Rows = list[list[float]]


class Packed(msgspec.Struct, forbid_unknown_fields=True):
    shape: tuple[int, int]
    data: bytes


class _JsonWindow(msgspec.Struct):
    modalities: dict[str, Rows]
    model: ModelName = "student"


class _JsonWindowSamples(msgspec.Struct):
    modalities: dict[str, Rows]


class _JsonBatch(msgspec.Struct):
    windows: list[_JsonWindowSamples]
    model: ModelName = "student"


class _JsonChunk(msgspec.Struct):
    seq: int
    modalities: dict[str, Rows]
    model: ModelName = "student"
    timestamp: str | None = None


class _PackedWindow(msgspec.Struct):
    modalities: dict[str, Packed]
    model: ModelName = "student"


class _PackedWindowSamples(msgspec.Struct):
    modalities: dict[str, Packed]


class _PackedBatch(msgspec.Struct):
    windows: list[_PackedWindowSamples]
    model: ModelName = "student"


class _PackedChunk(msgspec.Struct):
    seq: int
    modalities: dict[str, Packed]
    model: ModelName = "student"
    timestamp: str | None = None


S = TypeVar("S")
_DECODERS: dict[tuple[BodyFormat, type], msgspec.json.Decoder | msgspec.msgpack.Decoder] = {}


def _decode(body: bytes, fmt: BodyFormat, shape: type[S]) -> S:
    """The body as ``shape``; a body that does not fit is walked for its first problem."""
    decoder = _DECODERS.get((fmt, shape))
    if decoder is None:
        module = msgspec.json if fmt is BodyFormat.JSON else msgspec.msgpack
        decoder = _DECODERS[(fmt, shape)] = module.Decoder(shape)
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        tree = _parse(body, fmt)
    _WALKS[shape](tree)
    try:  # the walk found nothing: what msgspec refused is named as msgspec words it
        return msgspec.convert(tree, shape)
    except msgspec.ValidationError as error:
        raise InvalidInput(f"body: {error}") from error


def _parse(body: bytes, fmt: BodyFormat) -> Any:
    """The body as plain objects; a JSON syntax error says where, in lines and columns."""
    if fmt is BodyFormat.MSGPACK:
        try:
            return msgspec.msgpack.decode(body)
        except msgspec.DecodeError as error:
            raise InvalidInput(f"the body is not valid MessagePack: {error}") from error
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError:
        pass  # not JSON to msgspec: the standard parser says where, and reads NaN and Infinity
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInput(f"the body is not UTF-8 text: byte {error.start} is invalid") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise InvalidInput(f"the body is not valid JSON: {error.msg} at {where}") from error
    except RecursionError as error:
        raise InvalidInput("the body is not valid JSON: nested too deeply") from error


# --- the walk: the first problem, named by its field --------------------------------------------


def _problem(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", details=[{"field": field, "message": message}])


def _object(value: Any, field: str, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _problem(field, "must be an object")
    for key in required:
        if key not in value:
            raise _problem(f"{field}.{key}" if field != "body" else key, "required")
    return value


def _walk_model(body: dict[str, Any]) -> None:
    if body.get("model", "student") not in MODEL_CHOICES:
        raise _problem("model", "must be one of " + ", ".join(f"'{name}'" for name in MODEL_CHOICES))


def _walk_modalities(value: Any, field: str, packed: bool) -> None:
    if not isinstance(value, dict):
        raise _problem(field, "must be an object")
    if not value:
        raise _problem(field, "must hold at least 1 modality")
    for name, samples in value.items():
        if packed:
            _walk_packed(samples, f"{field}.{name}")
        else:
            _walk_rows(samples, f"{field}.{name}")


def _walk_rows(rows: Any, field: str) -> None:
    if not isinstance(rows, list):
        raise _problem(field, "must be a list of rows")
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise _problem(f"{field}[{i}]", "must be a list of numbers")
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _problem(f"{field}[{i}][{j}]", "must be a number")
            if not _finite(value):
                raise _problem(f"{field}[{i}][{j}]", "must be a finite number")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def _walk_packed(value: Any, field: str) -> None:
    if not isinstance(value, dict) or set(value) != {"shape", "data"}:
        raise _problem(field, 'must be {"shape": [samples, channels], "data": <float32 bytes>}')
    shape = value["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n >= 0 for n in shape)):
        raise _problem(f"{field}.shape", "must be [samples, channels], two whole numbers")
    if not isinstance(value["data"], bytes):
        raise _problem(f"{field}.data", "must be binary (MessagePack bin)")


def _walk_window(body: Any, packed: bool) -> None:
    body = _object(body, "body", ("modalities",))
    _walk_modalities(body["modalities"], "modalities", packed)
    _walk_model(body)


def _walk_batch(body: Any, packed: bool) -> None:
    body = _object(body, "body", ("windows",))
    windows = body["windows"]
    if not isinstance(windows, list):
        raise _problem("windows", "must be a list")
    if not windows:
        raise _problem("windows", "must hold at least 1 window")
    for index, window in enumerate(windows):
        window = _object(window, f"windows[{index}]", ("modalities",))
        _walk_modalities(window["modalities"], f"windows[{index}].modalities", packed)
    _walk_model(body)


def _walk_chunk(body: Any, packed: bool) -> None:
    body = _object(body, "body", ("seq",))
    seq = body["seq"]
    if type(seq) is not int:
        raise _problem("seq", "must be a whole number")
    if "modalities" not in body:
        raise _problem("modalities", "required")
    _walk_modalities(body["modalities"], "modalities", packed)
    _walk_model(body)
    if body.get("timestamp") is not None and not isinstance(body["timestamp"], str):
        raise _problem("timestamp", "must be an ISO 8601 date and time with a zone")


_WALKS: dict[type, Callable[[Any], None]] = {
    _JsonWindow: lambda tree: _walk_window(tree, False),
    _JsonBatch: lambda tree: _walk_batch(tree, False),
    _JsonChunk: lambda tree: _walk_chunk(tree, False),
    _PackedWindow: lambda tree: _walk_window(tree, True),
    _PackedBatch: lambda tree: _walk_batch(tree, True),
    _PackedChunk: lambda tree: _walk_chunk(tree, True),
}


# --- samples to arrays ---------------------------------------------------------------------------


def _samples(name: str, samples: Rows | Packed, spec: InputSpec) -> np.ndarray:
    """One modality's samples as a checked ``(N, C)`` float32 array, N >= 1."""
    modality = spec.modalities.get(name)
    if modality is None:
        raise InvalidInput(f"unknown modality {name!r}; this model reads " + ", ".join(spec.modalities))
    channels = modality.channels
    if isinstance(samples, Packed):
        count, width = samples.shape
        if width != channels:
            raise InvalidInput(f"{name}: {width} channels per sample, expected {channels} channels")
        if len(samples.data) != count * width * SAMPLE_DTYPE.itemsize:
            raise InvalidInput(
                f"{name}: data holds {len(samples.data)} bytes; shape [{count}, {width}] of float32 needs "
                f"{count * width * SAMPLE_DTYPE.itemsize}"
            )
        array = np.frombuffer(samples.data, dtype=SAMPLE_DTYPE).reshape(count, width)
    else:
        count = len(samples)
        if set(map(len, samples)) != {channels} and count:
            index, row = next((i, row) for i, row in enumerate(samples) if len(row) != channels)
            raise InvalidInput(f"{name}: row {index} has {len(row)} values, expected {channels} channels")
        # Read as float64, so that the bound below is checked before anything could overflow float32.
        array = np.fromiter(itertools.chain.from_iterable(samples), dtype=np.float64, count=count * channels)
        array = array.reshape(count, channels)
    if count == 0:
        raise InvalidInput(f"{name}: no samples")
    # NaN fails the comparison too; magnitudes far beyond any sensor overflow the network to NaN.
    if not np.abs(array).max() <= spec.max_magnitude:
        row = int(np.flatnonzero(~(np.abs(array) <= spec.max_magnitude).all(axis=1))[0])
        raise InvalidInput(
            f"{name}: row {row} holds a value that is not a finite number within ±{spec.max_magnitude:g}",
            details=[{"modality": name, "row": row}],
        )
    return array.astype(SAMPLE_DTYPE, copy=False)


def _arrays(modalities: dict[str, Rows] | dict[str, Packed], spec: InputSpec) -> WindowArrays:
    if not modalities:
        raise _problem("modalities", "must hold at least 1 modality")
    return {name: _samples(name, samples, spec) for name, samples in modalities.items()}


def _window(modalities: dict[str, Rows] | dict[str, Packed], spec: InputSpec) -> WindowArrays:
    window = _arrays(modalities, spec)
    for name, array in window.items():
        expected, modality = spec.window_samples[name], spec.modalities[name]
        if len(array) != expected:
            raise InvalidInput(
                f"{name}: a window has {expected} samples ({spec.window_seconds:g} s at "
                f"{modality.sample_rate:g} Hz), got {len(array)}"
            )
    return window


def decode_window(body: bytes, fmt: BodyFormat, spec: InputSpec) -> WindowsRequest:
    """``{"modalities": {...}, "model": ...}``: one whole window."""
    window = _decode(body, fmt, _JsonWindow if fmt is BodyFormat.JSON else _PackedWindow)
    return WindowsRequest(window.model, [_window(window.modalities, spec)])


def decode_batch(body: bytes, fmt: BodyFormat, spec: InputSpec, max_windows: int) -> WindowsRequest:
    """``{"windows": [{"modalities": {...}}, ...], "model": ...}``; a window's problem names its index."""
    batch = _decode(body, fmt, _JsonBatch if fmt is BodyFormat.JSON else _PackedBatch)
    if not batch.windows:
        raise _problem("windows", "must hold at least 1 window")
    if len(batch.windows) > max_windows:
        raise TooManyWindows(f"{len(batch.windows)} windows; at most {max_windows} per request")
    windows = []
    for index, window in enumerate(batch.windows):
        try:
            windows.append(_window(window.modalities, spec))
        except InvalidInput as error:
            raise InvalidInput(f"windows[{index}]: {error.message}", details=error.details) from error
    return WindowsRequest(batch.model, windows)


_AWARE_DATETIME = TypeAdapter(AwareDatetime)


def decode_chunk(body: bytes, fmt: BodyFormat, spec: InputSpec) -> Chunk:
    """``{"seq", "modalities", "model", "timestamp"}``: any number of samples per modality."""
    chunk = _decode(body, fmt, _JsonChunk if fmt is BodyFormat.JSON else _PackedChunk)
    if chunk.seq < 0:
        raise _problem("seq", "must be greater than or equal to 0")
    return Chunk(chunk.seq, chunk.model, _timestamp(chunk.timestamp), _arrays(chunk.modalities, spec))


def _timestamp(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = _AWARE_DATETIME.validate_python(text)
    except ValidationError as error:
        raise _problem("timestamp", "must be an ISO 8601 date and time with a zone") from error
    try:
        in_range = EARLIEST_TIMESTAMP <= value < LATEST_TIMESTAMP
    except OverflowError:  # e.g. year 1 at +14:00, before any datetime in UTC
        in_range = False
    if not in_range:
        span = f"from {EARLIEST_TIMESTAMP:%Y-%m-%d} to before {LATEST_TIMESTAMP:%Y-%m-%d}"
        raise _problem("timestamp", f"must lie {span} (UTC)")
    return value

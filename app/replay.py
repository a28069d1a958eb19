"""``dmft replay``: stream a recording to a session the way a live sensor gateway would, and score it.

A recording is continuous samples per modality, from either input the project knows:

- the ``.npz`` window dataset (``model/data.py``) with a ``recording`` key: the consecutive,
  overlapping windows of one recording are stitched back into its samples, the overlap found
  by matching samples (the file does not store the hop);
- a CSV with a ``time`` column (seconds), one column per channel named ``<modality>_<axis>``
  and an optional ``label`` column.

Chunks go out at real time, ten times that, or as fast as the service answers, through the
retrying client. Labels, when the input has them, score each window the service classified:
its truth is the label most of its samples carry. What happens is reported as it happens: a
line per window and per transition (``Lines``), or on a terminal a progress bar of the chunks
sent, with the transitions printed above it (``ProgressBar``).
"""

from __future__ import annotations

import csv
import itertools
import math
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np
from tqdm import tqdm

from app.client import ActivityClient, ServiceError
from app.schemas import ModelChoice, ModelInfo, SamplesResponse
from model.data import load_npz

# Times above this are read as Unix epoch seconds (after 2001), smaller ones as seconds from the start.
EPOCH_THRESHOLD = 1e9
# How far a recording's sample rate may be from the model's before the replay is refused.
RATE_TOLERANCE = 0.02
CHANNEL_COLUMN = re.compile(r"^([A-Za-z][A-Za-z0-9_]*)_([A-Za-z0-9]+)$")


class ReplayInputError(ValueError):
    """The recording or the options cannot be replayed; the message says why in one line."""


@dataclass
class Recording:
    samples: dict[str, np.ndarray]  # modality -> (L_m, C_m)
    rates: dict[str, float]  # samples per second, per modality
    labels: np.ndarray | None = None  # class name per sample of the first modality
    origin: datetime | None = None  # the clock at the first sample, when the input has one

    @property
    def duration(self) -> float:
        return min(len(samples) / self.rates[name] for name, samples in self.samples.items())

    def chunks(self, seconds: float) -> Iterator[dict[str, np.ndarray]]:
        """Consecutive chunks of ``seconds`` (the last may be shorter), cut at each modality's own rate."""
        for k in itertools.count():
            chunk = {}
            for name, samples in self.samples.items():
                rate = self.rates[name]
                rows = samples[round(k * seconds * rate) : round((k + 1) * seconds * rate)]
                if len(rows):
                    chunk[name] = rows
            if not chunk:
                return
            yield chunk

    def chunk_count(self, seconds: float) -> int:
        return sum(1 for _ in self.chunks(seconds))

    def truth(self, start_seconds: float, end_seconds: float) -> str | None:
        """The label most samples of ``[start, end)`` carry; None without labels."""
        if self.labels is None:
            return None
        rate = self.rates[next(iter(self.samples))]
        covered = self.labels[round(start_seconds * rate) : round(end_seconds * rate)]
        return Counter(covered.tolist()).most_common(1)[0][0] if len(covered) else None


def load_recording(path: Path, recording: int | None = None) -> Recording:
    if not path.is_file():
        raise ReplayInputError(f"{path}: no such file")
    if path.suffix == ".npz":
        return load_npz_recording(path, recording)
    if path.suffix == ".csv":
        if recording is not None:
            raise ReplayInputError("--recording selects a recording of an .npz file; a CSV holds one")
        return load_csv_recording(path)
    raise ReplayInputError(f"{path}: expected an .npz dataset or a .csv recording")


def load_npz_recording(path: Path, recording: int | None) -> Recording:
    """Stitch the windows of one recording back into continuous samples, labelled per sample."""
    dataset = load_npz(path)  # a DatasetError names what is malformed
    with np.load(path, allow_pickle=False) as archive:
        if "recording" not in archive.files:
            raise ReplayInputError(f"{path}: no 'recording' key (recording id per window) to rebuild one from")
        ids = archive["recording"]
    if ids.shape != dataset.y.shape:
        raise ReplayInputError(f"{path}: 'recording' must hold one id per window ({len(dataset.y)})")
    chosen = int(ids[0]) if recording is None else recording
    index = np.flatnonzero(ids == chosen)
    if not len(index):
        raise ReplayInputError(f"{path}: no recording {chosen}; ids run from {int(ids.min())} to {int(ids.max())}")
    rates = {spec.name: spec.sample_rate for spec in dataset.modalities}
    stitched = {name: _stitch(dataset.arrays[name][index]) for name in rates}
    reference = next(iter(rates))  # labels are kept per sample of this modality
    reference_starts = stitched[reference][1] / rates[reference]
    for name, (_, starts) in stitched.items():
        if not np.allclose(starts / rates[name], reference_starts, atol=1e-6):
            raise ReplayInputError(f"{path}: recording {chosen}: the windows of {name} and {reference} do not align")
    window_labels = np.array(dataset.class_names)[dataset.y[index]]
    # Each sample takes the label of the last window that starts at or before it.
    owner = np.searchsorted(stitched[reference][1], np.arange(len(stitched[reference][0])), side="right") - 1
    return Recording({name: samples for name, (samples, _) in stitched.items()}, rates, labels=window_labels[owner])


def _stitch(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, T, C)`` consecutive windows -> the samples they cover and each window's first sample."""
    length = windows.shape[1]
    pieces, starts, shift = [windows[0]], [0], None
    for before, after in zip(windows[:-1], windows[1:], strict=True):
        shift = _shift(before, after, hint=shift)
        pieces.append(after[length - shift :])
        starts.append(starts[-1] + shift)
    return np.concatenate(pieces), np.array(starts)


def _shift(before: np.ndarray, after: np.ndarray, hint: int | None) -> int:
    """Samples from one window's start to the next: the smallest shift whose overlap matches exactly."""
    length = len(before)
    candidates = ([hint] if hint else []) + list(range(1, length))
    for shift in candidates:
        if np.array_equal(before[shift:], after[: length - shift]):
            return shift
    return length  # no overlap: the windows are taken to be adjacent


def load_csv_recording(path: Path) -> Recording:
    with path.open(newline="") as file:
        rows = list(csv.reader(file))
    if not rows:
        raise ReplayInputError(f"{path}: empty file")
    header, body = [column.strip() for column in rows[0]], rows[1:]
    if "time" not in header:
        raise ReplayInputError(f"{path}: no 'time' column (seconds) in the header {header}")
    channels: dict[str, list[int]] = {}
    for position, column in enumerate(header):
        if column in ("time", "label"):
            continue
        match = CHANNEL_COLUMN.match(column)
        if match is None:
            raise ReplayInputError(f"{path}: column {column!r} is not named <modality>_<axis> (e.g. accelerometer_x)")
        channels.setdefault(match.group(1), []).append(position)
    if not channels:
        raise ReplayInputError(f"{path}: no channel columns such as accelerometer_x")
    if len(body) < 2:
        raise ReplayInputError(f"{path}: fewer than two samples")
    numeric = [header.index("time")] + [p for positions in channels.values() for p in positions]
    values = np.full((len(body), len(header)), np.nan)
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ReplayInputError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
        for position in numeric:
            try:
                values[line - 2, position] = float(row[position])
            except ValueError:
                raise ReplayInputError(
                    f"{path}:{line}: {header[position]} is {row[position]!r}, not a number"
                ) from None
    if not np.isfinite(values[:, numeric]).all():
        line = int(np.flatnonzero(~np.isfinite(values[:, numeric]).all(axis=1))[0]) + 2
        raise ReplayInputError(f"{path}:{line}: NaN or infinite value")
    times = values[:, header.index("time")]
    steps = np.diff(times)
    if (steps <= 0).any():
        raise ReplayInputError(f"{path}:{int(np.argmax(steps <= 0)) + 3}: time does not increase")
    rate = 1.0 / float(np.median(steps))
    if np.abs(steps * rate - 1).max() > 0.5:
        raise ReplayInputError(f"{path}: time is not evenly spaced (a gap or a stall of more than half a sample)")
    samples = {name: values[:, positions] for name, positions in channels.items()}
    labels = np.array([row[header.index("label")] for row in body]) if "label" in header else None
    origin = datetime.fromtimestamp(times[0], tz=UTC) if times[0] >= EPOCH_THRESHOLD else None
    return Recording(samples, dict.fromkeys(samples, rate), labels=labels, origin=origin)


def check_against_model(recording: Recording, model: ModelInfo) -> None:
    """Refuse, naming the mismatch, a recording the model cannot read as recorded."""
    specs = {spec.name: spec for spec in model.modalities}
    for name, samples in recording.samples.items():
        spec = specs.get(name)
        if spec is None:
            raise ReplayInputError(f"modality {name!r} is not read by the {model.name} model ({', '.join(specs)})")
        if samples.shape[1] != spec.channels:
            raise ReplayInputError(f"{name}: {samples.shape[1]} channels, the model reads {spec.channels}")
        rate = recording.rates[name]
        if abs(rate / spec.sample_rate - 1) > RATE_TOLERANCE:
            raise ReplayInputError(f"{name}: sampled at {rate:.4g} Hz, the model expects {spec.sample_rate:.4g} Hz")
    if recording.duration < model.window_seconds:
        raise ReplayInputError(
            f"the recording lasts {recording.duration:.2f} s, less than one {model.window_seconds:g} s window"
        )


@dataclass
class Summary:
    chunks: int = 0
    windows: int = 0
    transitions: int = 0
    scored: int = 0  # windows with a label
    correct: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    def lines(self) -> list[str]:
        p50, p95, p99 = np.percentile(self.latencies_ms, [50, 95, 99]) if self.latencies_ms else (math.nan,) * 3
        accuracy = "n/a (no labels)" if self.accuracy is None else f"{self.accuracy:.3f} ({self.correct}/{self.scored})"
        return [
            f"windows: {self.windows}",
            f"transitions: {self.transitions}",
            f"accuracy: {accuracy}",
            f"latency ms: p50 {p50:.1f}  p95 {p95:.1f}  p99 {p99:.1f}  ({self.chunks} chunks)",
        ]


class Report(Protocol):
    """Where a replay tells what happens, as it happens."""

    def window(self, line: str) -> None: ...

    def transition(self, line: str) -> None: ...

    def sent(self, summary: Summary) -> None:
        """A chunk was answered; ``summary`` holds everything so far."""

    def close(self) -> None: ...


@dataclass
class Lines:
    """A line per window and per transition: for a log, a pipe or a file."""

    echo: Callable[[str], None] = print

    def window(self, line: str) -> None:
        self.echo(line)

    def transition(self, line: str) -> None:
        self.echo(line)

    def sent(self, summary: Summary) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressBar:
    """For a terminal: a bar of the chunks sent (rate, time left, windows and accuracy so far), the
    transitions printed above it; windows are counted, not listed."""

    def __init__(self, chunks: int, session_id: str, file: TextIO = sys.stdout) -> None:
        self.bar = tqdm(total=chunks, desc=session_id, unit="chunk", file=file, dynamic_ncols=True)

    def window(self, line: str) -> None:
        pass

    def transition(self, line: str) -> None:
        self.bar.write(line)

    def sent(self, summary: Summary) -> None:
        accuracy = "n/a" if summary.accuracy is None else f"{summary.accuracy:.3f}"
        self.bar.set_postfix(windows=summary.windows, accuracy=accuracy, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def replay(
    recording: Recording,
    client: ActivityClient,
    session_id: str,
    *,
    model: ModelChoice = "student",
    speed: float | None = 1.0,
    chunk_seconds: float = 1.0,
    report: Report | None = None,
    summary: Summary | None = None,
) -> Summary:
    """Send the recording as chunks of ``chunk_seconds`` at ``speed`` times real time (None: no pause).

    ``summary``, when given, is filled in as the replay goes, so an interrupted replay still has one.
    """
    if min(recording.rates.values()) * chunk_seconds < 1:
        raise ReplayInputError(f"--chunk-seconds {chunk_seconds:g} is shorter than one sample")
    report = report or Lines()
    origin = recording.origin or datetime.now(UTC)
    stream = client.stream(session_id, model)
    summary = Summary() if summary is None else summary
    started = time.monotonic()
    for k, chunk in enumerate(recording.chunks(chunk_seconds)):
        if speed is not None:
            # A chunk leaves once its last sample would have been recorded.
            time.sleep(max(0.0, started + (k + 1) * chunk_seconds / speed - time.monotonic()))
        sent = time.perf_counter()
        try:
            response = stream.send(chunk, timestamp=origin + timedelta(seconds=k * chunk_seconds))
        except ServiceError as error:
            if k == 0 and error.expected_seq is not None:
                raise ReplayInputError(
                    f"session {session_id!r} already holds {error.expected_seq} chunks: choose another --session"
                ) from error
            raise
        summary.latencies_ms.append(1000 * (time.perf_counter() - sent))
        summary.chunks += 1
        _report(response, recording, summary, report)
        report.sent(summary)
    return summary


def _report(response: SamplesResponse, recording: Recording, summary: Summary, report: Report) -> None:
    for prediction in response.predictions:
        truth = recording.truth(prediction.start_seconds, prediction.end_seconds)
        summary.windows += 1
        if truth is not None:
            summary.scored += 1
            summary.correct += prediction.activity == truth
        label = "" if truth is None else f"  label {truth}" + ("" if prediction.activity == truth else "  (miss)")
        report.window(
            f"window {prediction.window:4d}  {prediction.start_seconds:7.1f}-{prediction.end_seconds:.1f} s  "
            f"{prediction.activity:<22} {prediction.confidence:.2f}{label}"
        )
    for transition in response.transitions:
        summary.transitions += 1
        report.transition(
            f"transition  {transition.from_activity} -> {transition.to_activity}  at {transition.time.isoformat()}  "
            f"(window {transition.window}, confidence {transition.confidence:.2f})"
        )

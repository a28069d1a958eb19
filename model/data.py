"""Labelled multi-modal window datasets: the ``.npz`` format, its validation, and splits.

One file holds ``X_<modality>`` arrays ``[N, T_m, C_m]``, labels ``y [N]``, ``class_names
[K]``, optional ``sample_rate_<modality>`` scalars, ``subject [N]`` and ``split [N]``.
Anything malformed raises ``DatasetError`` with a message that names the offending key.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import ModalitySpec

MODALITY_PREFIX = "X_"
RATE_PREFIX = "sample_rate_"
SPLIT_VALUES = ("train", "test")
# Fraction of subjects held out when the file has no predefined split.
TEST_FRACTION = 0.3
# Fixed, so that every training seed is evaluated on the same held-out subjects.
SPLIT_SEED = 0
# Modalities whose channels are x/y/z triplets in the device frame, rotated together by augmentation.
ROTATABLE_MODALITIES = frozenset({"accelerometer", "gyroscope", "magnetometer", "linear_acceleration", "gravity"})


class DatasetError(ValueError):
    """The dataset file is malformed; the message names the key at fault."""


@dataclass
class WindowDataset:
    modalities: list[ModalitySpec]
    arrays: dict[str, np.ndarray]  # modality name -> float32 [N, T_m, C_m]
    y: np.ndarray  # int64 [N]
    class_names: list[str]
    window_seconds: float
    subject: np.ndarray | None = None
    split: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> WindowDataset:
        return WindowDataset(
            modalities=self.modalities,
            arrays={name: array[index] for name, array in self.arrays.items()},
            y=self.y[index],
            class_names=self.class_names,
            window_seconds=self.window_seconds,
            subject=None if self.subject is None else self.subject[index],
            split=None if self.split is None else self.split[index],
        )

    def fingerprint(self) -> str:
        """SHA-256 over labels and every modality array: two runs on the same data agree."""
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.arrays[name]).tobytes())
        digest.update(self.y.astype(np.int64).tobytes())
        return digest.hexdigest()


def save_npz(path: str | Path, dataset: WindowDataset, **extra: np.ndarray) -> None:
    payload: dict[str, np.ndarray] = {"y": dataset.y, "class_names": np.array(dataset.class_names)}
    for spec in dataset.modalities:
        payload[MODALITY_PREFIX + spec.name] = dataset.arrays[spec.name]
        payload[RATE_PREFIX + spec.name] = np.float64(spec.sample_rate)
    if dataset.subject is not None:
        payload["subject"] = dataset.subject
    if dataset.split is not None:
        payload["split"] = dataset.split
    np.savez_compressed(path, **payload, **extra)


def load_npz(path: str | Path, window_seconds: float | None = None) -> WindowDataset:
    """Read and validate a dataset file; ``window_seconds`` is needed only without sample rates."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {key: archive[key] for key in archive.files}
    except FileNotFoundError as error:
        raise DatasetError(f"{path}: no such file") from error
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{path}: not a readable .npz file ({error})") from error

    if "y" not in data:
        raise DatasetError("missing key 'y' (class index per window)")
    y = data["y"]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"'y' must be a 1-D integer array, got dtype {y.dtype} and shape {y.shape}")
    n = len(y)
    if n == 0:
        raise DatasetError("'y' is empty: the file holds no windows")
    if "class_names" not in data:
        raise DatasetError("missing key 'class_names' (names of the classes)")
    class_names = [str(name) for name in data["class_names"].reshape(-1)]
    if y.min() < 0 or y.max() >= len(class_names):
        raise DatasetError(f"'y' holds values outside 0..{len(class_names) - 1} (the {len(class_names)} class_names)")

    names = sorted(key[len(MODALITY_PREFIX) :] for key in data if key.startswith(MODALITY_PREFIX))
    if not names:
        raise DatasetError("no modality arrays: expected keys like 'X_accelerometer'")
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        key = MODALITY_PREFIX + name
        array = data[key]
        if array.ndim != 3:
            raise DatasetError(f"'{key}' must have shape [N, T, C], got rank {array.ndim} {array.shape}")
        if len(array) != n:
            raise DatasetError(f"'{key}' has {len(array)} windows but 'y' has {n}")
        if not np.issubdtype(array.dtype, np.number):
            raise DatasetError(f"'{key}' must be numeric, got dtype {array.dtype}")
        finite = np.isfinite(array).reshape(n, -1).all(axis=1)
        if not finite.all():
            raise DatasetError(f"'{key}' contains NaN or Inf (first in window {int(np.argmin(finite))})")
        arrays[name] = array.astype(np.float32)

    window_seconds = _window_seconds(data, arrays, window_seconds)
    modalities = [
        ModalitySpec(
            name=name,
            channels=arrays[name].shape[2],
            sample_rate=_declared_rate(data, name) or arrays[name].shape[1] / window_seconds,
            rotatable=name in ROTATABLE_MODALITIES and arrays[name].shape[2] % 3 == 0,
        )
        for name in names
    ]
    return WindowDataset(
        modalities=modalities,
        arrays=arrays,
        y=y.astype(np.int64),
        class_names=class_names,
        window_seconds=window_seconds,
        subject=_optional_per_window(data, "subject", n),
        split=_split(data, n),
    )


def _window_seconds(data: dict[str, np.ndarray], arrays: dict[str, np.ndarray], given: float | None) -> float:
    rates = {name: _declared_rate(data, name) for name in arrays}
    durations = {name: arrays[name].shape[1] / rate for name, rate in rates.items() if rate is not None}
    if given is not None:
        for name, seconds in durations.items():
            if not np.isclose(seconds, given, rtol=1e-3):
                raise DatasetError(
                    f"'{RATE_PREFIX}{name}' implies {seconds:.3f} s windows, but the window length given is {given:g} s"
                )
        return given
    if not durations:
        raise DatasetError(f"no '{RATE_PREFIX}<modality>' keys: give the window length in seconds (--window-seconds)")
    first, *_ = durations.values()
    for name, seconds in durations.items():
        if not np.isclose(seconds, first, rtol=1e-3):
            raise DatasetError(f"'{RATE_PREFIX}{name}' implies {seconds:.3f} s windows, others {first:.3f} s")
    return round(first, 6)


def _declared_rate(data: dict[str, np.ndarray], name: str) -> float | None:
    key = RATE_PREFIX + name
    if key not in data:
        return None
    rate = float(data[key])
    if not np.isfinite(rate) or rate <= 0:
        raise DatasetError(f"'{key}' must be a positive number, got {rate}")
    return rate


def _optional_per_window(data: dict[str, np.ndarray], key: str, n: int) -> np.ndarray | None:
    if key not in data:
        return None
    values = data[key]
    if values.shape != (n,):
        raise DatasetError(f"'{key}' must have shape [{n}] (one per window), got {values.shape}")
    return values


def _split(data: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    split = _optional_per_window(data, "split", n)
    if split is None:
        return None
    split = split.astype(str)
    unknown = sorted(set(split.tolist()) - set(SPLIT_VALUES))
    if unknown:
        raise DatasetError(f"'split' holds unknown values {unknown}; allowed: {list(SPLIT_VALUES)}")
    return split


@dataclass
class Split:
    train: np.ndarray  # window indices
    test: np.ndarray
    kind: str  # "predefined", "subject" or "stratified"
    held_out_subjects: list[int]


def train_test_split(dataset: WindowDataset) -> Split:
    """The file's split if it has one, else whole subjects held out, else a stratified split."""
    if dataset.split is not None:
        test = dataset.split == "test"
        held_out = [] if dataset.subject is None else sorted({int(s) for s in dataset.subject[test]})
        return Split(np.flatnonzero(~test), np.flatnonzero(test), "predefined", held_out)
    rng = np.random.default_rng(SPLIT_SEED)
    if dataset.subject is not None and len(np.unique(dataset.subject)) >= 3:
        subjects = np.unique(dataset.subject)
        held_out = np.sort(rng.permutation(subjects)[: max(1, round(TEST_FRACTION * len(subjects)))])
        test = np.isin(dataset.subject, held_out)
        return Split(np.flatnonzero(~test), np.flatnonzero(test), "subject", [int(s) for s in held_out])
    test_index = []
    for label in np.unique(dataset.y):
        members = rng.permutation(np.flatnonzero(dataset.y == label))
        test_index.extend(members[: round(TEST_FRACTION * len(members))])
    test = np.zeros(len(dataset), dtype=bool)
    test[test_index] = True
    return Split(np.flatnonzero(~test), np.flatnonzero(test), "stratified", [])

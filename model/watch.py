"""Build the default dataset from the smartwatch shoulder-exercise recordings in ``seglearn``.

The ``seglearn`` wheel ships ``data/watch_dataset.npy``: 140 recordings of 6 channels
(accelerometer x/y/z in g, gyroscope x/y/z in rad/s) at 50 Hz from 10 subjects doing
7 physiotherapy exercises. Windows never cross recordings, so no window mixes two
exercises or two people.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from model.config import ModalitySpec
from model.data import WindowDataset

SAMPLE_RATE = 50.0
CLASS_NAMES = {
    "PEN": "pendulum",
    "ABD": "abduction",
    "FEL": "forward_elevation",
    "IR": "internal_rotation",
    "ER": "external_rotation",
    "TRAP": "trapezius_extension",
    "ROW": "upright_row",
}
CHANNELS = {"accelerometer": slice(0, 3), "gyroscope": slice(3, 6)}


def recordings_path() -> Path:
    """Where the installed seglearn keeps the recordings, found without importing seglearn."""
    spec = importlib.util.find_spec("seglearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the 'seglearn' package is not installed: pip install -e '.[train]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "watch_dataset.npy"


def load_recordings() -> dict:
    return np.load(recordings_path(), allow_pickle=True).item()


def build_watch_dataset(window_seconds: float = 2.0, hop_seconds: float = 1.0) -> tuple[WindowDataset, np.ndarray]:
    """Sliding windows over every recording; also returns the recording index of each window."""
    raw = load_recordings()
    window = round(window_seconds * SAMPLE_RATE)
    hop = round(hop_seconds * SAMPLE_RATE)
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in CHANNELS}
    labels, subjects, recordings = [], [], []
    for index, (series, label, subject) in enumerate(zip(raw["X"], raw["y"], raw["subject"], strict=True)):
        starts = np.arange(0, len(series) - window + 1, hop)
        windows = np.stack([series[start : start + window] for start in starts]).astype(np.float32)
        for name, channels in CHANNELS.items():
            pieces[name].append(windows[:, :, channels])
        labels.append(np.full(len(starts), label))
        subjects.append(np.full(len(starts), subject))
        recordings.append(np.full(len(starts), index))
    dataset = WindowDataset(
        modalities=[ModalitySpec(name, 3, SAMPLE_RATE, rotatable=True) for name in CHANNELS],
        arrays={name: np.concatenate(parts) for name, parts in pieces.items()},
        y=np.concatenate(labels).astype(np.int64),
        class_names=[CLASS_NAMES[code] for code in raw["y_labels"]],
        window_seconds=window_seconds,
        subject=np.concatenate(subjects).astype(np.int64),
    )
    return dataset, np.concatenate(recordings).astype(np.int64)

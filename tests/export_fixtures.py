"""Bundles to export: a tiny three-modality bundle with a calibration temperature, and the shipped ones.

The tiny bundle reads the conftest's accelerometer (50 Hz), gyroscope (25 Hz) and barometer
(12 Hz, resampled onto the segment grid), with normalisation statistics far from 0/1 and a
temperature of 1.7 in bundle.json, so that an export which drops either shows.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.cli import main
from model.bundle import BUNDLE_FILE, Bundle, load_bundle, save_bundle
from model.data import WindowDataset
from model.dmft import DMFT
from model.edge import EdgeModel, load_onnx
from model.export import export_onnx

WEIGHTS = Path(__file__).resolve().parent.parent / "model" / "weights"
TEMPERATURE = 1.7
MEANS = {"accelerometer": [0.1, -0.2, 0.98], "gyroscope": [0.0, 0.01, -0.01], "barometer": [1013.0]}
STDS = {"accelerometer": [0.5, 0.4, 0.3], "gyroscope": [1.5, 1.2, 0.9], "barometer": [2.0]}
CLASSES = 3


@dataclass
class Export:
    bundle: Bundle
    path: Path
    model: EdgeModel
    summary: dict[str, Any]  # what ``dmft export`` printed


def save_tiny_bundle(directory: Path, *, temperature: float | None = TEMPERATURE) -> Path:
    from .conftest import _tiny_config  # not at the top: the conftest imports this module

    config = _tiny_config(class_names=[f"class_{k}" for k in range(CLASSES)])
    torch.manual_seed(0)
    network = DMFT(config)
    network.set_normalization(
        [torch.tensor(MEANS[spec.name]) for spec in config.modalities],
        [torch.tensor(STDS[spec.name]) for spec in config.modalities],
    )
    training = {"seed": 0, "command": "pytest"}
    save_bundle(directory, network.eval(), name="tiny", training=training, metrics={"accuracy": 0.5})
    if temperature is not None:
        manifest = json.loads((directory / BUNDLE_FILE).read_text())
        (directory / BUNDLE_FILE).write_text(json.dumps({**manifest, "temperature": temperature}))
    return directory


def tiny_windows(batch: int, seed: int) -> dict[str, np.ndarray]:
    """Raw windows around each modality's mean, keyed by modality name."""
    from .conftest import MODALITIES

    rng = np.random.default_rng(seed)
    return {
        spec.name: (
            np.asarray(MEANS[spec.name])
            + np.asarray(STDS[spec.name]) * rng.standard_normal((batch, spec.samples(1.0), spec.channels))
        ).astype(np.float32)
        for spec in MODALITIES
    }


def tiny_dataset() -> WindowDataset:
    """Labelled windows in the tiny bundle's modalities and classes, six subjects (two held out)."""
    from .conftest import MODALITIES, _synthetic_dataset

    dataset = _synthetic_dataset(per_class=16, classes=CLASSES)
    for spec in MODALITIES:
        dataset.arrays[spec.name] = (np.asarray(MEANS[spec.name], dtype=np.float32) + dataset.arrays[spec.name]).astype(
            np.float32
        )
    return dataset


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Export:
    """The tiny bundle (eager) and its float32 export, loaded in ONNX Runtime."""
    root = tmp_path_factory.mktemp("tiny-export")
    bundle_dir = save_tiny_bundle(root / "bundle")
    path = root / "tiny.onnx"
    model = export_onnx(bundle_dir, path)
    return Export(bundle=load_bundle(bundle_dir, compile=False), path=path, model=model, summary={})


def dmft(*args: str) -> tuple[int, str]:
    """Run the ``dmft`` command line in this process; its exit status and standard output."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(list(args))
    return status, stdout.getvalue()


@pytest.fixture(scope="session")
def shipped_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Export]:
    """The shipped teacher and student, compiled as the service loads them, exported by ``dmft export``."""
    root = tmp_path_factory.mktemp("shipped-export")
    exports = {}
    for name in ("teacher", "student"):
        path = root / f"{name}.onnx"
        status, stdout = dmft("export", "--bundle", str(WEIGHTS / name), "--format", "onnx", "--out", str(path))
        assert status == 0
        exports[name] = Export(
            bundle=load_bundle(WEIGHTS / name), path=path, model=load_onnx(path), summary=json.loads(stdout)
        )
    return exports

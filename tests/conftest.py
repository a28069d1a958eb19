"""Shared fixtures: tiny DMFT configs and small synthetic, learnable window datasets.

Everything here is sized for a 2-core machine: 16-wide tokens, two heads, one block on
each side of the fusion, 1 s windows cut into 5 segments.

The three modalities run at different rates so the shared segment grid is exercised:
the accelerometer has 50 samples per window, the gyroscope 25 and the barometer 12 —
12 is not a multiple of the 5 segments, so its tokenizer resamples it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from model.config import DMFTConfig, ModalitySpec
from model.data import WindowDataset, save_npz
from model.dmft import DMFT

# Fixtures of the HTTP service tests (the real test Redis and Redis Cluster, the real watch data, headless
# Chromium, the project installed as a user installs it) and of the ONNX exports.
from .browser_fixtures import page  # noqa: F401
from .export_fixtures import shipped_exports, tiny_export  # noqa: F401
from .install_fixtures import installed  # noqa: F401
from .redis_fixtures import (  # noqa: F401
    cluster_target,
    module_cluster_target,
    module_redis_target,
    redis_cluster_url,
    redis_target,
)
from .service_fixtures import no_server_errors, watch_data  # noqa: F401

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine idle
# OpenMP workers spinning against another job slow every op by an order of magnitude.
# One thread here, and in the `dmft` subprocesses, which inherit the environment; an
# OMP_NUM_THREADS set by the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

WINDOW_SECONDS = 1.0
SEGMENTS = 5
CLASS_NAMES = ["rest", "walk", "wave"]
ACCELEROMETER = ModalitySpec("accelerometer", channels=3, sample_rate=50.0, rotatable=True)
GYROSCOPE = ModalitySpec("gyroscope", channels=3, sample_rate=25.0, rotatable=True)
BAROMETER = ModalitySpec("barometer", channels=1, sample_rate=12.0)
MODALITIES = [ACCELEROMETER, GYROSCOPE, BAROMETER]

# The property-based test draws hypothesis's default 100 examples per test; `--hypothesis-profile=long` draws more.
settings.register_profile("long", max_examples=2000)

ConfigFactory = Callable[..., DMFTConfig]
InputsFactory = Callable[..., list[torch.Tensor]]
DatasetFactory = Callable[..., WindowDataset]
PayloadWriter = Callable[..., Path]


def _tiny_config(
    modalities: list[ModalitySpec] | None = None,
    *,
    class_names: list[str] | None = None,
    window_seconds: float = WINDOW_SECONDS,
    segments: int = SEGMENTS,
    dim: int = 16,
    heads: int = 2,
    spatial_temporal_blocks: int = 1,
    temporal_blocks: int = 1,
    mlp_ratio: float = 2.0,
    stem_channels: int = 8,
    dropout: float = 0.1,
) -> DMFTConfig:
    return DMFTConfig(
        modalities=list(MODALITIES if modalities is None else modalities),
        class_names=list(CLASS_NAMES if class_names is None else class_names),
        window_seconds=window_seconds,
        segments=segments,
        dim=dim,
        heads=heads,
        spatial_temporal_blocks=spatial_temporal_blocks,
        temporal_blocks=temporal_blocks,
        mlp_ratio=mlp_ratio,
        stem_channels=stem_channels,
        dropout=dropout,
    )


@pytest.fixture
def make_config() -> ConfigFactory:
    """A factory of tiny configs; keyword arguments override the sizes."""
    return _tiny_config


@pytest.fixture
def config() -> DMFTConfig:
    """Student-sized tiny config over accelerometer (50 Hz), gyroscope (25 Hz) and barometer (12 Hz)."""
    return _tiny_config()


@pytest.fixture
def teacher_sized_config() -> DMFTConfig:
    """Teacher-shaped (wider, deeper) but still tiny."""
    return _tiny_config(dim=32, heads=4, spatial_temporal_blocks=2, temporal_blocks=2, mlp_ratio=4.0, stem_channels=16)


@pytest.fixture
def model(config: DMFTConfig) -> DMFT:
    """A seeded, untrained network in eval mode (dropout off)."""
    torch.manual_seed(0)
    return DMFT(config).eval()


def _random_inputs(config: DMFTConfig, batch: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, spec.samples(config.window_seconds), spec.channels, generator=generator)
        for spec in config.modalities
    ]


@pytest.fixture
def make_inputs() -> InputsFactory:
    """``make_inputs(config, batch, seed=0)``: one random raw window ``(B, T_m, C_m)`` per modality."""
    return _random_inputs


def _synthetic_dataset(
    *,
    per_class: int = 12,
    classes: int = 3,
    subjects: int | None = 6,
    split: np.ndarray | None = None,
    modalities: list[ModalitySpec] | None = None,
    window_seconds: float = WINDOW_SECONDS,
    seed: int = 0,
) -> WindowDataset:
    """Windows whose class sets the frequency and amplitude of every sensor's oscillation, plus noise.

    Class k oscillates at ``1 + 2k`` Hz with amplitude ``1 + k/2`` (a different phase and
    subject-dependent gain per window), so a classifier can learn it from any modality.
    """
    modalities = list(MODALITIES if modalities is None else modalities)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    rng.shuffle(y)
    n = len(y)
    subject = None if subjects is None else np.arange(n) % subjects
    phase = rng.uniform(0, 2 * np.pi, n)
    gain = 1.0 if subject is None else 1.0 + 0.05 * subject
    arrays = {}
    for spec in modalities:
        samples = spec.samples(window_seconds)
        t = np.arange(samples) / spec.sample_rate
        wave = np.sin(2 * np.pi * (1 + 2 * y)[:, None] * t[None, :] + phase[:, None])  # (N, T)
        amplitude = ((1 + y / 2) * gain)[:, None, None]
        signal = amplitude * wave[:, :, None] * np.linspace(1.0, 0.5, spec.channels)[None, None, :]
        arrays[spec.name] = (signal + 0.1 * rng.standard_normal(signal.shape)).astype(np.float32)
    return WindowDataset(
        modalities=modalities,
        arrays=arrays,
        y=y.astype(np.int64),
        class_names=[f"class_{k}" for k in range(classes)],
        window_seconds=window_seconds,
        subject=subject,
        split=split,
    )


@pytest.fixture
def make_dataset() -> DatasetFactory:
    """A factory of small synthetic, learnable datasets (see ``_synthetic_dataset``)."""
    return _synthetic_dataset


def dataset_payload(dataset: WindowDataset) -> dict[str, np.ndarray]:
    """The raw ``.npz`` content of a dataset, as a dict that a test may corrupt before writing."""
    payload: dict[str, np.ndarray] = {"y": dataset.y, "class_names": np.array(dataset.class_names)}
    for spec in dataset.modalities:
        payload[f"X_{spec.name}"] = dataset.arrays[spec.name].copy()
        payload[f"sample_rate_{spec.name}"] = np.float64(spec.sample_rate)
    if dataset.subject is not None:
        payload["subject"] = dataset.subject
    if dataset.split is not None:
        payload["split"] = dataset.split
    return payload


@pytest.fixture
def payload() -> dict[str, np.ndarray]:
    """The raw content of a valid synthetic dataset file (6 subjects, 36 windows, 3 classes)."""
    return dataset_payload(_synthetic_dataset())


@pytest.fixture
def write_npz(tmp_path: Path) -> PayloadWriter:
    """``write_npz(content, name="data.npz")``: a dataset (via ``save_npz``) or a raw payload dict, into tmp_path."""

    def write(content: WindowDataset | dict[str, np.ndarray], name: str = "data.npz") -> Path:
        path = tmp_path / name
        if isinstance(content, WindowDataset):
            save_npz(path, content)
        else:
            np.savez(path, **content)
        return path

    return write

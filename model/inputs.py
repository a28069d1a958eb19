"""Checks of a prediction request against a model's modalities, shared by every runtime.

Torch-free on purpose: the torch bundle (``model.bundle``) and the ONNX edge runtime
(``model.edge``) accept exactly the same inputs and refuse bad ones with the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from model.config import ModalitySpec


class InputError(ValueError):
    """A prediction input does not match the model's modalities; the message says how."""


def check_windows(
    inputs: Mapping[str, Any], modalities: list[ModalitySpec], window_seconds: float, window_samples: Mapping[str, int]
) -> dict[str, np.ndarray]:
    """Validate ``{modality: (B, T_m, C_m)}`` against the model; returns float32 arrays keyed by modality.

    ``window_samples`` is each modality's samples per window (callers keep it, since it is
    read on every request).
    """
    if not inputs:
        raise InputError("no modalities given; expected any of " + ", ".join(window_samples))
    unknown = sorted(set(inputs) - set(window_samples))
    if unknown:
        raise InputError(f"unknown modality {unknown[0]!r}; this model reads " + ", ".join(window_samples))
    arrays: dict[str, np.ndarray] = {}
    batch = None
    for spec in modalities:
        if spec.name not in inputs:
            continue
        array = np.ascontiguousarray(inputs[spec.name], dtype=np.float32)
        expected = window_samples[spec.name]
        if array.ndim != 3:
            raise InputError(f"{spec.name}: expected shape (batch, {expected}, {spec.channels}), got {array.shape}")
        if array.shape[1] != expected:
            raise InputError(
                f"{spec.name}: a window has {expected} samples ({window_seconds:g} s at "
                f"{spec.sample_rate:g} Hz), got {array.shape[1]}"
            )
        if array.shape[2] != spec.channels:
            raise InputError(f"{spec.name}: expected {spec.channels} channels, got {array.shape[2]}")
        if batch is not None and array.shape[0] != batch:
            raise InputError(f"{spec.name}: batch of {array.shape[0]} windows, other modalities have {batch}")
        if not np.isfinite(array).all():
            raise InputError(f"{spec.name}: contains NaN or Inf")
        batch = array.shape[0]
        arrays[spec.name] = array
    return arrays

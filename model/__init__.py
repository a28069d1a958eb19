"""DMFT: Distilled Mid-Fusion Transformer networks for multi-modal human activity recognition.

The names below are imported on first use, so that the torch-free parts (``model.edge``,
``model.inputs``, ``model.config``) can be imported on a device where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.bundle import Bundle, load_bundle
    from model.config import DMFTConfig, ModalitySpec, TrainConfig, student_config, teacher_config
    from model.dmft import DMFT
    from model.inputs import InputError

_SOURCES = {
    "DMFT": "model.dmft",
    "Bundle": "model.bundle",
    "load_bundle": "model.bundle",
    "InputError": "model.inputs",
    "DMFTConfig": "model.config",
    "ModalitySpec": "model.config",
    "TrainConfig": "model.config",
    "student_config": "model.config",
    "teacher_config": "model.config",
}

__all__ = [
    "DMFT",
    "Bundle",
    "DMFTConfig",
    "InputError",
    "ModalitySpec",
    "TrainConfig",
    "load_bundle",
    "student_config",
    "teacher_config",
]


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_SOURCES[name]), name)

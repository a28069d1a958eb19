"""DMFT: Distilled Mid-Fusion Transformer networks for multi-modal human activity recognition."""

from model.bundle import Bundle, InputError, load_bundle
from model.config import DMFTConfig, ModalitySpec, TrainConfig, student_config, teacher_config
from model.dmft import DMFT

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

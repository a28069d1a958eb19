"""Configuration of a DMFT network: which modalities it reads and how big it is.

Modalities are data, not code: a deployment with a barometer or a second wrist only
lists another ``ModalitySpec``. Teacher and student are the same architecture with
two presets (``teacher_config`` / ``student_config``); a bundle stores ``asdict`` of
the config so the network can be rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModalitySpec:
    """One sensor stream: its name, channel count and sample rate."""

    name: str
    channels: int
    sample_rate: float
    # True when the channels are x/y/z triplets in the device frame: a random rotation
    # of the device then rotates all such modalities together (accelerometer, gyroscope,
    # magnetometer), which is the augmentation that matters most for wearables.
    rotatable: bool = False

    def samples(self, window_seconds: float) -> int:
        """Samples of this modality in one window."""
        return round(window_seconds * self.sample_rate)


@dataclass
class DMFTConfig:
    """Sizes of one DMFT network (teacher or student) and the data it reads."""

    modalities: list[ModalitySpec]
    class_names: list[str]
    window_seconds: float = 2.0
    # Every modality is cut into this many equal-duration segments, one token each:
    # 10 segments of 0.2 s resolve the repetition phase of the exercises we target.
    segments: int = 10
    # Width of the token stream.
    dim: int = 128
    heads: int = 4
    # Factorised spatial-temporal blocks before fusion (per-modality streams).
    spatial_temporal_blocks: int = 3
    # Temporal blocks after the mid-fusion module (one fused stream).
    temporal_blocks: int = 2
    mlp_ratio: float = 4.0
    # Channels of the convolution that smooths raw samples before segmenting.
    stem_channels: int = 32
    dropout: float = 0.1

    def __post_init__(self) -> None:
        self.modalities = [m if isinstance(m, ModalitySpec) else ModalitySpec(**m) for m in self.modalities]
        if not self.modalities:
            raise ValueError("a model needs at least one modality")
        names = [m.name for m in self.modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate modality names: {names}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        for spec in self.modalities:
            if spec.samples(self.window_seconds) < self.segments:
                raise ValueError(
                    f"modality {spec.name!r} has {spec.samples(self.window_seconds)} samples per "
                    f"window, fewer than the {self.segments} segments"
                )

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DMFTConfig:
        return cls(**data)


@dataclass
class DistillConfig:
    """Weights of the student's loss terms (hard labels, soft logits, fused-feature hint)."""

    hard_weight: float = 0.5
    soft_weight: float = 0.5
    # T=4 softens the teacher enough that the ranking of wrong classes carries signal.
    temperature: float = 4.0
    hint_weight: float = 1.0


@dataclass
class TrainConfig:
    """Optimisation and augmentation of one training run."""

    # 80 epochs: held-out accuracy still rose from 60 to 110 epochs in our runs.
    epochs: int = 80
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    # Probability that a training window loses one of its modalities (never all): at 0.5
    # each single modality is seen alone a quarter of the time, which the missing-sensor
    # accuracy needs, while full windows keep their accuracy.
    modality_dropout: float = 0.5
    augment: bool = True
    # Augmentation strengths, in physical units where they have one.
    rotation_degrees: float = 20.0
    scale_sd: float = 0.1
    shift_seconds: float = 0.2
    # Relative change of playback speed: +-15 % covers how fast people repeat an exercise.
    speed_change: float = 0.15
    jitter_sd: float = 0.05
    distill: DistillConfig = field(default_factory=DistillConfig)


def teacher_config(modalities: list[ModalitySpec], class_names: list[str], window_seconds: float = 2.0) -> DMFTConfig:
    """The large teacher: wide tokens, three spatial-temporal blocks and two fused blocks."""
    return DMFTConfig(modalities=modalities, class_names=class_names, window_seconds=window_seconds)


def student_config(modalities: list[ModalitySpec], class_names: list[str], window_seconds: float = 2.0) -> DMFTConfig:
    """The lite student for the edge: a quarter of the width, one block on each side of fusion."""
    return DMFTConfig(
        modalities=modalities,
        class_names=class_names,
        window_seconds=window_seconds,
        dim=48,
        heads=2,
        spatial_temporal_blocks=1,
        temporal_blocks=1,
        mlp_ratio=2.0,
        stem_channels=16,
    )

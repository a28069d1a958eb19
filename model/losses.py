"""Training losses: cross-entropy for the teacher, and the student's distillation objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import DistillConfig


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, times T² so its gradients keep their scale."""
    teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """MSE between the projected student fused features ``(B, S, D_s)`` and the teacher's ``(B, S, D_t)``.

    The teacher's features are layer-normalised (without parameters) so the hint has
    the same scale whatever the magnitude of the teacher's residual stream.
    """
    target = F.layer_norm(teacher_features, teacher_features.shape[-1:])
    return F.mse_loss(projection(student_features), target)


def distillation_loss(
    *,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    projection: nn.Module,
    config: DistillConfig,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The weighted sum under ``"loss"`` and each term under its own name."""
    parts = {
        "hard": F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing),
        "soft": soft_target_loss(student_logits, teacher_logits, config.temperature),
        "hint": hint_loss(student_features, teacher_features, projection),
    }
    parts["loss"] = (
        config.hard_weight * parts["hard"] + config.soft_weight * parts["soft"] + config.hint_weight * parts["hint"]
    )
    return parts

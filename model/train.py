"""Training engine: one epoch, evaluation, and the two objectives (plain and distilled).

Importable pieces in the manner of MAE's engine: ``train_one_epoch`` and ``evaluate``
know nothing about teachers or students; an *objective* maps a batch to its losses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.augment import augment, drop_modalities
from model.config import ModalitySpec, TrainConfig
from model.data import WindowDataset
from model.dmft import DMFT
from model.errors import TrainingError
from model.evaluation import classification_report
from model.losses import distillation_loss

log = logging.getLogger(__name__)

# (raw windows per modality, present mask (B, M), labels (B,)) -> named losses with "loss" to minimise.
Objective = Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class TensorData:
    """A dataset as tensors on the training device, modalities in a model's order."""

    xs: list[torch.Tensor]
    y: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset: WindowDataset, specs: list[ModalitySpec], device: torch.device) -> TensorData:
        xs = [torch.from_numpy(dataset.arrays[spec.name]).to(device) for spec in specs]
        return cls(xs=xs, y=torch.from_numpy(dataset.y).to(device))

    def __len__(self) -> int:
        return len(self.y)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def channel_statistics(data: TensorData) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-channel mean and standard deviation of each modality, over all samples of all windows."""
    means = [x.mean(dim=(0, 1)) for x in data.xs]
    stds = [x.std(dim=(0, 1)) for x in data.xs]
    return means, stds


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_one_epoch(
    model: nn.Module,
    data: TensorData,
    *,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    specs: list[ModalitySpec],
    channel_std: list[torch.Tensor],
    config: TrainConfig,
    generator: torch.Generator,
    epoch: int,
) -> dict[str, float]:
    """One pass over shuffled, augmented, modality-dropped batches; returns the mean of each loss."""
    model.train()
    device = data.y.device
    order = torch.randperm(len(data), generator=generator, device=device)
    totals: dict[str, float] = {}
    steps = 0
    for start in range(0, len(data), config.batch_size):
        index = order[start : start + config.batch_size]
        xs = [x[index] for x in data.xs]
        labels = data.y[index]
        if config.augment:
            xs = augment(xs, specs, channel_std, config, generator)
        present = torch.ones(len(index), len(specs), dtype=torch.bool, device=device)
        present = drop_modalities(present, config.modality_dropout, generator)
        parts = objective(xs, present, labels)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at epoch {epoch}, step {steps}: lower the learning rate "
                "or check the data for extreme values"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value.item()
        steps += 1
    return {name: total / steps for name, total in totals.items()}


@torch.no_grad()
def predict_logits(model: nn.Module, data: TensorData, present: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    chunks = []
    for start in range(0, len(data), batch_size):
        stop = start + batch_size
        chunks.append(model([x[start:stop] for x in data.xs], present[start:stop]))
    return torch.cat(chunks)


def evaluate(model: nn.Module, data: TensorData, class_names: list[str], *, missing: int | None = None) -> dict:
    """Accuracy, macro-F1 and confusion on ``data``; ``missing`` hides that modality index everywhere."""
    present = torch.ones(len(data), len(data.xs), dtype=torch.bool, device=data.y.device)
    if missing is not None:
        present[:, missing] = False
    predictions = predict_logits(model, data, present).argmax(dim=1)
    return classification_report(data.y.cpu().numpy(), predictions.cpu().numpy(), class_names)


def cross_entropy_objective(model: nn.Module, label_smoothing: float) -> Objective:
    def objective(xs: list[torch.Tensor], present: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(model(xs, present), labels, label_smoothing=label_smoothing)}

    return objective


def distillation_objective(student: DMFT, teacher: DMFT, projection: nn.Module, config: TrainConfig) -> Objective:
    """The student learns from labels, the frozen teacher's soft logits and its fused features."""

    def objective(xs: list[torch.Tensor], present: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            teacher.eval()
            teacher_features = teacher.forward_features(xs, present)
            teacher_logits = teacher.forward_head(teacher_features)
        student_features = student.forward_features(xs, present)
        return distillation_loss(
            student_logits=student.forward_head(student_features),
            teacher_logits=teacher_logits,
            labels=labels,
            student_features=student_features,
            teacher_features=teacher_features,
            projection=projection,
            config=config.distill,
            label_smoothing=config.label_smoothing,
        )

    return objective


def fit(
    model: nn.Module,
    data: TensorData,
    *,
    objective: Objective,
    specs: list[ModalitySpec],
    config: TrainConfig,
    seed: int,
    name: str,
    extra_parameters: list[nn.Parameter] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` (and ``extra_parameters``, e.g. a hint projection) for ``config.epochs``."""
    device = data.y.device
    generator = torch.Generator(device=device).manual_seed(seed)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters or [])
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    scheduler = warmup_cosine(
        optimizer, total_steps=config.epochs * steps_per_epoch, warmup_steps=config.warmup_epochs * steps_per_epoch
    )
    _, channel_std = channel_statistics(data)
    history = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        losses = train_one_epoch(
            model,
            data,
            objective=objective,
            optimizer=optimizer,
            scheduler=scheduler,
            specs=specs,
            channel_std=channel_std,
            config=config,
            generator=generator,
            epoch=epoch,
        )
        history.append({"epoch": epoch, **losses})
        log.info(
            "%s epoch %d/%d  %s  lr %.2e  %.0fs",
            name,
            epoch,
            config.epochs,
            "  ".join(f"{key} {value:.4f}" for key, value in losses.items()),
            scheduler.get_last_lr()[0],
            time.perf_counter() - started,
        )
    return history

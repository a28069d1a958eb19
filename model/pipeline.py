"""The ``dmft fit`` pipeline: train the teacher, distil the student, evaluate, write bundles.

``train_teacher`` and ``train_student`` are the two recipes; ``run_fit`` composes them
on one subject-held-out split and writes ``teacher/``, ``student/``, ``metrics.json``
and the model card. Benchmarks import the same functions, so every figure in the
README comes from the code path users run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.bundle import save_bundle
from model.config import DMFTConfig, TrainConfig, student_config, teacher_config
from model.data import Split, WindowDataset, load_npz, train_test_split
from model.dmft import DMFT, count_parameters
from model.report import write_model_card
from model.train import (
    TensorData,
    channel_statistics,
    cross_entropy_objective,
    distillation_objective,
    evaluate,
    fit,
    seed_everything,
    select_device,
)

log = logging.getLogger(__name__)


def build_model(config: DMFTConfig, train_data: TensorData, device: torch.device) -> DMFT:
    """A fresh network whose input normalisation comes from the training split."""
    model = DMFT(config)
    model.set_normalization(*channel_statistics(train_data))
    return model.to(device)


def train_teacher(
    dataset: WindowDataset, train_data: TensorData, config: TrainConfig, *, seed: int, device: torch.device
) -> DMFT:
    seed_everything(seed)
    teacher = build_model(
        teacher_config(dataset.modalities, dataset.class_names, dataset.window_seconds), train_data, device
    )
    objective = cross_entropy_objective(teacher, config.label_smoothing)
    fit(teacher, train_data, objective=objective, specs=dataset.modalities, config=config, seed=seed, name="teacher")
    return teacher.eval()


def train_student(
    dataset: WindowDataset,
    train_data: TensorData,
    config: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    teacher: DMFT | None,
) -> DMFT:
    """Distil from ``teacher``; with ``teacher=None`` the student learns from labels alone."""
    seed_everything(seed)
    student = build_model(
        student_config(dataset.modalities, dataset.class_names, dataset.window_seconds), train_data, device
    )
    if teacher is None:
        objective = cross_entropy_objective(student, config.label_smoothing)
        extra: list[nn.Parameter] = []
    else:
        teacher.requires_grad_(False)
        projection = nn.Linear(student.config.dim, teacher.config.dim).to(device)
        objective = distillation_objective(student, teacher, projection, config)
        extra = list(projection.parameters())
    fit(
        student,
        train_data,
        objective=objective,
        specs=dataset.modalities,
        config=config,
        seed=seed,
        name="student",
        extra_parameters=extra,
    )
    return student.eval()


def held_out_metrics(model: nn.Module, test_data: TensorData, dataset: WindowDataset, split: Split) -> dict[str, Any]:
    """Held-out report plus accuracy with each single modality removed."""
    report = evaluate(model, test_data, dataset.class_names)
    report["params"] = count_parameters(model)
    if len(dataset.modalities) > 1:
        report["missing_modality"] = {
            spec.name: evaluate(model, test_data, dataset.class_names, missing=index)["accuracy"]
            for index, spec in enumerate(dataset.modalities)
        }
    report["held_out_subjects"] = split.held_out_subjects
    return report


def run_fit(
    data_path: str | Path,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    seed: int,
    device: str,
    command: str,
    window_seconds: float | None = None,
) -> dict[str, Any]:
    """Everything ``dmft fit`` does; returns the content of ``metrics.json``."""
    out_dir = Path(out_dir)
    dataset = load_npz(data_path, window_seconds)
    split = train_test_split(dataset)
    target = select_device(device)
    log.info(
        "%d windows: %d train, %d test (%s split, held-out subjects %s) on %s",
        len(dataset),
        len(split.train),
        len(split.test),
        split.kind,
        split.held_out_subjects,
        target,
    )
    train_data = TensorData.from_dataset(dataset.subset(split.train), dataset.modalities, target)
    test_data = TensorData.from_dataset(dataset.subset(split.test), dataset.modalities, target)

    teacher = train_teacher(dataset, train_data, config, seed=seed, device=target)
    student = train_student(dataset, train_data, config, seed=seed, device=target, teacher=teacher)

    training = {
        "seed": seed,
        "device": str(target),
        "train_config": asdict(config),
        "dataset_fingerprint": dataset.fingerprint(),
        "train_windows": len(split.train),
        "split": split.kind,
        "command": command,
    }
    metrics: dict[str, Any] = {
        "dataset": {
            "path": str(data_path),
            "fingerprint": dataset.fingerprint(),
            "windows": len(dataset),
            "modalities": [asdict(spec) for spec in dataset.modalities],
            "class_names": dataset.class_names,
            "window_seconds": dataset.window_seconds,
        },
        "split": {
            "kind": split.kind,
            "train_windows": len(split.train),
            "test_windows": len(split.test),
            "held_out_subjects": split.held_out_subjects,
        },
        "command": command,
        "seed": seed,
    }
    for name, model in (("teacher", teacher), ("student", student)):
        metrics[name] = held_out_metrics(model, test_data, dataset, split)
        save_bundle(out_dir / name, model, name=name, training=training, metrics=metrics[name])
        log.info("%s: accuracy %.4f  macro-F1 %.4f", name, metrics[name]["accuracy"], metrics[name]["macro_f1"])
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(out_dir, metrics)
    return metrics

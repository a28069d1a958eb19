"""The inference engine as the API process sees it: the served models and their answers.

The networks live in the inference process (``app.inference``); this side knows the models from
their manifests (modalities, classes, version ...), hands already-checked float32 windows to the
inference process grouped by modality subset, and turns its answers into probabilities, or into
domain exceptions: overload, queue deadline, an inference process that is restarting.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from app.decoding import InputSpec, WindowArrays
from app.exceptions import InvalidInput, QueueTimeout
from app.inference.protocol import NO_FALLBACK, Outcome, Result
from app.inference.supervisor import InferenceSupervisor, LoadRequest
from app.settings import Settings
from model import DMFTConfig, ModalitySpec

log = logging.getLogger(__name__)

MODEL_NAMES = ("student", "teacher")
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ServedModel:
    """A loaded bundle, described by its manifest."""

    name: str
    version: str
    params: int
    metrics: dict[str, Any]
    config: DMFTConfig

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ServedModel:
        return cls(
            manifest["name"],
            manifest["version"],
            manifest["params"],
            manifest["metrics"],
            DMFTConfig.from_dict(manifest["config"]),
        )

    @property
    def modalities(self) -> list[ModalitySpec]:
        return self.config.modalities

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names

    @property
    def window_seconds(self) -> float:
        return self.config.window_seconds

    @cached_property
    def window_samples(self) -> dict[str, int]:
        return {spec.name: spec.samples(self.window_seconds) for spec in self.modalities}


@dataclass
class Answer:
    probabilities: np.ndarray  # (K,)
    model: str  # the model that answered


class InferenceEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        self.supervisor = InferenceSupervisor(
            LoadRequest(
                bundles=[str(Path(settings.bundles) / name) for name in MODEL_NAMES],
                compile=settings.compile_models,
                threads=settings.torch_threads,
                max_batch_size=settings.max_batch_size,
                max_batch_delay_s=settings.max_batch_delay_ms / 1000,
            ),
            queue_size=settings.queue_size,
            queue_timeout_s=settings.queue_timeout_seconds,
        )

    async def start(self) -> None:
        manifests = await self.supervisor.start()
        self.models = {name: ServedModel.from_manifest(m) for name, m in zip(MODEL_NAMES, manifests, strict=True)}
        student, teacher = self.models["student"], self.models["teacher"]
        if student.modalities != teacher.modalities or student.class_names != teacher.class_names:
            await self.stop()
            raise ValueError("the student and teacher bundles disagree on modalities or classes")
        for model in self.models.values():
            log.info("loaded %s %s (%d parameters)", model.name, model.version, model.params)

    async def stop(self) -> None:
        """Answer the windows in flight, then end the inference process."""
        await self.supervisor.stop(DRAIN_TIMEOUT_S)

    @property
    def ready(self) -> bool:
        return self.supervisor.ready

    @property
    def reference(self) -> ServedModel:
        """The model whose modalities and classes both models share."""
        return self.models["student"]

    @cached_property
    def specs(self) -> dict[str, ModalitySpec]:
        """Modalities by name, in model order."""
        return {spec.name: spec for spec in self.reference.modalities}

    @cached_property
    def input_spec(self) -> InputSpec:
        reference = self.reference
        return InputSpec(
            self.specs, reference.window_samples, reference.window_seconds, self.settings.max_sample_magnitude
        )

    async def predict_windows(self, windows: list[WindowArrays], model: str) -> list[Answer]:
        """Probabilities for each window, in order; the cascade asks the teacher only where the student is unsure."""
        first, fallback = ("student", "teacher") if model == "cascade" else (model, None)
        groups: dict[int, list[int]] = {}
        for index, window in enumerate(windows):
            groups.setdefault(self._mask(window), []).append(index)
        futures = [self._submit(first, fallback, mask, [windows[i] for i in group]) for mask, group in groups.items()]
        # One group is the common case: awaited alone, it skips gather's bookkeeping on the hot path.
        results = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        answers: dict[int, Answer] = {}
        for group, result in zip(groups.values(), results, strict=True):
            self._raise_for(result, first, group)
            for position, index in enumerate(group):
                answers[index] = Answer(result.probabilities[position], MODEL_NAMES[result.models[position]])
        return [answers[index] for index in range(len(windows))]

    def _mask(self, window: WindowArrays) -> int:
        """Bit i set: the window holds modality i (model order)."""
        return sum(1 << position for position, name in enumerate(self.specs) if name in window)

    def _submit(
        self, first: str, fallback: str | None, mask: int, windows: list[WindowArrays]
    ) -> asyncio.Future[Result]:
        names = [name for position, name in enumerate(self.specs) if mask & (1 << position)]
        return self.supervisor.submit(
            MODEL_NAMES.index(first),
            NO_FALLBACK if fallback is None else MODEL_NAMES.index(fallback),
            self.settings.cascade_threshold,
            mask,
            len(windows),
            b"".join(window[name].tobytes() for name in names for window in windows),
        )

    def _raise_for(self, result: Result, model: str, group: list[int]) -> None:
        """The domain exception of an answer other than probabilities, if it is one."""
        if result.outcome is Outcome.EXPIRED:
            raise QueueTimeout(
                f"the request waited longer than {self.settings.queue_timeout_seconds:g} s in the {model} model's "
                "queue; retry shortly"
            )
        if result.outcome is Outcome.NON_FINITE:
            window = group[result.failed_window]
            raise InvalidInput(
                f"window {window}: the model gives no finite answer for its samples; they are too extreme to classify",
                details=[{"window": window}],
            )
        if result.outcome is Outcome.FAILED:
            raise RuntimeError(result.message)

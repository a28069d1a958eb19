"""The inference engine: the loaded bundles, their batching workers, and input checks.

Routes hand it windows as parsed JSON rows; it turns them into arrays, checks them
against the model's modalities (any problem is a 422 naming it), and answers with
probabilities from the student, the teacher, or the cascade of both.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from app.errors import ApiError, invalid_input, unavailable
from app.settings import Settings
from app.worker import BatchingWorker, Overloaded
from model import Bundle, InputError, load_bundle

log = logging.getLogger(__name__)

MODEL_NAMES = ("student", "teacher")


@dataclass
class Answer:
    probabilities: np.ndarray  # (K,)
    model: str  # the model that answered


class InferenceEngine:
    def __init__(self, bundles: dict[str, Bundle], settings: Settings) -> None:
        self.bundles = bundles
        self.settings = settings
        # Modalities by name, shared by both models; looked up for every chunk and window.
        self.specs = {spec.name: spec for spec in bundles["student"].modalities}
        self.workers = {
            name: BatchingWorker(
                bundle,
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_batch_delay_ms / 1000,
                queue_size=settings.queue_size,
            )
            for name, bundle in bundles.items()
        }

    @classmethod
    def load(cls, settings: Settings) -> InferenceEngine:
        torch.set_num_threads(settings.torch_threads)
        bundles = {
            name: load_bundle(Path(settings.bundles) / name, compile=settings.compile_models) for name in MODEL_NAMES
        }
        student, teacher = bundles["student"], bundles["teacher"]
        if student.modalities != teacher.modalities or student.class_names != teacher.class_names:
            raise ValueError("the student and teacher bundles disagree on modalities or classes")
        for bundle in bundles.values():
            log.info("loaded %s %s (%d parameters)", bundle.name, bundle.version, bundle.params)
        return cls(bundles, settings)

    def start(self) -> None:
        for worker in self.workers.values():
            worker.start()

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in self.workers.values()))

    @property
    def reference(self) -> Bundle:
        """The bundle whose modalities and classes both models share."""
        return self.bundles["student"]

    def to_window(self, modalities: dict[str, list[list[float]]]) -> dict[str, np.ndarray]:
        """Parsed JSON rows of one window to checked float32 arrays ``(T, C)``."""
        arrays = {name: self.to_samples(name, rows) for name, rows in modalities.items()}
        try:
            checked = self.reference.check_inputs({name: array[None] for name, array in arrays.items()})
        except InputError as error:
            raise invalid_input(str(error)) from error
        return {name: array[0] for name, array in checked.items()}

    def to_samples(self, name: str, rows: list[list[float]]) -> np.ndarray:
        """Rows of one modality, any count, to ``(N, C)``; ragged or empty rows are a 422."""
        if name not in self.specs:
            raise invalid_input(f"unknown modality {name!r}; this model reads " + ", ".join(self.specs))
        if not rows:
            raise invalid_input(f"{name}: no samples")
        channels = self.specs[name].channels
        try:
            with np.errstate(over="ignore"):  # out-of-range values are reported below
                array = np.asarray(rows, dtype=np.float32)
        except ValueError:  # ragged rows; the loop below names the first one
            array = None
        if array is None or array.shape[1:] != (channels,):
            index, row = next((i, row) for i, row in enumerate(rows) if len(row) != channels)
            raise invalid_input(f"{name}: row {index} has {len(row)} values, expected {channels} channels")
        if not np.isfinite(array).all():
            row = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            raise invalid_input(f"{name}: row {row} holds a value outside the float32 range")
        return array

    async def predict_windows(self, windows: list[dict[str, np.ndarray]], model: str) -> list[Answer]:
        """Probabilities for each window, in order; the cascade asks the teacher only where needed."""
        first = "student" if model == "cascade" else model
        answers = [Answer(p, first) for p in await self._run(first, windows)]
        if model == "cascade":
            unsure = [
                i for i, answer in enumerate(answers) if answer.probabilities.max() < self.settings.cascade_threshold
            ]
            if unsure:
                second = await self._run("teacher", [windows[i] for i in unsure])
                for index, probabilities in zip(unsure, second, strict=True):
                    answers[index] = Answer(probabilities, "teacher")
        return answers

    async def _run(self, model: str, windows: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        try:
            futures = self.workers[model].submit(windows)
        except Overloaded as error:
            raise unavailable(
                "overloaded",
                f"the {model} model is at capacity ({error}); retry shortly",
                self.settings.retry_after_seconds,
            ) from error
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as error:
            raise ApiError(500, "inference_failed", f"the {model} model failed: {error}") from error

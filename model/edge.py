"""The edge runtime: an exported model (``dmft export``) in ONNX Runtime, without torch.

An export is two files side by side: ``NAME.onnx`` (the network, its input normalisation
and its calibration temperature) and ``NAME.json``, the sidecar that says what the graph
reads and answers (modalities with channels and rates, window length, classes,
temperature, precision, held-out metrics) and the SHA-256 of the ``.onnx`` file it
belongs to. ``load_onnx`` gives an ``EdgeModel`` with the contract of ``model.Bundle``:
``predict({"accelerometer": (B, T, C), ...}) -> (B, K)`` probabilities for any non-empty
subset of the modalities, refusing bad input with the same ``InputError``.

Needs only numpy and onnxruntime (``pip install 'dmft-activity[edge]'``).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from model.config import ModalitySpec
from model.inputs import check_windows

SIDECAR_FORMAT = "dmft-onnx"
SIDECAR_VERSION = 1
# The graph's extra input: (B, M) bool, True where the modality was observed in that window.
MASK_INPUT = "present"
# The graph's outputs: calibrated probabilities softmax(logits / temperature), and the raw logits.
PROBABILITIES_OUTPUT = "probabilities"
LOGITS_OUTPUT = "logits"


def sidecar_path(onnx_path: str | Path) -> Path:
    """Where the sidecar of ``NAME.onnx`` lives: ``NAME.json`` beside it."""
    return Path(onnx_path).with_suffix(".json")


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class EdgeModel:
    """An exported model in an ONNX Runtime session; ``predict`` may be called from several threads."""

    def __init__(self, session: ort.InferenceSession, manifest: dict[str, Any]) -> None:
        self.session = session
        self.manifest = manifest
        self.modalities = [ModalitySpec(**spec) for spec in manifest["modalities"]]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def window_seconds(self) -> float:
        return self.manifest["window_seconds"]

    @functools.cached_property
    def window_samples(self) -> dict[str, int]:
        return {spec.name: spec.samples(self.window_seconds) for spec in self.modalities}

    @property
    def temperature(self) -> float:
        return self.manifest["temperature"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def params(self) -> int:
        return self.manifest["params"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate a request against the model; returns float32 arrays keyed by modality."""
        return check_windows(inputs, self.modalities, self.window_seconds, self.window_samples)

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        arrays = self.check_inputs(inputs)
        batch = next(iter(arrays.values())).shape[0]
        if batch == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return self.session.run([PROBABILITIES_OUTPUT], self.feeds(arrays, batch))[0]

    def feeds(self, arrays: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """The graph's inputs for checked arrays: absent modalities zero-filled and masked out."""
        feeds: dict[str, np.ndarray] = {}
        present = np.zeros((batch, len(self.modalities)), dtype=bool)
        for index, spec in enumerate(self.modalities):
            if spec.name in arrays:
                feeds[spec.name] = arrays[spec.name]
                present[:, index] = True
            else:
                feeds[spec.name] = np.zeros((batch, self.window_samples[spec.name], spec.channels), dtype=np.float32)
        feeds[MASK_INPUT] = present
        return feeds


def read_sidecar(onnx_path: str | Path) -> dict[str, Any]:
    """The sidecar of an export, checked to be one this code reads and to describe this very file."""
    onnx_path = Path(onnx_path)
    path = sidecar_path(onnx_path)
    if not onnx_path.is_file() or not path.is_file():
        raise FileNotFoundError(f"{onnx_path} is not an exported model (needs {onnx_path.name} and {path.name})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != SIDECAR_FORMAT or manifest.get("format_version") != SIDECAR_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')}, "
            f"this code reads {SIDECAR_FORMAT!r} version {SIDECAR_VERSION}"
        )
    if manifest.get("onnx_sha256") != file_digest(onnx_path):
        raise ValueError(f"{path} describes another file than {onnx_path.name} (SHA-256 differs); export it again")
    return manifest


def load_onnx(path: str | Path, *, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)) -> EdgeModel:
    """Load ``NAME.onnx`` and its sidecar ``NAME.json`` written by ``dmft export``.

    ``threads`` are ONNX Runtime's intra-op threads of one call; one suits single windows
    and a service that runs several calls at once.
    """
    manifest = read_sidecar(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=list(providers))
    return EdgeModel(session, manifest)

"""Model bundles: a trained network with everything needed to serve and audit it.

A bundle is a directory with ``bundle.json`` (config, class names, normalisation
statistics, training metadata, held-out metrics) and ``weights.pt`` (the state dict).
``load_bundle`` rebuilds the network and compiles it with TorchScript (traced once,
frozen, with inference-only fusions) so a single-window call does not pay Python's
per-module overhead.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import DMFTConfig, ModalitySpec
from model.dmft import DMFT, count_parameters
from model.inputs import InputError as InputError  # the error of check_inputs, importable from here as before
from model.inputs import check_windows

BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "weights.pt"
FORMAT_VERSION = 1


def save_bundle(
    directory: str | Path, model: DMFT, *, name: str, training: dict[str, Any], metrics: dict[str, Any]
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    normalization = {
        spec.name: {
            "mean": tokenizer.normalizer.mean.tolist(),
            "std": tokenizer.normalizer.std.tolist(),
        }
        for spec, tokenizer in zip(model.config.modalities, model.tokenizers, strict=True)
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": _weights_digest(directory / WEIGHTS_FILE),
        "params": count_parameters(model),
        "config": model.config.to_dict(),
        "normalization": normalization,
        "training": training,
        "metrics": metrics,
    }
    (directory / BUNDLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _weights_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


class Bundle:
    """A loaded model: ``predict({"accelerometer": (B, T, C), ...}) -> (B, K)`` probabilities.

    Any non-empty subset of the bundle's modalities may be given. ``predict`` keeps no
    state between calls, so several threads may call it at once.
    """

    def __init__(self, model: DMFT, manifest: dict[str, Any], *, device: torch.device, compile: bool) -> None:
        self.config: DMFTConfig = model.config
        self.manifest = manifest
        self.device = device
        self.network = model.to(device).eval()
        self._forward = self._compile(self.network) if compile else self.network

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def modalities(self) -> list[ModalitySpec]:
        return self.config.modalities

    @property
    def class_names(self) -> list[str]:
        return self.config.class_names

    @property
    def window_seconds(self) -> float:
        return self.config.window_seconds

    @functools.cached_property
    def window_samples(self) -> dict[str, int]:
        """Samples per window of each modality; read on every call of ``check_inputs``."""
        return {spec.name: spec.samples(self.window_seconds) for spec in self.modalities}

    @property
    def params(self) -> int:
        return self.manifest["params"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest["metrics"]

    @property
    def temperature(self) -> float:
        """``predict`` answers ``softmax(logits / temperature)``; 1.0 when bundle.json has no ``temperature``."""
        return float(self.manifest.get("temperature", 1.0))

    def _compile(self, model: DMFT) -> torch.jit.ScriptModule:
        example = (self._placeholders(1), torch.ones(1, len(self.modalities), dtype=torch.bool, device=self.device))
        with torch.inference_mode(), warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.compile/torch.export, but on this
            # torch it is the fastest path for one window and needs no compiler at run time:
            # torch.compile took 7-26 s per model and a C++ toolchain for the same latency,
            # and an exported program ran slower than eager (bench/latency.py compares).
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)
            # The tracer warns that shapes read in Python may specialise the graph; the
            # batch dimension stays symbolic here, which the bundle tests check.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    def _placeholders(self, batch: int) -> list[torch.Tensor]:
        return [
            torch.zeros(batch, samples, spec.channels, device=self.device)
            for spec, samples in zip(self.modalities, self.window_samples.values(), strict=True)
        ]

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Validate a request against the bundle; returns float32 arrays keyed by modality."""
        return check_windows(inputs, self.modalities, self.window_seconds, self.window_samples)

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        arrays = self.check_inputs(inputs)
        batch = next(iter(arrays.values())).shape[0]
        if batch == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        xs = self._placeholders(batch)
        present = torch.zeros(batch, len(self.modalities), dtype=torch.bool, device=self.device)
        for index, spec in enumerate(self.modalities):
            if spec.name in arrays:
                xs[index] = torch.from_numpy(arrays[spec.name]).to(self.device)
                present[:, index] = True
        with torch.inference_mode():
            logits = self._forward(xs, present)
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / BUNDLE_FILE).read_text())


def load_bundle(path: str | Path, *, device: str | torch.device = "cpu", compile: bool = True) -> Bundle:
    """Load a bundle directory written by ``save_bundle`` (or ``dmft fit``)."""
    path = Path(path)
    if not (path / BUNDLE_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a model bundle (needs {BUNDLE_FILE} and {WEIGHTS_FILE})")
    manifest = read_manifest(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: bundle format {manifest.get('format_version')}, this code reads {FORMAT_VERSION}")
    model = DMFT(DMFTConfig.from_dict(manifest["config"]))
    model.load_state_dict(torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return Bundle(model, manifest, device=torch.device(device), compile=compile)

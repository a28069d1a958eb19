"""Export a bundle to ONNX, for runtimes without torch (``dmft export``).

The graph reads one raw window per modality ``(B, T_m, C_m)``, named after the modality,
and the mask ``present (B, M)`` (True where the modality was observed), with a dynamic
batch ``B``; so any non-empty subset of the sensors works, as in ``Bundle.predict``. The
training-split normalisation is inside the graph (it is part of the network), and so is
the bundle's calibration temperature: the graph answers ``probabilities =
softmax(logits / temperature)``, what ``Bundle.predict`` answers, and the raw ``logits``.
A sidecar ``NAME.json`` describes the file (see ``model.edge``).

Before anything is written, the export runs in ONNX Runtime against ``Bundle.predict``
on windows drawn around the training statistics, for every non-empty subset of the
modalities, and is refused beyond ``PARITY_TOLERANCE``.

``quantize="int8"`` quantizes the exported graph (``model.quantize``), calibrated on
training windows of a dataset in every modality subset, and records the int8 model's
held-out metrics in its sidecar.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from model.bundle import Bundle, load_bundle
from model.data import WindowDataset, load_npz, train_test_split
from model.dmft import DMFT
from model.edge import (
    LOGITS_OUTPUT,
    MASK_INPUT,
    PROBABILITIES_OUTPUT,
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    EdgeModel,
    file_digest,
    load_onnx,
    sidecar_path,
)
from model.evaluation import classification_report, relabel
from model.quantize import quantize_int8

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "int8")
# Largest difference of one probability between the graph and Bundle.predict; float32
# reorders of the same sums stay near 1e-6.
PARITY_TOLERANCE = 1e-4
PARITY_WINDOWS = 64
# Training windows whose activation ranges calibrate int8, each seen in every modality subset.
CALIBRATION_WINDOWS = 512
CALIBRATION_BATCH = 64
EVALUATION_BATCH = 512


class ExportError(ValueError):
    """The bundle cannot be exported faithfully; the message says what differs."""


class _Calibrated(nn.Module):
    """The bundle's network answering what the graph answers: calibrated probabilities and logits."""

    def __init__(self, network: DMFT, temperature: float) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("temperature", torch.tensor(temperature, dtype=torch.float32))

    def forward(self, xs: list[torch.Tensor], present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.network(xs, present)
        return torch.softmax(logits / self.temperature, dim=1), logits


def modality_subsets(names: list[str]) -> Iterator[tuple[str, ...]]:
    """Every non-empty subset of ``names``, in order."""
    for size in range(1, len(names) + 1):
        yield from itertools.combinations(names, size)


def write_graph(bundle: Bundle, path: Path) -> None:
    """Trace the bundle's network with ``torch.export`` and write it as one self-contained ONNX file."""
    names = [spec.name for spec in bundle.modalities]
    clashes = sorted({MASK_INPUT, PROBABILITIES_OUTPUT, LOGITS_OUTPUT} & set(names))
    if clashes:
        raise ExportError(f"a modality named {clashes[0]!r} would clash with the graph's own input or output names")
    network = _Calibrated(bundle.network, bundle.temperature).eval()
    # A batch of 2 keeps the batch symbolic: torch.export specialises sizes 0 and 1.
    example = (
        [torch.zeros(2, bundle.window_samples[spec.name], spec.channels) for spec in bundle.modalities],
        torch.ones(2, len(names), dtype=torch.bool),
    )
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        # Internals of torch.export on this release, and a note that every input shares the one batch axis.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"# The axis name: batch will not be used", category=UserWarning)
        program = torch.onnx.export(
            network,
            example,
            dynamo=True,
            verbose=False,
            input_names=[*names, MASK_INPUT],
            output_names=[PROBABILITIES_OUTPUT, LOGITS_OUTPUT],
            dynamic_shapes=([{0: batch}] * len(names), {0: batch}),
        )
    model = program.model_proto
    # The exporter annotates every node with the Python stack that made it: half the file,
    # and the paths of the machine that exported it.
    for node in model.graph.node:
        del node.metadata_props[:]
    model.doc_string = f"DMFT {bundle.name} {bundle.version}"
    onnx.save(model, path)


# Loggers of the exporter that narrate every graph rewrite at INFO, or note optional operator
# libraries (torchvision) that it did not find.
EXPORTER_LOGGERS = {
    "onnx_ir": logging.WARNING,
    "onnxscript": logging.WARNING,
    "onnxruntime.quantization": logging.WARNING,
    "torch.onnx": logging.ERROR,
}


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    loggers = {logging.getLogger(name): level for name, level in EXPORTER_LOGGERS.items()}
    previous = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in previous.items():
            logger.setLevel(level)


def write_sidecar(onnx_path: Path, bundle: Bundle, *, precision: str, metrics: dict[str, Any]) -> Path:
    manifest = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "name": bundle.name,
        # Answers of a float32 export are the bundle's; int8 answers differ, so its version does too.
        "version": bundle.version if precision == "float32" else f"{bundle.version}-{precision}",
        "bundle_version": bundle.version,
        "precision": precision,
        "onnx_sha256": file_digest(onnx_path),
        "opset": next(o.version for o in onnx.load(onnx_path, load_external_data=False).opset_import if not o.domain),
        "modalities": [
            {"name": s.name, "channels": s.channels, "sample_rate": s.sample_rate, "rotatable": s.rotatable}
            for s in bundle.modalities
        ],
        "class_names": bundle.class_names,
        "window_seconds": bundle.window_seconds,
        "temperature": bundle.temperature,
        "inputs": [spec.name for spec in bundle.modalities] + [MASK_INPUT],
        "outputs": [PROBABILITIES_OUTPUT, LOGITS_OUTPUT],
        "params": bundle.params,
        "metrics": metrics,
    }
    path = sidecar_path(onnx_path)
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def synthetic_windows(bundle: Bundle, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Windows drawn around each modality's training mean and spread, so no normalised input is degenerate."""
    rng = np.random.default_rng(seed)
    windows = {}
    for spec in bundle.modalities:
        statistics = bundle.manifest["normalization"][spec.name]
        noise = rng.standard_normal((count, bundle.window_samples[spec.name], spec.channels))
        windows[spec.name] = (np.asarray(statistics["mean"]) + np.asarray(statistics["std"]) * noise).astype(np.float32)
    return windows


def parity(bundle: Bundle, exported: EdgeModel, windows: Mapping[str, np.ndarray]) -> float:
    """Largest probability difference over every modality subset; raises ``ExportError`` past the tolerance.

    The two must also agree on the top class wherever the bundle's top two classes are
    further apart than the tolerance (a closer tie may fall either way).
    """
    worst = 0.0
    for subset in modality_subsets(list(windows)):
        inputs = {name: windows[name] for name in subset}
        expected, got = bundle.predict(inputs), exported.predict(inputs)
        difference = float(np.abs(expected - got).max())
        top_two = np.sort(expected, axis=1)[:, -2:]
        decided = top_two[:, 1] - top_two[:, 0] > PARITY_TOLERANCE
        flipped = int((expected.argmax(1) != got.argmax(1))[decided].sum())
        if difference > PARITY_TOLERANCE or flipped:
            raise ExportError(
                f"the ONNX graph differs from the bundle with {', '.join(subset)}: max |probability difference| "
                f"{difference:.2e} (tolerance {PARITY_TOLERANCE:.0e}), {flipped} top classes differ"
            )
        worst = max(worst, difference)
    return worst


def calibration_batches(model: EdgeModel, dataset: WindowDataset) -> Iterator[dict[str, np.ndarray]]:
    """Feeds of up to ``CALIBRATION_WINDOWS`` training windows, in every modality subset the data has."""
    train = train_test_split(dataset).train
    chosen = np.sort(np.random.default_rng(0).permutation(train)[:CALIBRATION_WINDOWS])
    names = [spec.name for spec in model.modalities if spec.name in dataset.arrays]
    for subset in modality_subsets(names):
        for start in range(0, len(chosen), CALIBRATION_BATCH):
            index = chosen[start : start + CALIBRATION_BATCH]
            arrays = model.check_inputs({name: dataset.arrays[name][index] for name in subset})
            yield model.feeds(arrays, len(index))


def held_out_metrics(model: EdgeModel, dataset: WindowDataset) -> dict[str, Any]:
    """Report on the held-out windows with every modality, plus accuracy with each single modality removed."""
    split = train_test_split(dataset)
    test = dataset.subset(split.test)
    names = [spec.name for spec in model.modalities]
    y_true = relabel(test.y, test.class_names, model.class_names)

    def predicted(subset: list[str]) -> np.ndarray:
        return np.concatenate(
            [
                model.predict({name: test.arrays[name][start : start + EVALUATION_BATCH] for name in subset}).argmax(1)
                for start in range(0, len(test), EVALUATION_BATCH)
            ]
        )

    report = classification_report(y_true, predicted(names), model.class_names)
    if len(names) > 1:
        report["missing_modality"] = {
            left_out: float(np.mean(predicted([n for n in names if n != left_out]) == y_true)) for left_out in names
        }
    report["held_out_subjects"] = split.held_out_subjects
    return report


def calibration_dataset(path: str | Path, bundle: Bundle) -> WindowDataset:
    """The dataset whose training windows calibrate int8; it must hold every modality of the bundle."""
    dataset = load_npz(path, bundle.window_seconds)
    missing = [spec.name for spec in bundle.modalities if spec.name not in dataset.arrays]
    if missing:
        raise ExportError(f"{path} has no {', '.join(missing)} windows; calibration needs every modality of the model")
    if dataset.fingerprint() != bundle.manifest.get("training", {}).get("dataset_fingerprint"):
        log.warning(
            "%s is not the dataset %s was trained on: its held-out accuracy may count windows the model has seen",
            path,
            bundle.name,
        )
    return dataset


def export_onnx(
    bundle_path: str | Path, out: str | Path, *, precision: str = "float32", data: str | Path | None = None
) -> EdgeModel:
    """Export the bundle at ``bundle_path`` to ``out`` (an ``.onnx`` file) and its sidecar; returns it loaded.

    ``precision="int8"`` needs ``data``, a dataset ``.npz`` with the bundle's modalities:
    its training windows calibrate the quantization, its held-out windows measure it.
    """
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if (precision == "int8") != (data is not None):
        raise ExportError("int8 needs a dataset (--data), whose training windows calibrate it; float32 needs none")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ExportError(f"{out}: the exported file's name must end in .onnx (its sidecar is the .json beside it)")
    bundle = load_bundle(bundle_path, compile=False)
    dataset = None if data is None else calibration_dataset(data, bundle)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the destination, so that the finished files are renamed into place.
    with tempfile.TemporaryDirectory(prefix=".dmft-export-", dir=out.parent) as scratch, _quiet_exporter_logs():
        float_path = Path(scratch) / "float32.onnx"
        write_graph(bundle, float_path)
        write_sidecar(float_path, bundle, precision="float32", metrics=bundle.metrics)
        exported = load_onnx(float_path)
        worst = parity(bundle, exported, synthetic_windows(bundle, PARITY_WINDOWS))
        log.info("the ONNX graph matches the bundle on every modality subset (max |difference| %.1e)", worst)
        finished = float_path
        if precision == "int8":
            finished = Path(scratch) / "int8.onnx"
            quantize_int8(float_path, finished, calibration_batches(exported, dataset))
            write_sidecar(finished, bundle, precision="int8", metrics={})
            metrics = held_out_metrics(load_onnx(finished), dataset)
            float_accuracy = held_out_metrics(exported, dataset)["accuracy"]
            write_sidecar(finished, bundle, precision="int8", metrics={**metrics, "float32_accuracy": float_accuracy})
            log.info(
                "int8: %d bytes, %.2fx smaller than float32 (%d bytes); held-out accuracy %.2f %% (float32 %.2f %%)",
                finished.stat().st_size,
                float_path.stat().st_size / finished.stat().st_size,
                float_path.stat().st_size,
                100 * metrics["accuracy"],
                100 * float_accuracy,
            )
        finished.replace(out)
        sidecar_path(finished).replace(sidecar_path(out))
    log.info("wrote %s (%d bytes) and %s", out, out.stat().st_size, sidecar_path(out).name)
    return load_onnx(out)

"""TorchScript against ONNX Runtime (float32 and int8) for each model, at batch 1 and batch 32, in one run.

Each bundle is exported as ``dmft export`` does (float32, and int8 calibrated on the
training windows of ``--data``); every backend is then timed through its ``predict``
(input checks included, as the service calls it) on held-out windows, all measurements
interleaved round by round so that drift of a noisy machine hits them alike. Prints one
Markdown table (file size, held-out accuracy, latency percentiles) and which backend is
faster for each model, and what int8 costs and saves against float32.

    python bench/backends.py --data build/watch.npz [--rounds 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.bundle import WEIGHTS_FILE, load_bundle
from model.data import load_npz, train_test_split
from model.edge import load_onnx
from model.evaluation import relabel
from model.export import export_onnx

WEIGHTS = Path(__file__).resolve().parent.parent / "model" / "weights"
BATCHES = (1, 32)
TORCHSCRIPT, ORT_FLOAT, ORT_INT8 = "TorchScript", "ONNX Runtime float32", "ONNX Runtime int8"

Predict = Callable[[Mapping[str, np.ndarray]], np.ndarray]


@dataclass
class Backend:
    model: str
    name: str
    predict: Predict
    file_bytes: int
    inputs: dict[int, dict[str, np.ndarray]]  # batch size -> held-out windows
    accuracy: float = 0.0
    timings: dict[int, list[float]] = field(default_factory=lambda: {batch: [] for batch in BATCHES})

    def p50(self, batch: int) -> float:
        return float(np.percentile(self.timings[batch], 50))


def held_out_accuracy(predict: Predict, windows: dict[str, np.ndarray], labels: np.ndarray) -> float:
    batches = [{n: a[start : start + 256] for n, a in windows.items()} for start in range(0, len(labels), 256)]
    predicted = np.concatenate([predict(batch).argmax(1) for batch in batches])
    return float(np.mean(predicted == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="dataset .npz: held-out windows, int8 calibration")
    parser.add_argument("--teacher", type=Path, default=WEIGHTS / "teacher")
    parser.add_argument("--student", type=Path, default=WEIGHTS / "student")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20, help="batch-1 calls per round (batch 32: a quarter)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of torch and ONNX Runtime")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    dataset = load_npz(args.data)
    test = dataset.subset(train_test_split(dataset).test)
    backends: list[Backend] = []
    with tempfile.TemporaryDirectory(prefix="dmft-backends-") as scratch:
        for name, path in (("teacher", args.teacher), ("student", args.student)):
            bundle = load_bundle(path)
            float_path, int8_path = Path(scratch) / f"{name}.onnx", Path(scratch) / f"{name}-int8.onnx"
            export_onnx(path, float_path)
            export_onnx(path, int8_path, precision="int8", data=args.data)
            windows = {spec.name: test.arrays[spec.name] for spec in bundle.modalities}
            inputs = {batch: {n: a[:batch] for n, a in windows.items()} for batch in BATCHES}
            float_model = load_onnx(float_path, threads=args.threads)
            int8_model = load_onnx(int8_path, threads=args.threads)
            added = [
                Backend(name, TORCHSCRIPT, bundle.predict, (path / WEIGHTS_FILE).stat().st_size, inputs),
                Backend(name, ORT_FLOAT, float_model.predict, float_path.stat().st_size, inputs),
                Backend(name, ORT_INT8, int8_model.predict, int8_path.stat().st_size, inputs),
            ]
            labels = relabel(test.y, test.class_names, bundle.class_names)
            for backend in added:
                backend.accuracy = held_out_accuracy(backend.predict, windows, labels)
            backends += added

    for backend in backends:
        for batch in BATCHES:
            for _ in range(5):
                backend.predict(backend.inputs[batch])
    for _ in range(args.rounds):
        for backend in backends:
            for batch in BATCHES:
                for _ in range(args.calls if batch == 1 else max(1, args.calls // 4)):
                    started = time.perf_counter()
                    backend.predict(backend.inputs[batch])
                    backend.timings[batch].append((time.perf_counter() - started) * 1e3)

    print(f"predict latency in ms, {args.threads} thread(s), held-out windows of {args.data}")
    print()
    header = " | ".join(f"batch {b} p50 | batch {b} p90" for b in BATCHES)
    print(f"| model | backend | file kB | held-out accuracy % | {header} |")
    print("|---|---|---:|---:|" + "---:|" * 2 * len(BATCHES))
    for backend in backends:
        percentiles = [np.percentile(backend.timings[b], q) for b in BATCHES for q in (50, 90)]
        cells = " | ".join(f"{value:.3f}" for value in percentiles)
        size = f"{backend.file_bytes / 1e3:,.0f}"
        print(f"| {backend.model} | {backend.name} | {size} | {100 * backend.accuracy:.2f} | {cells} |")
    print()
    for model in ("teacher", "student"):
        by_name = {b.name: b for b in backends if b.model == model}
        torchscript, onnx_float, onnx_int8 = by_name[TORCHSCRIPT], by_name[ORT_FLOAT], by_name[ORT_INT8]
        for batch in BATCHES:
            ratio = torchscript.p50(batch) / onnx_float.p50(batch)
            faster = ORT_FLOAT if ratio > 1 else TORCHSCRIPT
            print(f"{model}, batch {batch}: {faster} is faster (TorchScript p50 / ONNX Runtime p50 = {ratio:.2f})")
        print(
            f"{model}, int8 against float32: {onnx_float.file_bytes / onnx_int8.file_bytes:.2f}x smaller, "
            f"held-out accuracy {100 * (onnx_int8.accuracy - onnx_float.accuracy):+.2f} points, p50 int8/float32 "
            + ", ".join(f"batch {b} {onnx_int8.p50(b) / onnx_float.p50(b):.2f}" for b in BATCHES)
        )


if __name__ == "__main__":
    main()

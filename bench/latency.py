"""Batch-1 CPU latency and parameter counts of the teacher and student bundles, in one run.

Each model is timed through ``Bundle.predict`` (what the service calls) on the compiled
TorchScript path and on the eager path, the four measurements interleaved round by
round so that drift of a noisy machine hits all of them alike.

    python bench/latency.py [--teacher model/weights/teacher] [--student model/weights/student]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from model import Bundle, load_bundle

WEIGHTS = Path(__file__).resolve().parent.parent / "model" / "weights"


def one_window(bundle: Bundle, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        spec.name: rng.standard_normal((1, samples, spec.channels)).astype(np.float32)
        for spec, samples in zip(bundle.modalities, bundle.window_samples.values(), strict=True)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=WEIGHTS / "teacher")
    parser.add_argument("--student", type=Path, default=WEIGHTS / "student")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=50, help="predict calls per model per round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the service's setting)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    models = {}
    for name, path in (("teacher", args.teacher), ("student", args.student)):
        for compiled in (True, False):
            bundle = load_bundle(path, compile=compiled)
            models[(name, "compiled" if compiled else "eager")] = (bundle, one_window(bundle, rng))
    timings: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    for bundle, window in models.values():
        for _ in range(20):
            bundle.predict(window)
    for _ in range(args.rounds):
        for key, (bundle, window) in models.items():
            for _ in range(args.calls):
                started = time.perf_counter()
                bundle.predict(window)
                timings[key].append((time.perf_counter() - started) * 1e3)

    print(f"batch-1 predict latency, {args.threads} thread(s), {args.rounds * args.calls} calls per row (ms)")
    print("| model | path | params | p50 | p90 | p99 |")
    print("|---|---|---:|---:|---:|---:|")
    medians = {}
    for key, values in timings.items():
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        medians[key] = statistics.median(values)
        print(f"| {key[0]} | {key[1]} | {models[key][0].params:,} | {p50:.3f} | {p90:.3f} | {p99:.3f} |")
    teacher, student = models[("teacher", "compiled")][0], models[("student", "compiled")][0]
    print(f"student/teacher params: {student.params / teacher.params:.3f}")
    latency_ratio = medians[("student", "compiled")] / medians[("teacher", "compiled")]
    print(f"student/teacher p50 latency (compiled): {latency_ratio:.3f}")
    for name in ("teacher", "student"):
        print(f"{name} compiled/eager p50: {medians[(name, 'compiled')] / medians[(name, 'eager')]:.3f}")


if __name__ == "__main__":
    main()

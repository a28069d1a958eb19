"""Held-out accuracy over several seeds: DMFT teacher, distilled student, ablations and a 1D-CNN baseline.

Every model of one (variant, seed) job is trained on the same subject-held-out split
with the same augmentation, modality dropout, optimiser and epochs, so a margin
between them is the architecture's. Jobs run in parallel processes, one thread each.

    python bench/accuracy.py --data build/watch.npz --seeds 0 1 2 --jobs 2 [--out bench/results/accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import ConvBaseline  # noqa: E402

from model.config import TrainConfig  # noqa: E402
from model.data import load_npz, train_test_split  # noqa: E402
from model.pipeline import held_out_metrics, train_student, train_teacher  # noqa: E402
from model.train import TensorData, channel_statistics, cross_entropy_objective, fit, seed_everything  # noqa: E402

# Which ingredient each variant removes from the full recipe.
VARIANTS = {
    "full": {},
    "no_augment": {"augment": False},
    "no_modality_dropout": {"modality_dropout": 0.0},
}


def run_job(data_path: str, variant: str, seed: int, epochs: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    dataset = load_npz(data_path)
    split = train_test_split(dataset)
    device = torch.device("cpu")
    train_data = TensorData.from_dataset(dataset.subset(split.train), dataset.modalities, device)
    test_data = TensorData.from_dataset(dataset.subset(split.test), dataset.modalities, device)
    config = replace(TrainConfig(epochs=epochs), **VARIANTS[variant])

    def score(model: torch.nn.Module) -> dict[str, Any]:
        report = held_out_metrics(model, test_data, dataset, split)
        return {key: report[key] for key in ("accuracy", "macro_f1", "params", "missing_modality")}

    results: dict[str, Any] = {}
    teacher = train_teacher(dataset, train_data, config, seed=seed, device=device)
    results["teacher"] = score(teacher)
    results["student"] = score(train_student(dataset, train_data, config, seed=seed, device=device, teacher=teacher))
    if variant == "full":
        # Only the full recipe is compared with the alternatives: the student without a
        # teacher and the 1D-CNN baseline (same augmentation, dropout and epochs).
        plain = train_student(dataset, train_data, config, seed=seed, device=device, teacher=None)
        results["student_without_distillation"] = score(plain)
        seed_everything(seed)
        baseline = ConvBaseline(
            dataset.modalities, window_seconds=dataset.window_seconds, classes=len(dataset.class_names)
        )
        baseline.set_normalization(*channel_statistics(train_data))
        objective = cross_entropy_objective(baseline, config.label_smoothing)
        fit(baseline, train_data, objective=objective, specs=dataset.modalities, config=config, seed=seed, name="cnn")
        results["baseline_cnn"] = score(baseline.eval())
    print(f"{variant} seed {seed}: " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in results.items()), flush=True)
    return {
        "variant": variant,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "held_out_subjects": split.held_out_subjects,
        "models": results,
    }


def run_job_args(job: tuple[str, str, int, int]) -> dict[str, Any]:
    return run_job(*job)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for variant in VARIANTS:
        mine = [run for run in runs if run["variant"] == variant]
        if not mine:
            continue
        for model in mine[0]["models"]:
            results = [run["models"][model] for run in mine]

            def mean_sd(values: list[float]) -> tuple[float, float]:
                return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

            retained = [min(r["missing_modality"].values()) / r["accuracy"] for r in results]
            rows.append(
                {
                    "variant": variant,
                    "model": model,
                    "params": results[0]["params"],
                    "seeds": len(results),
                    "accuracy": mean_sd([r["accuracy"] for r in results]),
                    "macro_f1": mean_sd([r["macro_f1"] for r in results]),
                    "missing": {
                        name: mean_sd([r["missing_modality"][name] for r in results])
                        for name in results[0]["missing_modality"]
                    },
                    "worst_retention": min(retained),
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    names = list(rows[0]["missing"])
    print(
        "| variant | model | params | accuracy | macro-F1 | "
        + " | ".join(f"without {n}" for n in names)
        + " | worst kept |"
    )
    print("|---|---|---:|---:|---:|" + "---:|" * len(names) + "---:|")
    for row in rows:
        cells = [
            f"{m * 100:.2f} ± {s * 100:.2f}" for m, s in (row["accuracy"], row["macro_f1"], *row["missing"].values())
        ]
        print(
            f"| {row['variant']} | {row['model']} | {row['params']:,} | "
            + " | ".join(cells)
            + f" | {row['worst_retention'] * 100:.1f} % |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/accuracy.json"))
    parser.add_argument("--summarise", action="store_true", help="only print the table of the runs in --out")
    args = parser.parse_args()
    runs_file = args.out.with_suffix(".runs.jsonl")
    if not args.summarise:
        # The full recipe over every seed first, then each ablation seed by seed: a run cut
        # short still has the comparisons that matter most. Each run is saved as it ends.
        jobs = [(args.data, "full", seed, args.epochs) for seed in args.seeds if "full" in args.variants]
        jobs += [(args.data, v, seed, args.epochs) for seed in args.seeds for v in args.variants if v != "full"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        runs_file.write_text("")
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for run in pool.imap_unordered(run_job_args, jobs):
                with runs_file.open("a") as handle:
                    handle.write(json.dumps(run) + "\n")
    runs = [json.loads(line) for line in runs_file.read_text().splitlines()]
    rows = summarise(runs)
    args.out.write_text(json.dumps({"epochs": args.epochs, "runs": runs, "summary": rows}, indent=2) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()

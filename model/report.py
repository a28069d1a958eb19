"""The model card: a Markdown summary of a fit and a confusion-matrix picture per model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("teacher", "student")


def plot_confusion(confusion: list[list[int]], class_names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure, axes = plt.subplots(figsize=(6.5, 5.5), dpi=110)
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for (row, column), count in np.ndenumerate(counts):
        colour = "white" if rates[row, column] > 0.5 else "black"
        axes.text(column, row, str(count), ha="center", va="center", fontsize=8, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of true class")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_model_card(out_dir: Path, metrics: dict[str, Any]) -> Path:
    dataset, split = metrics["dataset"], metrics["split"]
    class_names = dataset["class_names"]
    modalities = ", ".join(f"{m['name']} ({m['channels']} ch, {m['sample_rate']:g} Hz)" for m in dataset["modalities"])
    lines = [
        "# DMFT model card",
        "",
        f"- Data: `{dataset['path']}`, {dataset['windows']} windows of {dataset['window_seconds']:g} s; "
        f"modalities {modalities}; fingerprint `{dataset['fingerprint'][:16]}`.",
        f"- Split: {split['kind']}, {split['train_windows']} training and {split['test_windows']} held-out windows"
        + (f"; held-out subjects {split['held_out_subjects']}." if split["held_out_subjects"] else "."),
        f"- Command: `{metrics['command']}` (seed {metrics['seed']}).",
        "",
        "## Held-out results",
        "",
        "| model | params | accuracy | macro-F1 | "
        + " | ".join(f"without {m['name']}" for m in dataset["modalities"])
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(dataset["modalities"]),
    ]
    for name in MODELS:
        result = metrics[name]
        missing = result.get("missing_modality", {})
        lines.append(
            f"| {name} | {result['params']:,} | {result['accuracy']:.4f} | {result['macro_f1']:.4f} | "
            + " | ".join(f"{missing[m['name']]:.4f}" if m["name"] in missing else "–" for m in dataset["modalities"])
            + " |"
        )
    lines += ["", "## Per-class F1", "", "| class | " + " | ".join(MODELS) + " |", "|---|" + "---:|" * len(MODELS)]
    for class_name in class_names:
        cells = [metrics[name]["per_class_f1"][class_name] for name in MODELS]
        lines.append(f"| {class_name} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |")
    lines += ["", "## Confusion matrices (rows: true class)", ""]
    for name in MODELS:
        picture = f"confusion_{name}.png"
        plot_confusion(metrics[name]["confusion"], class_names, f"{name}: held-out confusion", out_dir / picture)
        lines.append(f"![{name} confusion matrix]({picture})")
    lines += [
        "",
        "## Intended use and limits",
        "",
        "Recognises the listed activities from windows of the listed sensors worn as in the",
        "training data. Accuracy is measured on subjects never seen in training; other wearing",
        "positions, devices or activities outside the class list are out of scope.",
        "",
    ]
    path = out_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path

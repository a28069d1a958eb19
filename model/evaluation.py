"""Classification metrics on held-out windows, in plain numpy."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """``[true, predicted]`` counts."""
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def per_class_f1(confusion: np.ndarray) -> np.ndarray:
    true_positive = np.diag(confusion).astype(float)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    denominator = predicted + actual
    # A class absent from both labels and predictions has no F1; it is left out of the mean.
    return np.divide(2 * true_positive, denominator, out=np.full(len(confusion), np.nan), where=denominator > 0)


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    confusion = confusion_matrix(y_true, y_pred, len(class_names))
    f1 = per_class_f1(confusion)
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "macro_f1": float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
        "per_class_f1": {name: (None if np.isnan(v) else float(v)) for name, v in zip(class_names, f1, strict=True)},
        "confusion": confusion.tolist(),
    }


def relabel(y: np.ndarray, names: list[str], model_class_names: list[str]) -> np.ndarray:
    """Labels ``y`` (indices into a dataset's ``names``) as indices into the model's classes, matched by name."""
    index = {name: position for position, name in enumerate(model_class_names)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ValueError(f"the data has classes the model does not know: {unknown}")
    return np.array([index[names[label]] for label in y], dtype=np.int64)

"""End to end through the console commands, as a user runs them: data, fit, evaluate.

``dmft data watch`` builds the real smartwatch dataset shipped in seglearn; the fit runs
on every tenth window for two epochs so the whole module stays well under a minute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from model.data import load_npz, save_npz, train_test_split

pytestmark = pytest.mark.slow

WATCH_CLASSES = 7
ONE_MEGABYTE = 1024 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dmft(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the installed console script (or the module, where the script is not on disk)."""
    script = Path(sys.executable).with_name("dmft")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "model.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"dmft {' '.join(args)} failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result


@dataclass
class Run:
    watch: Path
    subset: Path
    out: Path
    fit_stdout: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("e2e")
    watch = root / "watch.npz"
    _dmft("data", "watch", "--out", str(watch))

    dataset = load_npz(watch)
    subset = root / "subset.npz"
    save_npz(subset, dataset.subset(np.arange(0, len(dataset), 10)))

    out = root / "OUT"
    fit = _dmft("fit", "--data", str(subset), "--out", str(out), "--epochs", "2", "--seed", "0", "--device", "cpu")
    return Run(watch=watch, subset=subset, out=out, fit_stdout=fit.stdout)


def test_data_watch_writes_accelerometer_and_gyroscope_windows(run: Run) -> None:
    with np.load(run.watch, allow_pickle=False) as archive:
        keys = set(archive.files)
        n = len(archive["y"])
        assert 4000 <= n <= 5000
        assert archive["X_accelerometer"].shape == (n, 100, 3)
        assert archive["X_gyroscope"].shape == (n, 100, 3)
        assert archive["subject"].shape == (n,)
        assert len(archive["class_names"]) == WATCH_CLASSES
        assert float(archive["sample_rate_accelerometer"]) == 50.0
        assert float(archive["sample_rate_gyroscope"]) == 50.0
    assert {"X_accelerometer", "X_gyroscope", "y", "class_names", "subject"} <= keys
    dataset = load_npz(run.watch)
    assert dataset.window_seconds == 2.0
    assert len(np.unique(dataset.subject)) >= 3


def test_subset_keeps_subjects_and_sample_rates(run: Run) -> None:
    subset = load_npz(run.subset)
    assert 400 <= len(subset) <= 500
    assert subset.subject is not None
    assert {spec.name: spec.sample_rate for spec in subset.modalities} == {"accelerometer": 50.0, "gyroscope": 50.0}


def test_fit_writes_bundles_metrics_and_model_card(run: Run) -> None:
    for name in ("teacher", "student"):
        assert (run.out / name / "bundle.json").is_file()
        assert (run.out / name / "weights.pt").is_file()
        assert (run.out / f"confusion_{name}.png").read_bytes().startswith(PNG_MAGIC)
    card = (run.out / "MODEL_CARD.md").read_text()
    assert card.startswith("# DMFT model card")
    assert "without accelerometer" in card and "without gyroscope" in card

    metrics = json.loads((run.out / "metrics.json").read_text())
    subset = load_npz(run.subset)
    split = train_test_split(subset)
    assert metrics["dataset"]["fingerprint"] == subset.fingerprint()
    assert metrics["command"].startswith("dmft fit --data")
    assert metrics["split"]["test_windows"] == len(split.test)
    for name in ("teacher", "student"):
        report = metrics[name]
        assert 0.0 <= report["accuracy"] <= 1.0
        assert 0.0 <= report["macro_f1"] <= 1.0
        assert report["params"] > 0
        confusion = np.asarray(report["confusion"])
        assert confusion.shape == (WATCH_CLASSES, WATCH_CLASSES)
        assert confusion.sum() == len(split.test)
        assert np.trace(confusion) / confusion.sum() == pytest.approx(report["accuracy"])
        assert set(report["per_class_f1"]) == set(subset.class_names)
        assert set(report["missing_modality"]) == {"accelerometer", "gyroscope"}
        assert report["held_out_subjects"] == split.held_out_subjects
        manifest = json.loads((run.out / name / "bundle.json").read_text())
        assert manifest["name"] == name
        assert manifest["params"] == report["params"]
        assert manifest["training"]["dataset_fingerprint"] == subset.fingerprint()

    summary = json.loads(run.fit_stdout.strip().splitlines()[-1])
    assert summary["student"]["params"] == metrics["student"]["params"]


def test_fit_student_is_smaller_than_teacher_and_under_one_megabyte(run: Run) -> None:
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert (run.out / "student" / "weights.pt").stat().st_size < ONE_MEGABYTE
    assert (run.out / "student" / "weights.pt").stat().st_size < (run.out / "teacher" / "weights.pt").stat().st_size


def test_evaluate_prints_one_json_line_for_held_out_windows(run: Run) -> None:
    result = _dmft("evaluate", "--bundle", str(run.out / "student"), "--data", str(run.subset))
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    metrics = json.loads((run.out / "metrics.json").read_text())
    assert report["n"] == metrics["split"]["test_windows"]
    assert 0.0 <= report["accuracy"] <= 1.0
    assert 0.0 <= report["macro_f1"] <= 1.0
    assert report["model"] == "student"
    assert report["modalities"] == ["accelerometer", "gyroscope"]
    # The served (compiled) bundle agrees with the evaluation written during the fit.
    assert report["accuracy"] == pytest.approx(metrics["student"]["accuracy"], abs=2 / report["n"])

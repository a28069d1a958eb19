"""The .npz dataset format: validation errors that name the key, CLI reporting, and splits."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import save_bundle
from model.cli import main
from model.data import DatasetError, load_npz, train_test_split
from model.dmft import DMFT

from .conftest import CLASS_NAMES, WINDOW_SECONDS, ConfigFactory, DatasetFactory, PayloadWriter

Payload = dict[str, np.ndarray]


def _drop(key: str) -> Callable[[Payload], None]:
    def corrupt(payload: Payload) -> None:
        del payload[key]

    return corrupt


def _truncate_gyroscope(payload: Payload) -> None:
    payload["X_gyroscope"] = payload["X_gyroscope"][:-1]


def _nan_in_accelerometer(payload: Payload) -> None:
    payload["X_accelerometer"][3, 7, 1] = np.nan


def _inf_in_gyroscope(payload: Payload) -> None:
    payload["X_gyroscope"][5, 0, 2] = -np.inf


def _unknown_split(payload: Payload) -> None:
    n = len(payload["y"])
    payload["split"] = np.array(["train"] * (n - 2) + ["validation", "test"])


def _flatten_accelerometer(payload: Payload) -> None:
    payload["X_accelerometer"] = payload["X_accelerometer"][:, :, 0]


def _no_modalities(payload: Payload) -> None:
    for key in [k for k in payload if k.startswith(("X_", "sample_rate_"))]:
        del payload[key]


def _no_sample_rates(payload: Payload) -> None:
    for key in [k for k in payload if k.startswith("sample_rate_")]:
        del payload[key]


def _label_out_of_range(payload: Payload) -> None:
    payload["y"] = payload["y"].copy()
    payload["y"][0] = 7


def _float_labels(payload: Payload) -> None:
    payload["y"] = payload["y"].astype(np.float32)


def _short_subject(payload: Payload) -> None:
    payload["subject"] = payload["subject"][:-3]


def _inconsistent_rates(payload: Payload) -> None:
    payload["sample_rate_gyroscope"] = np.float64(50.0)  # 25 samples at 50 Hz: 0.5 s, the others 1 s


def _negative_rate(payload: Payload) -> None:
    payload["sample_rate_barometer"] = np.float64(-12.0)


# (case id, corruption, text the message must contain)
MALFORMED = [
    ("missing-y", _drop("y"), "'y'"),
    ("missing-class-names", _drop("class_names"), "'class_names'"),
    ("mismatched-n", _truncate_gyroscope, "'X_gyroscope'"),
    ("nan", _nan_in_accelerometer, "'X_accelerometer' contains NaN"),
    ("inf", _inf_in_gyroscope, "'X_gyroscope' contains NaN or Inf"),
    ("unknown-split", _unknown_split, "'split' holds unknown values ['validation']"),
    ("rank-2", _flatten_accelerometer, "'X_accelerometer' must have shape [N, T, C]"),
    ("no-modalities", _no_modalities, "'X_accelerometer'"),
    ("no-sample-rates", _no_sample_rates, "'sample_rate_<modality>'"),
    ("label-out-of-range", _label_out_of_range, "'y' holds values outside 0..2"),
    ("float-labels", _float_labels, "'y' must be a 1-D integer array"),
    ("short-subject", _short_subject, "'subject'"),
    ("inconsistent-rates", _inconsistent_rates, "'sample_rate_gyroscope'"),
    ("negative-rate", _negative_rate, "'sample_rate_barometer'"),
]


@pytest.mark.parametrize(("corrupt", "expected"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_load_npz_malformed_file_raises_dataset_error_naming_key(
    corrupt: Callable[[Payload], None], expected: str, payload: Payload, write_npz: PayloadWriter
) -> None:
    corrupt(payload)
    path = write_npz(payload)
    with pytest.raises(DatasetError) as caught:
        load_npz(path)
    assert expected in str(caught.value)


def test_load_npz_mismatched_n_message_names_x_key_and_counts(payload: Payload, write_npz: PayloadWriter) -> None:
    _truncate_gyroscope(payload)
    with pytest.raises(DatasetError, match=r"'X_gyroscope' has 35 windows but 'y' has 36"):
        load_npz(write_npz(payload))


@pytest.mark.parametrize("window_seconds", [None, WINDOW_SECONDS])
def test_load_npz_zero_sample_rate_raises_dataset_error_naming_key(
    window_seconds: float | None, payload: Payload, write_npz: PayloadWriter
) -> None:
    payload["sample_rate_gyroscope"] = np.float64(0.0)
    with pytest.raises(DatasetError, match="'sample_rate_gyroscope'"):
        load_npz(write_npz(payload), window_seconds)


def test_load_npz_window_seconds_contradicting_sample_rates_raises_dataset_error(
    payload: Payload, write_npz: PayloadWriter
) -> None:
    # 50 accelerometer samples at 50 Hz are a 1 s window; a model built for 2 s windows
    # expects 100 and fails later inside the network with a shape error.
    with pytest.raises(DatasetError, match="'(sample_rate|X)_"):
        load_npz(write_npz(payload), window_seconds=2 * WINDOW_SECONDS)


def test_load_npz_missing_file_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_npz(tmp_path / "absent.npz")


def test_load_npz_not_an_npz_raises_dataset_error(tmp_path: Path) -> None:
    path = tmp_path / "text.npz"
    path.write_text("not a zip archive")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_npz(path)


def test_load_npz_without_sample_rates_uses_given_window_seconds(payload: Payload, write_npz: PayloadWriter) -> None:
    _no_sample_rates(payload)
    dataset = load_npz(write_npz(payload), window_seconds=WINDOW_SECONDS)
    assert dataset.window_seconds == WINDOW_SECONDS
    rates = {spec.name: spec.sample_rate for spec in dataset.modalities}
    assert rates == {"accelerometer": 50.0, "barometer": 12.0, "gyroscope": 25.0}


def test_load_npz_round_trips_save_npz(make_dataset: DatasetFactory, write_npz: PayloadWriter) -> None:
    original = make_dataset(split=np.array(["train", "test"] * 18))
    loaded = load_npz(write_npz(original))
    assert loaded.window_seconds == pytest.approx(WINDOW_SECONDS)
    assert {spec.name: (spec.channels, spec.sample_rate, spec.rotatable) for spec in loaded.modalities} == {
        "accelerometer": (3, 50.0, True),
        "gyroscope": (3, 25.0, True),
        "barometer": (1, 12.0, False),
    }
    for name, array in original.arrays.items():
        assert loaded.arrays[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.arrays[name], array)
    np.testing.assert_array_equal(loaded.y, original.y)
    np.testing.assert_array_equal(loaded.subject, original.subject)
    np.testing.assert_array_equal(loaded.split, original.split)
    assert loaded.class_names == original.class_names
    assert loaded.fingerprint() == original.fingerprint()


def test_fingerprint_changes_with_a_single_value(make_dataset: DatasetFactory) -> None:
    dataset = make_dataset()
    before = dataset.fingerprint()
    dataset.arrays["barometer"][0, 0, 0] += 1.0
    assert dataset.fingerprint() != before


@pytest.mark.parametrize(("corrupt", "expected"), [case[1:] for case in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_cli_fit_reports_malformed_file_as_one_line_exit_2(
    corrupt: Callable[[Payload], None],
    expected: str,
    payload: Payload,
    write_npz: PayloadWriter,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corrupt(payload)
    path = write_npz(payload)
    code = main(["fit", "--data", str(path), "--out", str(tmp_path / "out"), "--epochs", "1", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("dmft fit: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err
    assert not (tmp_path / "out").exists()


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize(("case", "key"), [("missing-y", "'y'"), ("nan", "'X_accelerometer'")])
def test_cli_fit_subprocess_reports_dataset_error_without_traceback(
    case: str, key: str, payload: Payload, write_npz: PayloadWriter, tmp_path: Path
) -> None:
    corrupt = next(c[1] for c in MALFORMED if c[0] == case)
    corrupt(payload)
    result = _run_cli("fit", "--data", str(write_npz(payload)), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_evaluate_subprocess_reports_dataset_error_without_traceback(
    make_config: ConfigFactory, payload: Payload, write_npz: PayloadWriter, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "bundle", DMFT(make_config()), name="tiny", training={}, metrics={})
    _unknown_split(payload)
    result = _run_cli("evaluate", "--bundle", str(bundle), "--data", str(write_npz(payload)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("dmft evaluate: error: ")
    assert "'split'" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_split_predefined_wins_over_subjects(make_dataset: DatasetFactory) -> None:
    split_column = np.array(["train", "train", "test"] * 12)
    dataset = make_dataset(subjects=6, split=split_column)
    split = train_test_split(dataset)
    assert split.kind == "predefined"
    np.testing.assert_array_equal(split.test, np.flatnonzero(split_column == "test"))
    np.testing.assert_array_equal(split.train, np.flatnonzero(split_column == "train"))
    assert split.held_out_subjects == sorted({int(s) for s in dataset.subject[split_column == "test"]})


def test_split_with_ten_subjects_holds_out_whole_subjects(make_dataset: DatasetFactory) -> None:
    dataset = make_dataset(per_class=20, subjects=10)
    split = train_test_split(dataset)
    assert split.kind == "subject"
    train_subjects, test_subjects = set(dataset.subject[split.train]), set(dataset.subject[split.test])
    assert not train_subjects & test_subjects
    assert train_subjects | test_subjects == set(range(10))
    assert len(test_subjects) == 3  # 30 % of 10 subjects
    assert split.held_out_subjects == sorted(int(s) for s in test_subjects)
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == list(range(len(dataset)))
    assert len(split.test) / len(dataset) == pytest.approx(0.3, abs=0.05)


def test_split_by_subject_is_deterministic_across_calls_and_loads(
    make_dataset: DatasetFactory, write_npz: PayloadWriter
) -> None:
    dataset = make_dataset(per_class=10, subjects=7)
    first, second = train_test_split(dataset), train_test_split(dataset)
    third = train_test_split(load_npz(write_npz(dataset)))
    for other in (second, third):
        np.testing.assert_array_equal(other.test, first.test)
        np.testing.assert_array_equal(other.train, first.train)
        assert other.held_out_subjects == first.held_out_subjects
    assert len(first.held_out_subjects) == 2  # round(0.3 * 7)


@pytest.mark.parametrize("subjects", [None, 2])
def test_split_without_enough_subjects_is_stratified_with_every_class_in_test(
    subjects: int | None, make_dataset: DatasetFactory
) -> None:
    dataset = make_dataset(per_class=10, classes=4, subjects=subjects)
    split = train_test_split(dataset)
    assert split.kind == "stratified"
    assert split.held_out_subjects == []
    assert not set(split.train) & set(split.test)
    assert len(split.train) + len(split.test) == len(dataset)
    for label in range(4):
        assert (dataset.y[split.test] == label).sum() == 3  # round(0.3 * 10) windows of each class
    np.testing.assert_array_equal(train_test_split(dataset).test, split.test)


def test_synthetic_dataset_has_expected_layout(make_dataset: DatasetFactory) -> None:
    dataset = make_dataset()
    assert len(dataset) == 36
    assert {name: array.shape for name, array in dataset.arrays.items()} == {
        "accelerometer": (36, 50, 3),
        "gyroscope": (36, 25, 3),
        "barometer": (36, 12, 1),
    }
    assert len(dataset.class_names) == len(CLASS_NAMES)
    assert np.bincount(dataset.y).tolist() == [12, 12, 12]

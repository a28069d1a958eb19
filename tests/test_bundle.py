"""Model bundles: save/load round trip, the compiled (TorchScript) path, input validation, threads."""

from __future__ import annotations

import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from model import Bundle, DMFTConfig, InputError, ModalitySpec, load_bundle
from model.bundle import save_bundle
from model.dmft import DMFT, count_parameters

from .conftest import MODALITIES, WINDOW_SECONDS

# ``load_bundle(compile=True)`` traces, freezes and optimises with TorchScript, which
# torch 2.13 marks deprecated; the project's pytest config turns warnings into errors.

MEANS = {"accelerometer": [0.1, -0.2, 0.98], "gyroscope": [0.0, 0.01, -0.01], "barometer": [1013.0]}
STDS = {"accelerometer": [0.5, 0.4, 0.3], "gyroscope": [1.5, 1.2, 0.9], "barometer": [2.0]}
TRAINING = {"seed": 0, "train_windows": 36, "command": "pytest"}
METRICS = {"accuracy": 0.5, "macro_f1": 0.25}


def _tiny_model() -> DMFT:
    config = DMFTConfig(
        modalities=list(MODALITIES),
        class_names=["rest", "walk", "wave"],
        window_seconds=WINDOW_SECONDS,
        segments=5,
        dim=16,
        heads=2,
        spatial_temporal_blocks=1,
        temporal_blocks=1,
        mlp_ratio=2.0,
        stem_channels=8,
    )
    torch.manual_seed(0)
    model = DMFT(config)
    model.set_normalization(
        [torch.tensor(MEANS[spec.name]) for spec in config.modalities],
        [torch.tensor(STDS[spec.name]) for spec in config.modalities],
    )
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[DMFT, Path]:
    """An in-memory model in eval mode and the bundle directory it was saved to."""
    model = _tiny_model()
    directory = save_bundle(
        tmp_path_factory.mktemp("bundle") / "tiny", model, name="tiny", training=TRAINING, metrics=METRICS
    )
    return model, directory


@pytest.fixture(scope="module")
def compiled(saved: tuple[DMFT, Path]) -> Bundle:
    return load_bundle(saved[1], compile=True)


@pytest.fixture(scope="module")
def eager(saved: tuple[DMFT, Path]) -> Bundle:
    return load_bundle(saved[1], compile=False)


def _windows(batch: int, seed: int, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Random raw windows around each modality's mean, keyed by modality name."""
    rng = np.random.default_rng(seed)
    return {
        spec.name: (
            np.asarray(MEANS[spec.name])
            + np.asarray(STDS[spec.name]) * rng.standard_normal((batch, spec.samples(WINDOW_SECONDS), spec.channels))
        ).astype(np.float32)
        for spec in MODALITIES
        if names is None or spec.name in names
    }


def _reference(model: DMFT, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """softmax(model(xs, present)) of the in-memory model, absent modalities zero-filled."""
    batch = len(next(iter(inputs.values())))
    xs, present = [], torch.zeros(batch, len(MODALITIES), dtype=torch.bool)
    for index, spec in enumerate(MODALITIES):
        if spec.name in inputs:
            xs.append(torch.from_numpy(inputs[spec.name]))
            present[:, index] = True
        else:
            xs.append(torch.zeros(batch, spec.samples(WINDOW_SECONDS), spec.channels))
    with torch.no_grad():
        return torch.softmax(model.eval()(xs, present), dim=1).numpy()


@pytest.mark.parametrize("compile", [True, False], ids=["compiled", "eager"])
def test_load_bundle_round_trip_matches_in_memory_model(
    compile: bool, saved: tuple[DMFT, Path], compiled: Bundle, eager: Bundle
) -> None:
    model, _ = saved
    bundle = compiled if compile else eager
    inputs = _windows(5, seed=1)
    probabilities = bundle.predict(inputs)
    assert probabilities.shape == (5, 3)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, _reference(model, inputs), rtol=0, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-5)


def test_load_bundle_restores_config_weights_and_normalization(saved: tuple[DMFT, Path], eager: Bundle) -> None:
    model, _ = saved
    assert eager.config == model.config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(eager.network.state_dict()[key], value, rtol=0, atol=0)
    for spec, tokenizer in zip(eager.modalities, eager.network.tokenizers, strict=True):
        torch.testing.assert_close(tokenizer.normalizer.mean, torch.tensor(MEANS[spec.name]))
        torch.testing.assert_close(tokenizer.normalizer.std, torch.tensor(STDS[spec.name]))


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_compiled_predict_handles_batch_sizes_other_than_traced(
    batch: int, saved: tuple[DMFT, Path], compiled: Bundle
) -> None:
    inputs = _windows(batch, seed=batch)
    probabilities = compiled.predict(inputs)
    assert probabilities.shape == (batch, 3)
    np.testing.assert_allclose(probabilities, _reference(saved[0], inputs), rtol=0, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-5)


SUBSETS = [list(s) for r in range(1, len(MODALITIES) + 1) for s in itertools.combinations(MODALITIES, r)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(spec.name for spec in s) for s in SUBSETS])
def test_compiled_predict_accepts_any_nonempty_modality_subset(
    subset: list[ModalitySpec], saved: tuple[DMFT, Path], compiled: Bundle
) -> None:
    names = [spec.name for spec in subset]
    inputs = _windows(3, seed=7, names=names)
    assert sorted(inputs) == sorted(names)
    probabilities = compiled.predict(inputs)
    np.testing.assert_allclose(probabilities, _reference(saved[0], inputs), rtol=0, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=0, atol=1e-5)
    assert np.isfinite(probabilities).all()


def test_predict_missing_modality_differs_from_all_present(compiled: Bundle) -> None:
    inputs = _windows(4, seed=3)
    without_gyroscope = {k: v for k, v in inputs.items() if k != "gyroscope"}
    assert not np.allclose(compiled.predict(inputs), compiled.predict(without_gyroscope), atol=1e-6)


def test_predict_accepts_reversed_array_views(compiled: Bundle) -> None:
    inputs = _windows(3, seed=5)
    reversed_views = {name: array[::-1] for name, array in inputs.items()}  # valid windows, negative strides
    copies = {name: view.copy() for name, view in reversed_views.items()}
    np.testing.assert_allclose(compiled.predict(reversed_views), compiled.predict(copies), rtol=0, atol=1e-6)


def test_predict_empty_batch_returns_no_rows(compiled: Bundle) -> None:
    probabilities = compiled.predict(_windows(0, seed=0))
    assert probabilities.shape == (0, 3)


def _bad_inputs() -> list[tuple[str, dict[str, np.ndarray], str]]:
    good = _windows(2, seed=0)
    nan = {name: array.copy() for name, array in good.items()}
    nan["gyroscope"][1, 4, 0] = np.nan
    inf = {"barometer": good["barometer"].copy()}
    inf["barometer"][0, 0, 0] = np.inf
    return [
        ("unknown-modality", {**good, "magnetometer": good["accelerometer"]}, "unknown modality 'magnetometer'"),
        ("empty", {}, "no modalities given; expected any of accelerometer, gyroscope, barometer"),
        ("channels", {"accelerometer": good["accelerometer"][:, :, :2]}, "accelerometer: expected 3 channels, got 2"),
        (
            "samples",
            {"gyroscope": good["gyroscope"][:, :20]},
            "gyroscope: a window has 25 samples (1 s at 25 Hz), got 20",
        ),
        ("rank", {"barometer": good["barometer"][:, :, 0]}, "barometer: expected shape (batch, 12, 1), got (2, 12)"),
        ("nan", nan, "gyroscope: contains NaN or Inf"),
        ("inf", inf, "barometer: contains NaN or Inf"),
        (
            "batch",
            {"accelerometer": good["accelerometer"], "gyroscope": _windows(3, seed=1)["gyroscope"]},
            "gyroscope: batch of 3 windows, other modalities have 2",
        ),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize(("inputs", "message"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_predict_invalid_input_raises_input_error(
    inputs: dict[str, np.ndarray], message: str, compiled: Bundle
) -> None:
    with pytest.raises(InputError) as caught:
        compiled.predict(inputs)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_predict_concurrent_threads_match_sequential_calls(compiled: Bundle) -> None:
    requests = [_windows(batch, seed=seed) for seed, batch in enumerate([1, 2, 3, 5, 1, 4, 2, 6, 3, 1, 7, 2])]
    requests[4] = {k: v for k, v in requests[4].items() if k != "accelerometer"}
    requests[9] = {"barometer": requests[9]["barometer"]}
    sequential = [compiled.predict(request) for request in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(3):
            concurrent = list(pool.map(compiled.predict, requests))
            for got, expected in zip(concurrent, sequential, strict=True):
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_save_bundle_writes_manifest_with_metadata(saved: tuple[DMFT, Path]) -> None:
    model, directory = saved
    manifest = json.loads((directory / "bundle.json").read_text())
    assert {"name", "version", "params", "config", "normalization", "training", "metrics"} <= set(manifest)
    assert manifest["name"] == "tiny"
    assert manifest["version"] == hashlib.sha256((directory / "weights.pt").read_bytes()).hexdigest()[:12]
    assert manifest["params"] == count_parameters(model)
    assert DMFTConfig.from_dict(manifest["config"]) == model.config
    assert set(manifest["normalization"]) == {spec.name for spec in MODALITIES}
    for name, stats in manifest["normalization"].items():
        assert stats["mean"] == pytest.approx(MEANS[name])
        assert stats["std"] == pytest.approx(STDS[name])
    assert manifest["training"] == TRAINING
    assert manifest["metrics"] == METRICS


def test_bundle_exposes_manifest_properties(compiled: Bundle) -> None:
    assert compiled.name == "tiny"
    assert compiled.metrics == METRICS
    assert compiled.class_names == ["rest", "walk", "wave"]
    assert compiled.window_samples == {"accelerometer": 50, "gyroscope": 25, "barometer": 12}
    assert len(compiled.version) == 12


def test_load_bundle_without_weights_raises_file_not_found(tmp_path: Path, saved: tuple[DMFT, Path]) -> None:
    (tmp_path / "bundle.json").write_text((saved[1] / "bundle.json").read_text())
    with pytest.raises(FileNotFoundError, match="is not a model bundle"):
        load_bundle(tmp_path)


def test_load_bundle_other_format_version_raises_value_error(tmp_path: Path, saved: tuple[DMFT, Path]) -> None:
    manifest = json.loads((saved[1] / "bundle.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    (tmp_path / "weights.pt").write_bytes((saved[1] / "weights.pt").read_bytes())
    with pytest.raises(ValueError, match="bundle format 99"):
        load_bundle(tmp_path)

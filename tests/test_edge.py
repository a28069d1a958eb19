"""The torch-free edge runtime: same contract and input checks as a bundle, its files, and an install without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from model.edge import SIDECAR_VERSION, load_onnx, sidecar_path
from model.inputs import InputError
from tools.sources import copy_project
from tools.traffic import WatchData

from .export_fixtures import Export, tiny_windows

INSTALL_TIMEOUT_S = 300


def _bad_inputs() -> list[tuple[str, dict[str, np.ndarray]]]:
    good = tiny_windows(2, seed=0)
    nan = {name: array.copy() for name, array in good.items()}
    nan["gyroscope"][1, 4, 0] = np.nan
    inf = {"barometer": good["barometer"].copy()}
    inf["barometer"][0, 0, 0] = np.inf
    return [
        ("unknown-modality", {**good, "magnetometer": good["accelerometer"]}),
        ("empty", {}),
        ("channels", {"accelerometer": good["accelerometer"][:, :, :2]}),
        ("samples", {"gyroscope": good["gyroscope"][:, :20]}),
        ("rank", {"barometer": good["barometer"][:, :, 0]}),
        ("nan", nan),
        ("inf", inf),
        ("batch", {"accelerometer": good["accelerometer"], "gyroscope": tiny_windows(3, seed=1)["gyroscope"]}),
    ]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("inputs", [case[1] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_edge_refuses_bad_input_with_the_bundle_s_words(tiny_export: Export, inputs: dict[str, np.ndarray]) -> None:
    with pytest.raises(InputError) as from_bundle:
        tiny_export.bundle.predict(inputs)
    with pytest.raises(InputError) as from_edge:
        tiny_export.model.predict(inputs)
    assert str(from_edge.value) == str(from_bundle.value)


def test_edge_predict_empty_batch_returns_no_rows(tiny_export: Export) -> None:
    assert tiny_export.model.predict(tiny_windows(0, seed=0)).shape == (0, 3)


def test_edge_predict_accepts_lists_and_float64_like_the_bundle(tiny_export: Export) -> None:
    windows = tiny_windows(2, seed=4)
    as_lists = {name: array.astype(np.float64).tolist() for name, array in windows.items()}
    np.testing.assert_allclose(tiny_export.model.predict(as_lists), tiny_export.model.predict(windows), atol=1e-7)


def test_edge_predict_concurrent_threads_match_sequential_calls(tiny_export: Export) -> None:
    requests = [tiny_windows(batch, seed=seed) for seed, batch in enumerate([1, 2, 3, 5, 1, 4, 2, 6])]
    requests[4] = {name: array for name, array in requests[4].items() if name != "accelerometer"}
    sequential = [tiny_export.model.predict(request) for request in requests]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(tiny_export.model.predict, requests))
    for expected, got in zip(sequential, concurrent, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_load_onnx_without_sidecar_raises_file_not_found(tiny_export: Export, tmp_path: Path) -> None:
    alone = tmp_path / "alone.onnx"
    shutil.copy(tiny_export.path, alone)
    with pytest.raises(FileNotFoundError, match="alone.json"):
        load_onnx(alone)


def test_load_onnx_refuses_a_sidecar_of_another_file(tiny_export: Export, tmp_path: Path) -> None:
    other = tmp_path / "other.onnx"
    other.write_bytes(tiny_export.path.read_bytes() + b"\0")
    shutil.copy(sidecar_path(tiny_export.path), sidecar_path(other))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_onnx(other)


def test_load_onnx_refuses_another_sidecar_format_version(tiny_export: Export, tmp_path: Path) -> None:
    newer = tmp_path / "newer.onnx"
    shutil.copy(tiny_export.path, newer)
    manifest = json.loads(sidecar_path(tiny_export.path).read_text())
    sidecar_path(newer).write_text(json.dumps({**manifest, "format_version": SIDECAR_VERSION + 1}))
    with pytest.raises(ValueError, match=f"version {SIDECAR_VERSION + 1}, this code reads"):
        load_onnx(newer)


# Runs in a fresh virtual environment with only `dmft-activity[edge]` installed.
EDGE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from model.edge import load_onnx

    model = load_onnx(sys.argv[1])
    with np.load(sys.argv[2]) as windows:
        probabilities = model.predict({name: windows[name] for name in windows.files})
    np.save(sys.argv[3], probabilities)
    heavy = sorted({name.split(".")[0] for name in sys.modules} & {"torch", "fastapi", "app"})
    print(json.dumps({"name": model.name, "version": model.version, "imported": heavy}))
    """
)


def test_edge_install_has_no_torch_and_answers_like_the_bundle(
    shipped_exports: dict[str, Export], watch_data: WatchData, tmp_path: Path
) -> None:
    source = copy_project(tmp_path / "source", weights=False)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--quiet", f"{source}[edge]"], check=True, timeout=INSTALL_TIMEOUT_S)
    listed = subprocess.run([*pip, "list", "--format", "json"], check=True, capture_output=True, text=True)
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"dmft-activity", "numpy", "onnxruntime"} <= installed
    assert not {name for name in installed if name.startswith(("torch", "nvidia"))}

    exported = shipped_exports["student"]
    windows = {name: array[watch_data.test[:64]] for name, array in watch_data.dataset.arrays.items()}
    np.savez(tmp_path / "windows.npz", **windows)
    (tmp_path / "predict.py").write_text(EDGE_SCRIPT)
    run = subprocess.run(
        [python, "predict.py", str(exported.path), "windows.npz", "probabilities.npy"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(run.stdout)
    assert report == {"name": "student", "version": exported.bundle.version, "imported": []}
    got, expected = np.load(tmp_path / "probabilities.npy"), exported.bundle.predict(windows)
    assert np.abs(got - expected).max() <= 1e-4
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))

    # Commands that need torch say which extra brings it.
    dmft = str(venv / "bin" / "dmft")
    needs = {("serve", "--port", "1"): "torch", ("export", "--bundle", "b", "--out", "x.onnx"): "export"}
    for command, extra in needs.items():
        refused = subprocess.run([dmft, *command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"dmft {command[0]}: error: No module named ")
        assert refused.stderr.endswith(f"; pip install 'dmft-activity[{extra}]'\n")

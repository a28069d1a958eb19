"""ONNX export: parity with ``Bundle.predict`` on every modality subset, the graph's contract, int8, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from model.data import save_npz
from model.edge import file_digest, load_onnx, sidecar_path
from model.export import ExportError, _Calibrated, export_onnx, modality_subsets
from tools.traffic import WatchData

from .conftest import MODALITIES, PayloadWriter
from .export_fixtures import TEMPERATURE, WEIGHTS, Export, dmft, save_tiny_bundle, tiny_dataset, tiny_windows

NAMES = [spec.name for spec in MODALITIES]
TOLERANCE = 1e-4


def assert_same_answers(expected: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOLERANCE
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("subset", list(modality_subsets(NAMES)), ids="+".join)
def test_export_matches_bundle_predict_on_every_modality_subset(
    tiny_export: Export, subset: tuple[str, ...], batch: int
) -> None:
    windows = tiny_windows(batch, seed=batch)
    inputs = {name: windows[name] for name in subset}
    assert_same_answers(tiny_export.bundle.predict(inputs), tiny_export.model.predict(inputs))


@pytest.mark.parametrize("name", ["teacher", "student"])
def test_shipped_exports_match_bundle_on_held_out_watch_windows(
    shipped_exports: dict[str, Export], watch_data: WatchData, name: str
) -> None:
    exported = shipped_exports[name]
    held_out = {key: array[watch_data.test] for key, array in watch_data.dataset.arrays.items()}
    for subset in modality_subsets(list(held_out)):
        inputs = {key: held_out[key] for key in subset}
        assert_same_answers(exported.bundle.predict(inputs), exported.model.predict(inputs))


def test_export_graph_reads_each_modality_and_the_mask_with_a_dynamic_batch(tiny_export: Export) -> None:
    session = ort.InferenceSession(str(tiny_export.path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == [*NAMES, "present"]
    for spec in MODALITIES:
        batch, samples, channels = inputs[spec.name].shape
        assert isinstance(batch, str)
        assert (samples, channels, inputs[spec.name].type) == (spec.samples(1.0), spec.channels, "tensor(float)")
    assert isinstance(inputs["present"].shape[0], str)
    assert (inputs["present"].shape[1], inputs["present"].type) == (3, "tensor(bool)")
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits"]


def test_export_applies_the_bundle_temperature_inside_the_graph(tiny_export: Export) -> None:
    windows = tiny_windows(5, seed=3)
    arrays = tiny_export.model.check_inputs(windows)
    probabilities, logits = tiny_export.model.session.run(None, tiny_export.model.feeds(arrays, 5))
    with torch.no_grad():
        xs = [torch.from_numpy(windows[name]) for name in NAMES]
        expected_logits = tiny_export.bundle.network(xs, torch.ones(5, 3, dtype=torch.bool)).numpy()
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(probabilities, torch.softmax(torch.from_numpy(logits) / TEMPERATURE, 1), atol=1e-6)
    assert np.abs(probabilities - torch.softmax(torch.from_numpy(logits), 1).numpy()).max() > 1e-3
    assert tiny_export.model.temperature == TEMPERATURE == tiny_export.bundle.temperature


def test_export_sidecar_describes_the_bundle_and_the_file(tiny_export: Export) -> None:
    sidecar = json.loads(sidecar_path(tiny_export.path).read_text())
    bundle = tiny_export.bundle
    assert sidecar["onnx_sha256"] == file_digest(tiny_export.path)
    assert sidecar["precision"] == "float32"
    assert sidecar["version"] == sidecar["bundle_version"] == bundle.version
    assert sidecar["class_names"] == bundle.class_names
    assert sidecar["window_seconds"] == bundle.window_seconds
    assert sidecar["modalities"] == [
        {"name": s.name, "channels": s.channels, "sample_rate": s.sample_rate, "rotatable": s.rotatable}
        for s in bundle.modalities
    ]
    assert sidecar["inputs"] == [*NAMES, "present"]
    assert sidecar["outputs"] == ["probabilities", "logits"]
    model = tiny_export.model
    assert (model.name, model.params, model.metrics) == (bundle.name, bundle.params, bundle.metrics)
    assert model.window_samples == bundle.window_samples
    assert model.modalities == bundle.modalities


def test_export_file_carries_no_stack_traces_of_the_exporting_machine(tiny_export: Export) -> None:
    content = tiny_export.path.read_bytes()
    assert b"stack_trace" not in content
    assert str(Path(__file__).resolve().parent.parent).encode() not in content


def test_export_differing_from_the_bundle_is_refused_and_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle_dir = save_tiny_bundle(tmp_path / "bundle")
    original = _Calibrated.forward

    def shifted(self: _Calibrated, xs: list[torch.Tensor], present: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probabilities, logits = original(self, xs, present)
        return probabilities.roll(1, dims=1), logits

    monkeypatch.setattr(_Calibrated, "forward", shifted)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="differs from the bundle with accelerometer"):
        export_onnx(bundle_dir, out / "tiny.onnx")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("out", "precision", "with_data", "message"),
    [
        ("tiny.pb", "float32", False, "must end in .onnx"),
        ("tiny.onnx", "float16", False, "choose one of float32, int8"),
        ("tiny.onnx", "int8", False, "int8 needs a dataset"),
        ("tiny.onnx", "float32", True, "float32 needs none"),
    ],
    ids=["suffix", "precision", "int8-without-data", "float-with-data"],
)
def test_export_refuses_requests_it_cannot_honour(
    tmp_path: Path, write_npz: PayloadWriter, out: str, precision: str, with_data: bool, message: str
) -> None:
    data = write_npz(tiny_dataset()) if with_data else None
    with pytest.raises(ExportError, match=message):
        export_onnx(save_tiny_bundle(tmp_path / "bundle"), tmp_path / out, precision=precision, data=data)
    assert not (tmp_path / out).exists()


def test_int8_export_refuses_data_without_every_modality(tmp_path: Path, write_npz: PayloadWriter) -> None:
    dataset = tiny_dataset()
    del dataset.arrays["barometer"]
    dataset.modalities = [spec for spec in dataset.modalities if spec.name != "barometer"]
    with pytest.raises(ExportError, match="has no barometer windows"):
        export_onnx(
            save_tiny_bundle(tmp_path / "bundle"), tmp_path / "x.onnx", precision="int8", data=write_npz(dataset)
        )


def test_cli_export_prints_a_summary_of_what_it_wrote(shipped_exports: dict[str, Export]) -> None:
    for name, exported in shipped_exports.items():
        assert exported.summary == {
            "name": name,
            "version": exported.bundle.version,
            "precision": "float32",
            "onnx_sha256": file_digest(exported.path),
            "out": str(exported.path),
            "bytes": exported.path.stat().st_size,
            "accuracy": exported.bundle.metrics["accuracy"],
        }


def test_cli_export_int8_student_is_calibrated_smaller_and_close_to_float32(
    shipped_exports: dict[str, Export], watch_data: WatchData, tmp_path: Path
) -> None:
    data, out = tmp_path / "watch.npz", tmp_path / "student-int8.onnx"
    save_npz(data, watch_data.dataset)
    status, stdout = dmft(
        "export", "--bundle", str(WEIGHTS / "student"), "--out", str(out), "--quantize", "int8", "--data", str(data)
    )
    assert status == 0
    model = load_onnx(out)
    assert json.loads(stdout)["version"] == model.version == f"{shipped_exports['student'].bundle.version}-int8"
    assert model.precision == "int8"
    graph = onnx.load(out).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    metrics = model.metrics
    assert metrics["n"] == len(watch_data.test) and metrics["held_out_subjects"] == watch_data.held_out_subjects
    assert set(metrics["missing_modality"]) == {"accelerometer", "gyroscope"}
    # Fixed activation ranges: a window's answer does not depend on the windows batched with it.
    windows = {name: array[watch_data.test[:8]] for name, array in watch_data.dataset.arrays.items()}
    alone = model.predict({name: array[:1] for name, array in windows.items()})
    np.testing.assert_allclose(alone, model.predict(windows)[:1], rtol=0, atol=1e-6)
    # Guards against a broken calibration (loosely) and weights left in float; bench/backends.py measures the goals.
    assert metrics["accuracy"] >= metrics["float32_accuracy"] - 0.02
    assert out.stat().st_size < shipped_exports["student"].path.stat().st_size / 2


def test_cli_export_int8_without_data_exits_2_with_a_message(tmp_path: Path) -> None:
    bundle_dir = save_tiny_bundle(tmp_path / "bundle")
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        status, _ = dmft("export", "--bundle", str(bundle_dir), "--out", str(tmp_path / "x.onnx"), "--quantize", "int8")
    assert status == 2
    assert "dmft export: error: int8 needs a dataset (--data)" in stderr.getvalue()

"""Static int8 quantization of an exported graph with ONNX Runtime, calibrated on given inputs.

Weights of the matrix multiplications and convolutions become int8 per output channel;
their input activations become uint8 with ranges observed (min/max) while the float
graph runs on the calibration batches. Layer norms, softmax and the attention masks stay
float. The format is QDQ (quantize/dequantize pairs around each quantized op), which
ONNX Runtime fuses into integer kernels on CPU and any other runtime can still read.

Static rather than dynamic quantization: dynamic quantization takes each call's activation
ranges from the whole input tensor, so a window's answer would change with the other windows
batched with it; calibrated ranges are fixed, learnt from training windows in every modality
subset, the inputs the model meets.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from onnxruntime import quantization

Feeds = dict[str, np.ndarray]


class _Batches(quantization.CalibrationDataReader):
    def __init__(self, batches: Iterable[Feeds]) -> None:
        self._batches: Iterator[Feeds] = iter(batches)

    def get_next(self) -> Feeds | None:
        return next(self._batches, None)


def quantize_int8(float_path: Path, out_path: Path, calibration: Iterable[Feeds]) -> None:
    """Write the int8 version of the float graph at ``float_path`` to ``out_path``."""
    with tempfile.TemporaryDirectory(prefix="dmft-quantize-") as scratch:
        # Shape inference and graph fusions first, as ONNX Runtime's quantizer expects:
        # it can then see which MatMul belongs to which layer.
        prepared = Path(scratch) / "prepared.onnx"
        quantization.quant_pre_process(float_path, prepared)
        quantization.quantize_static(
            prepared,
            out_path,
            _Batches(calibration),
            quant_format=quantization.QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
            calibrate_method=quantization.CalibrationMethod.MinMax,
        )

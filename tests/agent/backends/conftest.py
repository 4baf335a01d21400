"""Fixtures for the backend suites: installed backends, synthetic graphs, a real INT8 model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends import Backend, get_backend
from agent.samples import DigitsData


def _installed() -> list[Any]:
    params = []
    for name in ("onnxruntime", "openvino"):
        marks = [pytest.mark.openvino] if name == "openvino" else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


INSTALLED = _installed()


@pytest.fixture(params=INSTALLED)
def backend(request: pytest.FixtureRequest) -> Backend:
    found = get_backend(request.param)
    probe = found.probe()
    if not probe.usable:
        pytest.fail(f"{request.param} is expected to be installed here: {probe.reason}")
    return found


def text_image(height: int, width: int, seed: int = 0) -> np.ndarray[Any, Any]:
    """A light page with dark stroke clusters, normalized like PP-OCR's input (NCHW, [-1, 1])."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 235, np.float32)
    for _ in range(max(2, height * width // 8000)):
        y = int(rng.integers(0, max(1, height - 20)))
        x = int(rng.integers(0, max(1, width // 3)))
        stroke_h = int(rng.integers(8, 18))
        for k in range(int(rng.integers(4, 12))):
            img[y : y + stroke_h, x + k * 10 : x + k * 10 + 6] = float(rng.integers(0, 60))
    img = (img / 255.0 - 0.5) / 0.5
    out: np.ndarray[Any, Any] = img.transpose(2, 0, 1)[None].astype(np.float32)
    return out


def make_model(path: Path, *, opset: int = 13, dynamic: bool = True) -> Path:
    """y = relu(x) + b over x: [batch, len] float32 (dynamic axes), plus a second output z = x*2."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    dims: list[Any] = ["batch", "len"] if dynamic else [2, 3]
    bias = numpy_helper.from_array(np.array(0.5, np.float32), "b")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Add", ["r", "b"], ["y"]),
            helper.make_node("Mul", ["x", "two"], ["z"]),
        ],
        "synthetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, dims),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, dims),
        ],
        [bias, two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def digits_int8(
    digits_path: Path, digits: DigitsData, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The digits CNN quantized by ONNX Runtime (static, QDQ, per-channel), calibrated on train.
    On an x86 CPU without integer dot products (AVX2 only), with ``reduce_range``, as the
    control plane's build does there: ONNX Runtime's u8 x s8 kernels saturate in int16."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from control_plane.builds._onnx import host_int8_saturates

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = iter({"input": digits.x_train[i : i + 32]} for i in range(0, 320, 32))

        def get_next(self) -> dict[str, Any] | None:
            return next(self._batches, None)

    out = tmp_path_factory.mktemp("int8") / "digits-int8.onnx"
    quantize_static(
        str(digits_path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=host_int8_saturates(),
    )
    return out

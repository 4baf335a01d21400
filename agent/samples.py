"""Real sample models for the demo, the benchmarks and the tests.

- The PP-OCR text detector shipped inside the ``rapidocr-onnxruntime`` wheel (opset 12 CNN).
- A small CNN trained here with NumPy on scikit-learn's digits (8x8 grey images, 10 classes) and
  written with ``onnx.helper``: it has labels, so accuracy gates can be measured.

Both are written to a cache directory and reused. Needs the ``dev`` extra (rapidocr, sklearn,
onnx); each function raises ``ModelError`` saying what is missing.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ModelError

__all__ = [
    "DigitsData",
    "digits_cnn",
    "digits_data",
    "ppocr_detector",
    "sample_cache_dir",
    "text_page",
]

DIGITS_VERSION = 2  # bump when the architecture or training changes


def sample_cache_dir() -> Path:
    root = os.environ.get("EDGEFLEET_CACHE") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    path = base / "edgefleet-samples"
    path.mkdir(parents=True, exist_ok=True)
    return path


def ppocr_detector(cache_dir: Path | None = None) -> Path:
    """The PP-OCR text detector ONNX file (input ``x``: Nx3xHxW float32, dynamic H/W)."""
    try:
        import rapidocr_onnxruntime
    except ImportError as exc:
        raise ModelError(
            "rapidocr-onnxruntime is not installed (dev extra)", model="ppocr-det"
        ) from exc
    models = Path(rapidocr_onnxruntime.__file__).parent / "models"
    found = sorted(models.glob("*det*.onnx"))
    if not found:
        raise ModelError(f"no detector ONNX file in {models}", model="ppocr-det")
    dest = (cache_dir or sample_cache_dir()) / "ppocr-det.onnx"
    if not dest.exists() or dest.stat().st_size != found[0].stat().st_size:
        tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")  # test workers copy at once
        shutil.copyfile(found[0], tmp)
        tmp.replace(dest)
    return dest


def text_page(batch: int, seed: int, size: int = 640) -> np.ndarray[Any, Any]:
    """Normalised NCHW pages of dark word-like strokes on white: the detector fires on them
    (random noise gives an all-zero map, which would prove nothing)."""
    rng = np.random.default_rng(seed)
    img = np.ones((batch, size, size, 3), np.float32)
    for b in range(batch):
        for row in range(40, size - 40, 48):
            x = int(rng.integers(10, 40))
            while x < size - 80:
                width = int(rng.integers(20, 90))
                for col in range(x, x + width, 9):
                    img[b, row : row + 22, col : col + 5, :] = 0.0
                x += width + int(rng.integers(15, 30))
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return np.ascontiguousarray(((img - mean) / std).transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class DigitsData:
    """Digits as NCHW float32 in [0, 1], split 70/30 with a fixed seed."""

    x_train: np.ndarray[Any, Any]
    y_train: np.ndarray[Any, Any]
    x_test: np.ndarray[Any, Any]
    y_test: np.ndarray[Any, Any]


def digits_data() -> DigitsData:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ModelError("scikit-learn is not installed (dev extra)", model="digits") from exc
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    cut = int(len(x) * 0.7)
    return DigitsData(x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]])


def _im2col(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Nx C x8x8 -> (N*64) x (C*9), 3x3 kernel, padding 1."""
    n, c, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.empty((n, c, 3, 3, h, w), dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            cols[:, :, i, j] = p[:, :, i : i + h, j : j + w]
    out: np.ndarray[Any, Any] = cols.transpose(0, 4, 5, 1, 2, 3).reshape(n * h * w, c * 9)
    return out


def _train_digits(
    data: DigitsData, *, channels: int = 16, epochs: int = 30, seed: int = 0
) -> dict[str, np.ndarray[Any, Any]]:
    """conv3x3(1->C, pad 1) -> ReLU -> maxpool 2x2 -> flatten -> dense(C*16 -> 10); SGD."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, np.sqrt(2 / 9), (channels, 9)).astype(np.float32)
    b1 = np.zeros(channels, np.float32)
    w2 = rng.normal(0, np.sqrt(2 / (channels * 16)), (channels * 16, 10)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    x, y = data.x_train, data.y_train
    lr, batch = 0.1, 32
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            ib = order[start : start + batch]
            xb, yb, n = x[ib], y[ib], len(ib)
            cols = _im2col(xb)  # (n*64, 9)
            z = cols @ w1.T + b1  # (n*64, C)
            a = np.maximum(z, 0).reshape(n, 8, 8, channels)
            pooled4 = a.reshape(n, 4, 2, 4, 2, channels)
            pooled = pooled4.max(axis=(2, 4))  # (n,4,4,C)
            flat = pooled.transpose(0, 3, 1, 2).reshape(n, -1)  # NCHW flatten order
            logits = flat @ w2 + b2
            logits -= logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            prob[np.arange(n), yb] -= 1
            g_logits = prob / n
            g_w2 = flat.T @ g_logits
            g_b2 = g_logits.sum(axis=0)
            g_flat = (g_logits @ w2.T).reshape(n, channels, 4, 4).transpose(0, 2, 3, 1)
            mask = pooled4 == pooled[:, :, None, :, None, :]
            g_a = (mask * g_flat[:, :, None, :, None, :]).reshape(n * 64, channels)
            g_z = g_a * (z > 0)
            g_w1 = g_z.T @ cols
            g_b1 = g_z.sum(axis=0)
            w1 -= lr * g_w1
            b1 -= lr * g_b1
            w2 -= lr * g_w2
            b2 -= lr * g_b2
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


def _digits_onnx(params: dict[str, np.ndarray[Any, Any]], channels: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    w = params["w1"].reshape(channels, 1, 3, 3)
    inits = [
        numpy_helper.from_array(w, "conv_w"),
        numpy_helper.from_array(params["b1"], "conv_b"),
        numpy_helper.from_array(params["w2"], "fc_w"),
        numpy_helper.from_array(params["b2"], "fc_b"),
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]
        ),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p", "flat_shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet-samples"
    )
    model.ir_version = 8
    return model


def digits_cnn(cache_dir: Path | None = None) -> Path:
    """The trained digits CNN ONNX file (input ``input``: Nx1x8x8 float32 -> ``logits``)."""
    dest = (cache_dir or sample_cache_dir()) / f"digits-cnn-v{DIGITS_VERSION}.onnx"
    if dest.exists():
        return dest
    try:
        import onnx
    except ImportError as exc:
        raise ModelError("onnx is not installed", model="digits") from exc
    channels = 16
    params = _train_digits(digits_data(), channels=channels)
    model = _digits_onnx(params, channels)
    onnx.checker.check_model(model)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dest)
    return dest

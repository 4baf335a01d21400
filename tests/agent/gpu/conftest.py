"""Fixtures for the NVIDIA path: the PP-OCR detector from a carried file on the GPU machine
(which has no rapidocr), FP16 variants made with ONNX Runtime's converter, NVML."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.gpu_metrics import NvmlReader


@pytest.fixture(scope="session")
def ppocr_model(request: pytest.FixtureRequest) -> Path:
    """``EDGEFLEET_PPOCR_ONNX`` when set (the GPU machine), else the rapidocr wheel's file."""
    carried = os.environ.get("EDGEFLEET_PPOCR_ONNX")
    if carried:
        return Path(carried)
    path: Path = request.getfixturevalue("ppocr_path")
    return path


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


def map_disagreement(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> tuple[float, float]:
    """(share of pixels on opposite sides of the detector's 0.3 threshold, mean |difference|)
    between two probability maps: what decides the boxes, not the steep sigmoid's edge pixels."""
    assert got.shape == want.shape
    flipped = float(((got > 0.3) != (want > 0.3)).mean())
    return flipped, float(np.abs(got - want).mean())


def fp16_variant(src: Path, dst: Path) -> Path:
    """An FP16 copy of ``src`` with FP32 inputs and outputs (``keep_io_types``).

    Constants become initializers first, so the converter can leave the ones outside FP16's
    range in FP32 together with the nodes that read them: PP-OCR's head BatchNormalization has
    a running variance near 1e8, which FP16 would saturate into a blank probability map."""
    if dst.exists():
        return dst
    import onnx
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    nodes = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    big = {
        i.name
        for i in model.graph.initializer
        if np.abs(numpy_helper.to_array(i)).max(initial=0) > 65504.0
    }
    keep = [n.name for n in model.graph.node if big & set(n.input)]
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    tmp = dst.with_suffix(".tmp")
    onnx.save(converted, str(tmp))
    tmp.replace(dst)
    return dst


@pytest.fixture(scope="session")
def nvml() -> Iterator[NvmlReader]:
    with NvmlReader() as reader:
        yield reader

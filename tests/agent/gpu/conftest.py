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


def map_disagreement(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> tuple[float, float]:
    """(share of pixels on opposite sides of the detector's 0.3 threshold, mean |difference|)
    between two probability maps: what decides the boxes, not the steep sigmoid's edge pixels."""
    assert got.shape == want.shape
    flipped = float(((got > 0.3) != (want > 0.3)).mean())
    return flipped, float(np.abs(got - want).mean())


def fp16_variant(src: Path, dst: Path) -> Path:
    """The control plane's FP16 variant of ``src`` (FP32 inputs and outputs)."""
    if not dst.exists():
        from control_plane.builds._onnx import convert_fp16

        tmp = dst.with_suffix(".tmp")
        convert_fp16(src, tmp)
        tmp.replace(dst)
    return dst


@pytest.fixture(scope="session")
def nvml() -> Iterator[NvmlReader]:
    with NvmlReader() as reader:
        yield reader

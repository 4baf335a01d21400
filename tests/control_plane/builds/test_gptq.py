"""GPTQ's 4-bit blocks, run by ONNX Runtime's ``MatMulNBits`` (the operator a device runs)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from control_plane.builds import _gptq
from control_plane.builds._int4 import _nbits


def _matmul_model(weight: np.ndarray[Any, Any]) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out: np.ndarray[Any, Any] = session.run(None, {"x": x})[0]
    return out


def _correlated(rows: int, k: int, seed: int) -> np.ndarray[Any, Any]:
    """Inputs whose features move together, as a layer's activations do."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)).astype(np.float32) * (rng.random(k) ** 3)[:, None]
    out: np.ndarray[Any, Any] = (rng.standard_normal((rows, k)) @ mix).astype(np.float32)
    return out


@settings(max_examples=12, deadline=None)
@given(k=st.integers(2, 100), n=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_matmulnbits_computes_with_the_blocks_as_written(k: int, n: int, seed: int) -> None:
    """Any shape (a reduction that is no multiple of the block, an odd number of blocks): the
    operator computes exactly with the dequantized weight, and every value is on its block's
    grid (16 levels, 0 among them)."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = _correlated(20, k, seed)
    blocks = _gptq.quantize_gptq(weight, x.T.astype(np.float64) @ x, block_size=32)
    model = _gptq.apply_blocks(_matmul_model(weight), {"mm": blocks}, accuracy_level=0)
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]
    assert [i.name for i in model.graph.initializer] == ["mm_Q4", "mm_scales", "mm_zero_points"]
    dequantized = blocks.dequantized()
    assert dequantized.shape == (k, n)
    np.testing.assert_allclose(_run(model, x), x @ dequantized, rtol=1e-5, atol=1e-4)
    for start in range(0, k, 32):
        for column in range(n):
            values = np.unique(dequantized[start : start + 32, column])
            assert len(values) <= 16


def test_without_statistics_the_blocks_are_onnx_runtimes_round_to_nearest() -> None:
    """The same grid as ONNX Runtime's own quantizer, byte for byte."""
    weight = np.random.default_rng(3).standard_normal((96, 24)).astype(np.float32)
    ours = _gptq.quantize_gptq(weight, None, block_size=32)
    theirs = {
        i.name: numpy_helper.to_array(i)
        for i in _nbits(_matmul_model(weight), 4, ops=("MatMul",)).graph.initializer
    }
    np.testing.assert_array_equal(ours.packed, theirs["w_Q4"])
    np.testing.assert_array_equal(ours.zero_points, theirs["w_zero_points"])
    np.testing.assert_allclose(ours.scales, theirs["w_scales"], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_answers_for_the_activations_better_than_rounding(seed: int) -> None:
    """On inputs like the calibration set's, GPTQ's output error is well under round-to-nearest's
    (the point of it), on held-out inputs of the same kind too."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((128, 48)).astype(np.float32)
    calibration, held_out = _correlated(256, 128, seed), _correlated(64, 128, seed)[::-1]
    hessian = calibration.T.astype(np.float64) @ calibration
    exact = held_out @ weight
    errors = {}
    for name, stats in (("gptq", hessian), ("rtn", None)):
        blocks = _gptq.quantize_gptq(weight, stats, block_size=32)
        model = _gptq.apply_blocks(_matmul_model(weight), {"mm": blocks}, accuracy_level=0)
        errors[name] = np.linalg.norm(_run(model, held_out) - exact) / np.linalg.norm(exact)
    assert errors["gptq"] < 0.7 * errors["rtn"], errors

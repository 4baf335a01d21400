"""The NVIDIA code paths where no GPU or TensorRT is present: clear reasons, no half-loaded
state, and the device-binding session driven on the CPU provider (same code, device "cpu")."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent import cuda
from agent.backends import Artifact, LoadOptions, load_first
from agent.backends.onnxruntime import (
    MAX_BOUND_SHAPES,
    OnnxRuntimeBackend,
    OrtBoundSession,
    _wants_cuda_graph,
    _without_cuda_graph,
)
from agent.backends.tensorrt import DEFAULT_MAX_BATCH, TensorRTBackend, _profile_shapes, build_plan
from agent.errors import BackendUnavailableError, InferenceError, InputError, ModelLoadError
from agent.samples import DigitsData

try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except ImportError:
    HAS_TRT = False

no_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")


@no_trt
def test_tensorrt_probe_says_why(digits_path: Path, tmp_path: Path) -> None:
    probe = TensorRTBackend().probe()
    assert not probe.usable
    assert probe.reason
    assert "tensorrt Python bindings not installed" in probe.reason
    with pytest.raises(BackendUnavailableError, match="tensorrt unavailable"):
        TensorRTBackend().load(
            Artifact(digits_path, name="digits"), LoadOptions(cache_dir=tmp_path)
        )
    with pytest.raises(BackendUnavailableError):
        build_plan(digits_path, precision="fp16")
    assert list(tmp_path.iterdir()) == []  # nothing half-written in the cache


@no_trt
def test_registry_skips_tensorrt_and_runs_onnxruntime(
    digits_path: Path, digits: DigitsData
) -> None:
    session = load_first(
        Artifact(digits_path, name="digits"), LoadOptions(), order=["tensorrt", "onnxruntime"]
    )
    assert session.backend == "onnxruntime"
    assert session.run({"input": digits.x_test[:4]})["logits"].shape == (4, 10)


def test_missing_cuda_device_is_unavailable_with_reason() -> None:
    # No driver here; on the GPU machine there is no device 99: both say why.
    with pytest.raises(BackendUnavailableError, match=r"cuda unavailable: (no |the )"):
        cuda.require_device(99)


def test_tensorrt_profile_shapes() -> None:
    assert _profile_shapes("x", (1, 3, 8, 8), {}) is None
    assert _profile_shapes("x", (-1, 3, 8, 8), {}) == (
        (1, 3, 8, 8),
        (1, 3, 8, 8),
        (DEFAULT_MAX_BATCH, 3, 8, 8),
    )
    fixed = (2, 3, 640, 640)
    assert _profile_shapes("x", (-1, 3, -1, -1), {"x": fixed}) == (fixed, fixed, fixed)
    with pytest.raises(ModelLoadError, match="dynamic dimensions besides the batch"):
        _profile_shapes("x", (-1, 3, -1, -1), {})
    with pytest.raises(ModelLoadError, match="does not fit"):
        _profile_shapes("x", (-1, 3, 8, 8), {"x": (1, 4, 8, 8)})


def test_cuda_graph_request_helpers() -> None:
    providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1", "device_id": "0"}), "CPU"]
    assert _wants_cuda_graph(providers)
    stripped = _without_cuda_graph(providers)
    assert stripped == [("CUDAExecutionProvider", {"device_id": "0"}), "CPU"]
    assert not _wants_cuda_graph(stripped)
    assert not _wants_cuda_graph([("CUDAExecutionProvider", {"enable_cuda_graph": "0"})])
    trt_first: list[Any] = [("TensorrtExecutionProvider", {}), ("CUDAExecutionProvider", {})]
    assert not _wants_cuda_graph(trt_first)


def _cpu_bound(path: Path, name: str) -> OrtBoundSession:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return OrtBoundSession(sess, name=name, precision="fp32", device="cpu")


def test_bound_session_matches_plain_run_across_shapes(
    digits_path: Path, digits: DigitsData
) -> None:
    # Both on the CPU: where a GPU is, the plain session would take CUDA (TF32 convolutions
    # differ from the CPU's by 1e-3, which says nothing of the binding).
    on_cpu = LoadOptions(
        ort_disable_providers=("CUDAExecutionProvider", "TensorrtExecutionProvider")
    )
    plain = OnnxRuntimeBackend().load(Artifact(digits_path, name="digits"), on_cpu)
    bound = _cpu_bound(digits_path, "digits")
    try:
        # Each batch size is its own binding; fresh data must flow through the bound buffers.
        for batch in (1, 7, 1, 32, 7, 1):
            x = digits.x_test[batch : 2 * batch]
            got = bound.run({"input": x})["logits"]
            np.testing.assert_allclose(got, plain.run({"input": x})["logits"], rtol=1e-5, atol=1e-5)
        assert len(bound._bindings) == 3
    finally:
        bound.close()
        plain.close()


def test_bound_session_keeps_a_bounded_number_of_shapes(digits_path: Path) -> None:
    bound = _cpu_bound(digits_path, "digits")
    for batch in range(1, MAX_BOUND_SHAPES + 5):
        bound.run({"input": np.zeros((batch, 1, 8, 8), np.float32)})
    assert len(bound._bindings) == MAX_BOUND_SHAPES
    bound.close()


def test_bound_session_bad_feeds_are_input_errors_and_lose_nothing(
    digits_path: Path, digits: DigitsData
) -> None:
    bound = _cpu_bound(digits_path, "digits")
    x = digits.x_test[:2]
    before = bound.run({"input": x})["logits"]
    with pytest.raises(InputError, match=r"digits: input 'input': shape 2x1x9x9"):
        bound.run({"input": np.zeros((2, 1, 9, 9), np.float32)})
    with pytest.raises(InputError, match="dtype float64"):
        bound.run({"input": np.zeros((2, 1, 8, 8), np.float64)})
    with pytest.raises(InputError, match="missing input 'input'"):
        bound.run({})
    with pytest.raises(InputError, match=r"unknown input\(s\) \['extra'\]"):
        bound.run({"input": x, "extra": x})
    with pytest.raises(InputError, match="is not an array"):
        bound.run({"input": [[1.0]]})  # type: ignore[dict-item]
    np.testing.assert_array_equal(bound.run({"input": x})["logits"], before)
    bound.close()
    with pytest.raises(InferenceError, match="digits: session is closed"):
        bound.run({"input": x})


def test_pinned_input_shapes(ppocr_model: Path) -> None:
    backend = OnnxRuntimeBackend()
    artifact = Artifact(ppocr_model, name="ppocr")
    session = backend.load(artifact, LoadOptions(input_shapes={"x": (1, 3, 64, 96)}))
    assert session.inputs[0].shape == (1, 3, 64, 96)
    out = session.run({"x": np.zeros((1, 3, 64, 96), np.float32)})
    assert next(iter(out.values())).shape == (1, 1, 64, 96)
    with pytest.raises(InputError, match=r"ppocr: input 'x': shape 1x3x64x64 where 1x3x64x96"):
        session.run({"x": np.zeros((1, 3, 64, 64), np.float32)})
    session.close()


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"y": (1, 3, 64, 64)}, r"unknown input\(s\) \['y'\]"),
        ({"x": (1, 3, 64)}, "has rank 3"),
        ({"x": (1, 4, 64, 64)}, "does not fit"),
    ],
)
def test_bad_input_shapes_are_load_errors(
    ppocr_model: Path, shapes: dict[str, tuple[int, ...]], message: str
) -> None:
    artifact = Artifact(ppocr_model, name="ppocr")
    with pytest.raises(ModelLoadError, match=f"ppocr: .*{message}"):
        OnnxRuntimeBackend().load(artifact, LoadOptions(input_shapes=shapes))


def test_capture_gate_runs_a_capture_alone() -> None:
    gate = cuda.CaptureGate()
    events: list[str] = []
    in_shared = threading.Event()
    release_shared = threading.Event()

    def shared_user() -> None:
        with gate.shared():
            events.append("shared-in")
            in_shared.set()
            release_shared.wait(5)
            events.append("shared-out")

    def capturer() -> None:
        with gate.exclusive():
            events.append("capture")

    t1 = threading.Thread(target=shared_user)
    t1.start()
    assert in_shared.wait(5)
    t2 = threading.Thread(target=capturer)
    t2.start()
    t2.join(0.2)
    assert t2.is_alive()  # the capture waits for the shared user to finish
    release_shared.set()
    t1.join(5)
    t2.join(5)
    assert events == ["shared-in", "shared-out", "capture"]
    with gate.shared(), gate.shared():  # shared users do not exclude each other
        pass

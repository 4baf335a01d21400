"""The NVIDIA path on a real GPU (``pytest -m gpu`` on the GPU machine; docs/gpu.md).

CUDA plumbing round trips, TensorRT-style execution (tensors bound by device address, staged
through pinned buffers) with ONNX Runtime's CUDA provider standing in for ``execute_async_v3``,
the ONNX Runtime CUDA session with I/O binding and CUDA graphs against the CPU provider, FP16
variants within tolerance, and device memory returned after repeated load/close.
"""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent import cuda
from agent.backends import Artifact, LoadOptions
from agent.backends.onnxruntime import OnnxRuntimeBackend, OrtBoundSession
from agent.backends.ort_worker import OrtWorkerSession
from agent.contracts.manifest import Precision
from agent.errors import BackendError, InferenceError
from agent.gpu_metrics import NvmlReader
from agent.samples import DigitsData, text_page

from .conftest import fp16_variant, map_disagreement

pytestmark = pytest.mark.gpu

CPU_ONLY = LoadOptions(ort_disable_providers=("CUDAExecutionProvider", "TensorrtExecutionProvider"))
HERE = LoadOptions(ort_process="never")  # the session in this process, to look inside it
SWAPS = 200 if os.environ.get("EDGEFLEET_SOAK") == "1" else 50


def assert_close(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any], rel: float) -> None:
    """Within ``rel`` of the reference's largest magnitude. The CUDA provider runs FP32
    convolutions and matrix products in TF32 by default (10-bit mantissa): about 1e-3."""
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= rel * float(np.abs(want).max()), (err, float(np.abs(want).max()))


def _load(
    path: Path, name: str, options: LoadOptions | None = None, precision: Precision = "fp32"
) -> Any:
    artifact = Artifact(path, name=name, precision=precision)
    return OnnxRuntimeBackend().load(artifact, options or HERE)


def test_device_and_pinned_round_trip() -> None:
    info = cuda.device_info()
    assert info.compute_capability.count(".") == 1
    assert info.total_memory_bytes > 1 << 30
    data = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    with (
        cuda.Stream() as stream,
        cuda.DeviceBuffer(data.nbytes) as dev,
        cuda.HostBuffer(data.nbytes) as pinned,
    ):
        dev.upload(data)  # synchronous, pageable
        back = np.empty_like(data)
        dev.download(back)
        np.testing.assert_array_equal(back, data)
        staged = pinned.array(np.float32, data.shape)
        staged[:] = 0
        start, end = cuda.Event(), cuda.Event()
        start.record(stream)
        dev.download(pinned, stream)  # asynchronous into pinned memory
        end.record(stream)
        stream.synchronize()
        np.testing.assert_array_equal(staged, data)
        assert end.elapsed_ms(start) >= 0.0
        dev.fill(0, stream)
        stream.synchronize()
        dev.download(back)
        assert not back.any()
        start.close()
        end.close()
    assert dev.closed
    assert pinned.closed
    with pytest.raises(BackendError, match="closed"):
        dev.download(back)


def test_pool_reuses_buffers_and_frees_on_close() -> None:
    free_before, _ = cuda.memory_info()
    pool = cuda.BufferPool.device()
    a = pool.acquire(3000)
    assert a.nbytes == 4096
    pool.release(a)
    b = pool.acquire(4000)
    assert b is a  # same size class: reused, not reallocated
    big = pool.acquire(64 << 20)
    pool.release(b)
    pool.release(big)
    assert pool.idle_bytes == (64 << 20) + 4096
    pool.close()
    assert a.closed
    assert big.closed
    free_after, _ = cuda.memory_info()
    assert free_after >= free_before - (2 << 20)  # everything went back to the driver


def test_tensorrt_style_execution_through_io_buffers(digits_path: Path, digits: DigitsData) -> None:
    """The TensorRT session's data path: upload through pinned staging on our stream, run on
    the tensors' device addresses, download through pinned buffers; here the CUDA provider
    executes (no TensorRT on this machine)."""
    sess = ort.InferenceSession(str(digits_path), providers=["CUDAExecutionProvider"])
    ref = ort.InferenceSession(str(digits_path), providers=["CPUExecutionProvider"])
    with cuda.Stream() as stream:
        buffers = cuda.IoBuffers(stream)
        for batch in (1, 16, 5):
            x = np.ascontiguousarray(digits.x_test[:batch])
            addresses = buffers.upload({"input": x})
            out_shape = (batch, 10)
            out_addr = buffers.address("logits", batch * 10 * 4)
            stream.synchronize()  # the provider runs on its own stream
            io = sess.io_binding()
            io.bind_input("input", "cuda", 0, np.float32, list(x.shape), addresses["input"])
            io.bind_output("logits", "cuda", 0, np.float32, list(out_shape), out_addr)
            sess.run_with_iobinding(io)
            got = buffers.download({"logits": (np.float32, out_shape)})["logits"]
            want = ref.run(None, {"input": x})[0]
            assert_close(got, want, 5e-3)
        assert buffers.device_bytes > 0
        buffers.close()


def test_cuda_session_uses_binding_and_graphs(digits_path: Path, digits: DigitsData) -> None:
    gpu = _load(digits_path, "digits")
    cpu = _load(digits_path, "digits", CPU_ONLY)
    assert isinstance(gpu, OrtBoundSession)
    assert gpu.device == "CUDAExecutionProvider"
    assert gpu.cuda_graph
    try:
        # Replayed graphs must see each new frame: feed different data every call.
        for i, batch in enumerate((1, 1, 1, 1, 8, 8, 8, 1, 8)):
            x = digits.x_test[i * 8 : i * 8 + batch]
            got = gpu.run({"input": x})["logits"]
            want = cpu.run({"input": x})["logits"]
            assert_close(got, want, 5e-3)
    finally:
        gpu.close()
        cpu.close()


@pytest.mark.parametrize("batch", [1, 2])
def test_ppocr_on_cuda_graph_matches_cpu(ppocr_model: Path, batch: int) -> None:
    shape = (batch, 3, 640, 640)
    options = LoadOptions(input_shapes={"x": shape}, ort_process="never")
    gpu = _load(ppocr_model, "ppocr", options)
    cpu = _load(ppocr_model, "ppocr", CPU_ONLY)
    assert isinstance(gpu, OrtBoundSession)
    assert gpu.cuda_graph  # pinned shapes make the detector capturable
    try:
        for seed in range(4):
            x = text_page(batch, seed)
            got = next(iter(gpu.run({"x": x}).values()))
            want = next(iter(cpu.run({"x": x}).values()))
            assert float((want > 0.3).mean()) > 0.05  # the page has text the detector sees
            flipped, mean_err = map_disagreement(got, want)
            assert flipped <= 1e-3
            assert mean_err <= 2e-3
    finally:
        gpu.close()
        cpu.close()


def test_fp16_variants_within_tolerance(
    tmp_path: Path, digits_path: Path, ppocr_model: Path, digits: DigitsData
) -> None:
    d16 = fp16_variant(digits_path, tmp_path / "digits-fp16.onnx")
    p16 = fp16_variant(ppocr_model, tmp_path / "ppocr-fp16.onnx")
    digits32 = _load(digits_path, "digits", CPU_ONLY)
    digits16 = _load(d16, "digits", precision="fp16")
    assert isinstance(digits16, OrtBoundSession)
    assert digits16.precision == "fp16"
    assert digits16.inputs[0].datatype == "FP32"  # keep_io_types: callers feed FP32
    x = digits.x_test
    want = digits32.run({"input": x})["logits"]
    got = digits16.run({"input": x})["logits"]
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.99

    shape = (1, 3, 640, 640)
    ppocr32 = _load(ppocr_model, "ppocr", CPU_ONLY)
    ppocr16 = _load(
        p16, "ppocr", LoadOptions(input_shapes={"x": shape}, ort_process="never"), precision="fp16"
    )
    img = text_page(1, seed=3)
    want_map = next(iter(ppocr32.run({"x": img}).values()))
    got_map = next(iter(ppocr16.run({"x": img}).values()))
    assert float((want_map > 0.3).mean()) > 0.05
    flipped, mean_err = map_disagreement(got_map, want_map)
    assert flipped <= 1e-3
    assert mean_err <= 5e-3
    for s in (digits32, digits16, ppocr32, ppocr16):
        s.close()


@pytest.mark.parametrize("where", ["never", "gpu"])
def test_gpu_memory_returned_after_swaps(
    ppocr_model: Path, digits_path: Path, nvml: NvmlReader, where: Any
) -> None:
    """In this process, and in worker processes (the default): a closed worker's memory is
    back once it has exited."""
    shape = (1, 3, 640, 640)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    d = np.zeros((4, 1, 8, 8), np.float32)
    options = LoadOptions(ort_process=where)

    def swap() -> None:
        det = _load(ppocr_model, "ppocr", LoadOptions(input_shapes={"x": shape}, ort_process=where))
        cls = _load(digits_path, "digits", options)
        det.run({"x": x})
        cls.run({"input": d})
        det.close()
        cls.close()
        for session in (det, cls):
            if isinstance(session, OrtWorkerSession):
                assert session.wait_released(10)
        gc.collect()

    swap()
    after_first = nvml.memory_used_bytes()
    for _ in range((SWAPS if where == "never" else SWAPS // 5) - 1):  # a worker starts in ~1 s
        swap()
    after_all = nvml.memory_used_bytes()
    assert after_all <= after_first * 1.05 + (16 << 20), (after_first, after_all)


@pytest.mark.parametrize("where", ["never", "gpu"])
def test_swap_while_serving_never_fails_a_call(
    digits_path: Path, digits: DigitsData, where: Any
) -> None:
    """A loop thread serves one session while new ones are loaded, warmed (captured) and the old
    ones closed: graph captures must not be broken by the other thread's CUDA calls (in this
    process), nor a worker's runs by another worker's start and teardown."""
    x = digits.x_test[:4]
    options = LoadOptions(ort_process=where)
    want = _load(digits_path, "digits", CPU_ONLY).run({"input": x})["logits"]
    holder = {"session": _load(digits_path, "digits", options)}
    failures: list[BaseException] = []
    served = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                got = holder["session"].run({"input": x})["logits"]
                assert_close(got, want, 5e-3)
                served[0] += 1
            except InferenceError as exc:
                if "session is closed" not in str(exc):  # lost the race to a swap: retry
                    failures.append(exc)
            except BaseException as exc:
                failures.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        for _ in range(10):
            new = _load(digits_path, "digits", options)
            for _ in range(4):
                new.run({"input": x})  # the warm runs capture the graph on this thread
            old, holder["session"] = holder["session"], new
            old.close()
    finally:
        stop.set()
        thread.join()
        holder["session"].close()
    assert not failures, failures[:3]
    assert served[0] > 10


def test_worker_process_session_on_cuda(digits_path: Path, digits: DigitsData) -> None:
    """The default on a GPU: the CUDA session lives in a worker process, captures its graphs
    there, and answers as the CPU provider does."""
    gpu = _load(digits_path, "digits", LoadOptions())
    cpu = _load(digits_path, "digits", CPU_ONLY)
    try:
        assert isinstance(gpu, OrtWorkerSession)
        assert gpu.pid != os.getpid()
        assert gpu.device == "CUDAExecutionProvider"
        assert gpu.cuda_graph
        for i, batch in enumerate((1, 1, 1, 1, 8, 8, 8, 1, 8)):
            x = digits.x_test[i * 8 : i * 8 + batch]
            assert_close(gpu.run({"input": x})["logits"], cpu.run({"input": x})["logits"], 5e-3)
    finally:
        gpu.close()
        cpu.close()
    assert gpu.wait_released(10)

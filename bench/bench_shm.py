"""What each transport adds over an in-process call for a 1x3x1080x1920 FP32 frame (~24 MB).

The model is a tiny ONNX graph that takes the whole frame and reduces a 64x64 window of it
(Slice + ReduceMean), so its own time is a few microseconds and what is measured is the
transport. It is served by a real ``ModelSlot`` through ``start_api``; the clients are the
unmodified tritonclient in another process (as a camera process would be), timed in interleaved
rounds:

- HTTP binary (``binary_data=True``) and gRPC (``raw_input_contents``);
- system shared memory over HTTP and gRPC, with the frame already in the region (a producer that
  writes its frames there), and over HTTP including the client's copy of the frame into it;
- CUDA shared memory over HTTP, when a CUDA device, cuda-python and
  ``tritonclient.utils.cuda_shared_memory`` are usable.

Added latency = client p50 - in-process p50 (``ModelSlot.infer`` in the server process).
Goal: shared memory adds at most 1/5 of what HTTP binary adds.

    .venv/bin/python bench/bench_shm.py
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (1, 3, 1080, 1920)
ROUNDS = 6
CALLS = 8
IN_PROCESS_CALLS = 60


def frame_model(path: Path) -> Path:
    from onnx import TensorProto, helper, save

    ints = TensorProto.INT64
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["window"]),
            helper.make_node("ReduceMean", ["window"], ["mean"], axes=[2, 3], keepdims=0),
        ],
        "frame_mean",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3])],
        initializer=[
            helper.make_tensor("starts", ints, [2], [0, 0]),
            helper.make_tensor("ends", ints, [2], [64, 64]),
            helper.make_tensor("axes", ints, [2], [2, 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))
    return path


def _frame() -> np.ndarray[Any, Any]:
    return np.random.default_rng(0).random(SHAPE, dtype=np.float32)


def _time(fn: Callable[[], Any], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _client(http_port: int, grpc_port: int, conn: Any) -> None:
    """The client process: every transport, interleaved in rounds; sends {variant: [s, ...]}."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources' deprecation warning
        import tritonclient.utils.shared_memory as shm

    x = _frame()
    want = x[:, :, :64, :64].mean(axis=(2, 3))
    http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=120)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    handles = []
    in_handle = shm.create_shared_memory_region("frame", "/edgefleet-bench-frame", x.nbytes)
    out_handle = shm.create_shared_memory_region("mean", "/edgefleet-bench-mean", 64)
    handles += [in_handle, out_handle]
    shm.set_shared_memory_region(in_handle, [x])
    http.register_system_shared_memory("frame", "/edgefleet-bench-frame", x.nbytes)
    http.register_system_shared_memory("mean", "/edgefleet-bench-mean", 64)

    def http_binary() -> Any:
        inp = httpclient.InferInput("image", list(SHAPE), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = httpclient.InferRequestedOutput("mean", binary_data=True)
        return http.infer("frame", [inp], outputs=[out]).as_numpy("mean")

    def grpc_raw() -> Any:
        inp = grpcclient.InferInput("image", list(SHAPE), "FP32")
        inp.set_data_from_numpy(x)
        return grpc.infer("frame", [inp]).as_numpy("mean")

    def shm_request(client: Any, mod: Any, region: str, out_region: str) -> Any:
        inp = mod.InferInput("image", list(SHAPE), "FP32")
        inp.set_shared_memory(region, x.nbytes)
        out = mod.InferRequestedOutput("mean")
        out.set_shared_memory(out_region, 12)
        return client.infer("frame", [inp], outputs=[out])

    def http_shm() -> Any:
        shm_request(http, httpclient, "frame", "mean")
        return shm.get_contents_as_numpy(out_handle, np.float32, [1, 3])

    def grpc_shm() -> Any:
        shm_request(grpc, grpcclient, "frame", "mean")
        return shm.get_contents_as_numpy(out_handle, np.float32, [1, 3])

    def http_shm_copy() -> Any:
        shm.set_shared_memory_region(in_handle, [x])
        return http_shm()

    variants: dict[str, Callable[[], Any]] = {
        "http binary": http_binary,
        "grpc raw": grpc_raw,
        "http system shm": http_shm,
        "grpc system shm": grpc_shm,
        "http system shm + client copy": http_shm_copy,
    }
    cuda = _cuda_variant(http, x)
    if isinstance(cuda, str):
        conn.send({"note": cuda})
    else:
        variants["http cuda shm"] = cuda
    for fn in variants.values():  # warm up, and check every transport's answer
        np.testing.assert_allclose(fn(), want, rtol=1e-4)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            times[name] += _time(fn, CALLS)
    http.unregister_system_shared_memory()
    for handle in handles:
        shm.destroy_shared_memory_region(handle)
    conn.send(times)


def _cuda_variant(http: Any, x: np.ndarray[Any, Any]) -> Callable[[], Any] | str:
    from agent.api.shm import cuda_unusable

    reason = cuda_unusable()
    if reason is not None:
        return f"CUDA shared memory not measured: {reason}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tritonclient.http as httpclient
            import tritonclient.utils.cuda_shared_memory as cudashm
    except (ImportError, RuntimeError) as exc:
        return f"CUDA shared memory not measured: {exc}"
    frame = cudashm.create_shared_memory_region("cuda-frame", x.nbytes, 0)
    mean = cudashm.create_shared_memory_region("cuda-mean", 64, 0)
    cudashm.set_shared_memory_region(frame, [x])
    for name, region, size in (("cuda-frame", frame, x.nbytes), ("cuda-mean", mean, 64)):
        raw = _raw_handle(cudashm, region)
        http.register_cuda_shared_memory(name, raw, 0, size)

    def call() -> Any:
        inp = httpclient.InferInput("image", list(SHAPE), "FP32")
        inp.set_shared_memory("cuda-frame", x.nbytes)
        out = httpclient.InferRequestedOutput("mean")
        out.set_shared_memory("cuda-mean", 12)
        http.infer("frame", [inp], outputs=[out])
        return cudashm.get_contents_as_numpy(mean, np.float32, [1, 3])

    call.regions = (frame, mean)  # type: ignore[attr-defined]  # kept alive with the function
    return call


def _raw_handle(cudashm: Any, region: Any) -> bytes:
    """tritonclient's base64 handle; cuda-bindings 13 dropped the ``reserved`` field it reads,
    so read the handle's 64 bytes from its address there."""
    import base64
    import ctypes

    try:
        raw: bytes = cudashm.get_raw_handle(region)
    except AttributeError:
        handle = region._cuda_shm_handle
        raw = base64.b64encode(ctypes.string_at(handle.getPtr(), 64))
    return raw


def main() -> None:
    from agent.api import start_api
    from agent.config import ApiConfig, BackendConfig, SwapConfig
    from agent.logs import configure_logging
    from agent.models.bundle import VariantSpec, build_bundle
    from agent.models.slots import ModelSlot, SlotRegistry
    from agent.models.store import ModelStore

    configure_logging("warning", json=False)
    x = _frame()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = frame_model(root / "frame.onnx")
        bundle = root / "bundle"
        build_bundle(bundle, "frame", "1.0.0", [VariantSpec(model)], golden_inputs={"image": x})
        store = ModelStore(root / "store")
        store.install(bundle)
        slot = ModelSlot(
            "frame",
            store,
            swap_config=SwapConfig(warmup_runs=1),
            backend_config=BackendConfig(measure=False),
            latency_runs=1,
        )
        slot.start("1.0.0")
        registry = SlotRegistry([slot])
        config = ApiConfig(http_port=0, grpc_port=0, max_body_bytes=64 * 1024 * 1024)
        server = start_api(registry, config)
        try:
            in_process = _time(lambda: slot.infer({"image": x}), IN_PROCESS_CALLS)
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client, args=(server.http_port, server.grpc_port, child))
            proc.start()
            note = None
            times = parent.recv()
            if "note" in times:
                note, times = times["note"], parent.recv()
            proc.join(60)
            in_process += _time(lambda: slot.infer({"image": x}), IN_PROCESS_CALLS)
        finally:
            server.stop()
            registry.close()
    _report(statistics.median(in_process), times, note)


def _report(base_s: float, times: dict[str, list[float]], note: str | None) -> None:
    mb = np.prod(SHAPE) * 4 / 1e6
    print(f"frame {list(SHAPE)} FP32 ({mb:.1f} MB); in-process p50 {base_s * 1e3:.3f} ms")
    print(f"{'transport':32} {'p50 ms':>8} {'added ms':>9} {'p90 ms':>8}")
    added = {}
    for name, samples in times.items():
        p50 = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        added[name] = p50 - base_s
        print(f"{name:32} {p50 * 1e3:8.2f} {added[name] * 1e3:9.2f} {p90 * 1e3:8.2f}")
    reference = added["http binary"]
    for name in ("http system shm", "grpc system shm", "http cuda shm"):
        if name in added:
            ratio = added[name] / reference
            verdict = "meets" if ratio <= 0.2 else "misses"
            print(f"{name} adds {ratio:.3f} of what http binary adds ({verdict} the 1/5 goal)")
    if note:
        print(note)


if __name__ == "__main__":
    main()

"""Inference API overhead and dynamic batching, measured side by side in one run.

1. Added latency at p50 of each transport over the in-process call, for the digits CNN
   (1x1x8x8) and the PP-OCR detector at 1x3x224x224 FP32: HTTP binary (a lean keep-alive
   client, and the unmodified tritonclient.http), gRPC (tritonclient.grpc), HTTP over the Unix
   socket. Variants are interleaved in rounds. Goal: <= 1 ms added at p50.
2. Dynamic batching, 16 concurrent clients (in a separate process, so they do not share the
   server's interpreter): throughput with / without batching (rounds interleaved), and p99 with
   batching against (max queue delay + one full batch's compute time).

    .venv/bin/python bench/bench_api.py
"""

from __future__ import annotations

import json
import multiprocessing as mp
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.api import start_api
from agent.backends import Artifact, LoadOptions, load_first
from agent.config import ApiConfig, BatchingConfig
from agent.errors import ModelError
from agent.logs import configure_logging
from agent.samples import digits_cnn, ppocr_detector

ROUNDS = 7
CALLS = {"digits": 60, "ppocr-det": 8}
BATCH_ROUNDS = 3
BATCH_SECONDS = 3.0
CLIENTS = 16
QUEUE_DELAY_US = 2000


class Served:
    backend = "onnxruntime"

    def __init__(self, name: str, path: Path, max_batch_size: int) -> None:
        self.session = load_first(Artifact(path, name=name), LoadOptions(intra_op_threads=1))
        self.name, self.version = name, "1"
        self.inputs, self.outputs = self.session.inputs, self.session.outputs
        self.max_batch_size = max_batch_size
        self.ready = True

    def infer(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        return self.session.run(feeds)


class Repo:
    def __init__(self, models: Sequence[Served]) -> None:
        self.models = {m.name: m for m in models}

    def names(self) -> Sequence[str]:
        return list(self.models)

    def versions(self, name: str) -> Sequence[str]:
        return ["1"]

    def get(self, name: str, version: str | None = None) -> Served:
        if name not in self.models or version not in (None, "1"):
            raise ModelError("unknown", model=name)
        return self.models[name]


def wide_mlp(path: Path) -> Path:
    """A synthetic weight-bound MLP (Nx1024 -> 2048 -> 1000, 16 MB of FP32 weights): one row
    costs nearly as much as sixteen, the case dynamic batching exists for on a CPU."""
    if path.exists():
        return path
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.03, (1024, 2048)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.03, (2048, 1000)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
        ],
        "wide_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1024])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1000])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))
    return path


# -- a lean HTTP/1.1 keep-alive client (TCP or Unix socket) ------------------------------------


class RawHttp:
    def __init__(self, address: tuple[str, int] | str) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.connect(address)
        self.buf = b""

    def infer(self, model: str, name: str, x: np.ndarray[Any, Any]) -> bytes:
        raw = x.tobytes()
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": name,
                        "datatype": "FP32",
                        "shape": list(x.shape),
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        req = (
            f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: a\r\n"
            f"Content-Length: {len(head) + len(raw)}\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\n\r\n"
        ).encode()
        self.sock.sendall(req + head + raw)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        headers, _, rest = self.buf.partition(b"\r\n\r\n")
        length = 0
        for line in headers.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        if not headers.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(headers.decode())
        while len(rest) < length:
            rest += self.sock.recv(1 << 20)
        self.buf = rest[length:]
        return rest[:length]

    def close(self) -> None:
        self.sock.close()


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- 1. overhead ---------------------------------------------------------------------------------


def bench_overhead(repo: Repo, server: Any) -> dict[str, dict[str, float]]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    http_url = f"127.0.0.1:{server.http_port}"
    grpc_url = f"127.0.0.1:{server.grpc_port}"
    raw_tcp = RawHttp(("127.0.0.1", server.http_port))
    raw_uds = RawHttp(str(server.unix_socket))
    th = httpclient.InferenceServerClient(http_url)
    tg = grpcclient.InferenceServerClient(grpc_url)
    inputs = {
        "digits": ("input", np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)),
        "ppocr-det": ("x", np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)),
    }

    def triton_http(model: str, name: str, x: np.ndarray[Any, Any]) -> Any:
        item = httpclient.InferInput(name, list(x.shape), "FP32")
        item.set_data_from_numpy(x, binary_data=True)
        return th.infer(model, [item]).as_numpy(repo.models[model].outputs[0].name)

    def triton_grpc(model: str, name: str, x: np.ndarray[Any, Any]) -> Any:
        item = grpcclient.InferInput(name, list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        return tg.infer(model, [item]).as_numpy(repo.models[model].outputs[0].name)

    variants: dict[str, Callable[[str, str, np.ndarray[Any, Any]], Any]] = {
        "in-process": lambda m, n, x: repo.models[m].infer({n: x}),
        "http binary (raw)": raw_tcp.infer,
        "http binary (tritonclient)": triton_http,
        "grpc (tritonclient)": triton_grpc,
        "unix socket (raw)": raw_uds.infer,
    }
    samples: dict[str, dict[str, list[float]]] = {m: {v: [] for v in variants} for m in inputs}
    for model, (name, x) in inputs.items():
        for fn in variants.values():  # warm up every path
            for _ in range(3):
                fn(model, name, x)
    for _ in range(ROUNDS):
        for model, (name, x) in inputs.items():
            for variant, fn in variants.items():
                for _ in range(CALLS[model]):
                    t0 = time.perf_counter()
                    fn(model, name, x)
                    samples[model][variant].append((time.perf_counter() - t0) * 1e3)
    raw_tcp.close()
    raw_uds.close()
    th.close()
    tg.close()
    return {
        model: {variant: statistics.median(v) for variant, v in per.items()}
        for model, per in samples.items()
    }


# -- 2. batching -----------------------------------------------------------------------------


SHAPES = {"digits": (1, 1, 8, 8), "wide-mlp": (1, 1024)}


def _client_proc(model: str, port: int, seconds: float, clients: int, out: Any) -> None:
    x = np.random.default_rng(1).random(SHAPES[model], dtype=np.float32)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients)

    def run(i: int) -> None:
        conn = RawHttp(("127.0.0.1", port))
        start.wait()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            conn.infer(model, "input", x)
            latencies[i].append((time.perf_counter() - t0) * 1e3)
        conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put([v for lat in latencies for v in lat])


def _load(model: str, port: int) -> tuple[float, list[float]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_proc, args=(model, port, BATCH_SECONDS, CLIENTS, queue))
    proc.start()
    lat = queue.get(timeout=BATCH_SECONDS + 60)
    proc.join(30)
    return len(lat) / BATCH_SECONDS, lat


def bench_batching(repo: Repo, model: str) -> dict[str, Any]:
    batched = ApiConfig(
        http_port=0,
        grpc_port=None,
        model_batching={
            model: BatchingConfig(max_queue_delay_us=QUEUE_DELAY_US, max_batch_size=CLIENTS)
        },
    )
    unbatched = ApiConfig(
        http_port=0,
        grpc_port=None,
        model_batching={model: BatchingConfig(enabled=False)},
    )
    results: dict[str, list[float]] = {"on": [], "off": []}
    lat: dict[str, list[float]] = {"on": [], "off": []}
    with start_api(repo, batched) as on, start_api(repo, unbatched) as off:
        for _ in range(BATCH_ROUNDS):
            for key, server in (("on", on), ("off", off)):
                rate, latencies = _load(model, server.http_port)
                results[key].append(rate)
                lat[key] += latencies
        snap = on.metrics.snapshot()[(model, "1")]
    x = np.random.default_rng(2).random((CLIENTS, *SHAPES[model][1:]), dtype=np.float32)
    served = repo.models[model]
    for _ in range(20):
        served.infer({"input": x})
    times = []
    for _ in range(200):
        t0 = time.perf_counter()
        served.infer({"input": x})
        times.append((time.perf_counter() - t0) * 1e3)
    return {
        "rate_on": statistics.median(results["on"]),
        "rate_off": statistics.median(results["off"]),
        "p50_on": _p(lat["on"], 50),
        "p99_on": _p(lat["on"], 99),
        "p50_off": _p(lat["off"], 50),
        "p99_off": _p(lat["off"], 99),
        "full_batch_ms": statistics.median(times),
        "mean_batch": snap["nv_inference_count"] / max(snap["nv_inference_exec_count"], 1),
    }


def main() -> None:
    configure_logging("warning")
    cache = Path(tempfile.gettempdir()) / "edgefleet-bench"
    cache.mkdir(exist_ok=True)
    repo = Repo(
        [
            Served("digits", digits_cnn(cache), max_batch_size=32),
            Served("ppocr-det", ppocr_detector(cache), max_batch_size=4),
            Served("wide-mlp", wide_mlp(cache / "wide-mlp.onnx"), max_batch_size=32),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = ApiConfig(http_port=0, grpc_port=0, unix_socket=Path(tmp) / "agent.sock")
        with start_api(repo, config) as server:
            overhead = bench_overhead(repo, server)
    print(f"API overhead, p50 ms over {ROUNDS} interleaved rounds (goal: added <= 1 ms)")
    print(f"{'model':<12}{'path':<30}{'p50 ms':>9}{'added ms':>10}{'ratio':>8}")
    for model, per in overhead.items():
        base = per["in-process"]
        for variant, p50 in per.items():
            added = p50 - base
            print(f"{model:<12}{variant:<30}{p50:>9.3f}{added:>10.3f}{p50 / base:>8.2f}")
    print()
    print(
        f"Dynamic batching, {CLIENTS} concurrent clients (separate process, lean HTTP binary), "
        f"{BATCH_ROUNDS} interleaved rounds of {BATCH_SECONDS:.0f} s, "
        f"max queue delay {QUEUE_DELAY_US / 1000:.1f} ms"
    )
    print(f"{'model':<10}{'batching':<10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}")
    summary = []
    for model in ("digits", "wide-mlp"):
        b = bench_batching(repo, model)
        bound = QUEUE_DELAY_US / 1000 + b["full_batch_ms"]
        print(
            f"{model:<10}{'on':<10}{b['rate_on']:>9.0f}{b['p50_on']:>9.2f}{b['p99_on']:>9.2f}"
            f"{b['mean_batch']:>12.1f}"
        )
        print(
            f"{model:<10}{'off':<10}{b['rate_off']:>9.0f}{b['p50_off']:>9.2f}{b['p99_off']:>9.2f}"
        )
        summary.append(
            f"{model}: throughput on/off {b['rate_on'] / b['rate_off']:.2f}x (goal >= 1.5x); "
            f"p99 on {b['p99_on']:.2f} ms vs delay {QUEUE_DELAY_US / 1000:.1f} + batch of "
            f"{CLIENTS} {b['full_batch_ms']:.2f} = {bound:.2f} ms (ratio {b['p99_on'] / bound:.2f})"
        )
    print("\n".join(summary))


if __name__ == "__main__":
    main()

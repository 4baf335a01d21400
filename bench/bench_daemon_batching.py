"""Dynamic batching through ``edge-agent daemon``: 16 concurrent clients, batching on vs off.

Two real daemons serve the same models from their own state directories (each installed with
``edge-agent models install model.onnx --name ... --version 1.0.0 --activate``): one with
``[api.batching]`` on (a 2 ms queue delay), one with it off (``enabled = false``). Both models
have a dynamic batch dimension, so each served version takes ``max_batch_size`` from its
session:

- the digits CNN (1x1x8x8): a small real model, where the HTTP work per request dominates;
- a weight-bound MLP (1x1024 -> 2048 -> 1000): one row costs nearly as much as sixteen, what
  batching exists for on a CPU.

The clients run in a separate process (lean keep-alive HTTP with binary tensors, as in
bench_api.py) and send a fixed number of requests per round, against each daemon in turn, in
interleaved rounds. The mean batch comes from each daemon's ``/metrics``.

    .venv/bin/python bench/bench_daemon_batching.py
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import CLIENTS, QUEUE_DELAY_US, SHAPES, RawHttp, _p, wide_mlp

from agent.samples import digits_cnn

BIN = Path(sys.executable).parent
ROUNDS = 3
REQUESTS = 4800  # per round and daemon, split evenly over the clients


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(
    work: Path, name: str, models: dict[str, Path], batching: bool
) -> tuple[subprocess.Popen[bytes], int]:
    state = work / name
    for model, path in models.items():
        subprocess.run(
            [
                str(BIN / "edge-agent"),
                "models",
                "install",
                str(path),
                "--name",
                model,
                "--version",
                "1.0.0",
                "--activate",
                "--state-dir",
                str(state),
            ],
            check=True,
            capture_output=True,
        )
    port = _free_port()
    config = work / f"{name}.toml"
    config.write_text(
        f"""
device_id = "{name}"
state_dir = "{state}"
log_level = "warning"
log_json = true

[api]
http_port = {port}
grpc_port = 0

[api.batching]
enabled = {"true" if batching else "false"}
max_queue_delay_us = {QUEUE_DELAY_US}
max_batch_size = {CLIENTS}
""",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [str(BIN / "edge-agent"), "daemon", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(work / f"{name}.log").open("wb"),
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            ready = [
                httpx.get(f"http://127.0.0.1:{port}/v2/models/{m}/ready").status_code == 200
                for m in models
            ]
            if all(ready):
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit((work / f"{name}.log").read_text()[-3000:])
        time.sleep(0.2)


def _client_proc(model: str, port: int, requests: int, clients: int, out: Any) -> None:
    x = np.random.default_rng(1).random(SHAPES[model], dtype=np.float32)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        conn = RawHttp(("127.0.0.1", port))
        start.wait()
        for _ in range(requests // clients):
            t0 = time.perf_counter()
            conn.infer(model, "input", x)
            latencies[i].append((time.perf_counter() - t0) * 1e3)
        conn.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    out.put((time.perf_counter() - t0, [v for lat in latencies for v in lat]))


def _load(model: str, port: int) -> tuple[float, list[float]]:
    """``REQUESTS`` requests from ``CLIENTS`` clients: (requests per second, latencies in ms)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_client_proc, args=(model, port, REQUESTS, CLIENTS, queue))
    proc.start()
    elapsed, lat = queue.get(timeout=300)
    proc.join(30)
    if len(lat) != REQUESTS // CLIENTS * CLIENTS:
        raise SystemExit(f"{model}: {len(lat)} answers for {REQUESTS} requests")
    return len(lat) / elapsed, lat


def _mean_batch(port: int, model: str) -> float:
    """Inferences per model run, from the daemon's ``/metrics``."""
    counts = {"nv_inference_count": 0.0, "nv_inference_exec_count": 0.0}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics").text.splitlines():
        name, _, rest = line.partition("{")
        if name in counts and f'model="{model}"' in rest:
            counts[name] += float(line.rsplit(" ", 1)[1])
    return counts["nv_inference_count"] / max(counts["nv_inference_exec_count"], 1.0)


def main() -> int:
    cache = Path(tempfile.gettempdir()) / "edgefleet-bench"
    cache.mkdir(exist_ok=True)
    models = {"digits": digits_cnn(cache), "wide-mlp": wide_mlp(cache / "wide-mlp.onnx")}
    rates: dict[tuple[str, str], list[float]] = {(m, k): [] for m in models for k in ("on", "off")}
    latencies: dict[tuple[str, str], list[float]] = {key: [] for key in rates}
    batch: dict[tuple[str, str], float] = {}
    meta: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-batching-") as tmp:
        work = Path(tmp)
        daemons: list[subprocess.Popen[bytes]] = []
        try:
            on, on_port = start(work, "batching-on", models, True)
            daemons.append(on)
            off, off_port = start(work, "batching-off", models, False)
            daemons.append(off)
            ports = {"on": on_port, "off": off_port}
            for model in models:
                meta[model] = httpx.get(f"http://127.0.0.1:{on_port}/v2/models/{model}").json()
                for _ in range(ROUNDS):
                    for key, port in ports.items():
                        rate, lat = _load(model, port)
                        rates[model, key].append(rate)
                        latencies[model, key] += lat
                for key, port in ports.items():
                    batch[model, key] = _mean_batch(port, model)
        finally:
            for proc in daemons:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    print(
        f"Dynamic batching through edge-agent daemon, {CLIENTS} concurrent clients (separate "
        f"process, lean HTTP binary), {ROUNDS} interleaved rounds of {REQUESTS} requests, "
        f"max queue delay {QUEUE_DELAY_US / 1000:.1f} ms"
    )
    print(
        f"{'model':<10}{'batching':<10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'mean batch':>12}"
        "  served"
    )
    summary = []
    for model in models:
        params = meta[model]["parameters"]
        for key in ("on", "off"):
            lat = latencies[model, key]
            print(
                f"{model:<10}{key:<10}{statistics.median(rates[model, key]):>9.0f}"
                f"{_p(lat, 50):>9.2f}{_p(lat, 99):>9.2f}{batch[model, key]:>12.1f}"
                f"  {params['version']} {params['variant']} on {params['device']}"
            )
        ratio = statistics.median(rates[model, "on"]) / statistics.median(rates[model, "off"])
        summary.append(f"{model}: throughput on / off {ratio:.2f}x (goal >= 1.5x)")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Dynamic batching through ``edge-agent daemon``: 16 concurrent clients, batching on vs off.

Two real daemons serve the same model from their own state directories (installed with
``edge-agent models install model.onnx --name ... --version 1.0.0 --activate``): one with
``[api.batching]`` on (a 2 ms queue delay), one with it off. The clients run in a separate
process (lean keep-alive HTTP with binary tensors, as in bench_api.py), against each daemon in
turn, in interleaved rounds. The model is a weight-bound MLP (one row costs nearly as much as
sixteen: what batching exists for on a CPU) whose batch dimension is dynamic, so the daemon's
served version takes ``max_batch_size`` from its session.

    .venv/bin/python bench/bench_daemon_batching.py
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_api import BATCH_ROUNDS, BATCH_SECONDS, CLIENTS, _load, _p, wide_mlp

BIN = Path(sys.executable).parent
MODEL = "wide-mlp"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(
    work: Path, name: str, model: Path, batching: bool
) -> tuple[subprocess.Popen[bytes], int]:
    state = work / name
    subprocess.run(
        [
            str(BIN / "edge-agent"),
            "models",
            "install",
            str(model),
            "--name",
            MODEL,
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
max_queue_delay_us = 2000
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
            if httpx.get(f"http://127.0.0.1:{port}/v2/models/{MODEL}/ready").status_code == 200:
                return proc, port
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit((work / f"{name}.log").read_text()[-3000:])
        time.sleep(0.2)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-daemon-batching-") as tmp:
        work = Path(tmp)
        model = wide_mlp(work / "wide-mlp.onnx")
        on, on_port = start(work, "batching-on", model, True)
        off, off_port = start(work, "batching-off", model, False)
        rates: dict[str, list[float]] = {"on": [], "off": []}
        latencies: dict[str, list[float]] = {"on": [], "off": []}
        try:
            meta = httpx.get(f"http://127.0.0.1:{on_port}/v2/models/{MODEL}").json()
            for _ in range(BATCH_ROUNDS):
                for key, port in (("on", on_port), ("off", off_port)):
                    rate, lat = _load(MODEL, port)
                    rates[key].append(rate)
                    latencies[key] += lat
        finally:
            for proc in (on, off):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    on_rate, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
    print(
        f"{MODEL} served by edge-agent daemon ({meta['parameters']['variant']} on "
        f"{meta['parameters']['device']}), {CLIENTS} concurrent clients, {BATCH_ROUNDS} "
        f"interleaved rounds of {BATCH_SECONDS:.0f} s"
    )
    for key, rate in (("on", on_rate), ("off", off_rate)):
        print(
            f"  batching {key:<3} {rate:8.1f} req/s  p50 {_p(latencies[key], 50):7.2f} ms"
            f"  p99 {_p(latencies[key], 99):7.2f} ms"
        )
    print(f"  throughput on / off: {on_rate / off_rate:.2f}x  (goal >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

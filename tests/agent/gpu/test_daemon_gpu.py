"""``edge-agent daemon`` on an NVIDIA GPU: a bundle with an FP32 variant for any device and an
FP16 variant for NVIDIA GPUs; the daemon measures both and serves one on the CUDA provider,
through its local API, and says which and why."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.contracts.manifest import TargetConstraints, Tolerance
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.store import ModelStore
from agent.samples import text_page
from tests.agent.gpu.conftest import fp16_variant

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_daemon_measures_and_serves_a_gpu_variant(ppocr_model: Path, tmp_path: Path) -> None:
    page = text_page(1, 7, size=320)
    bundle = tmp_path / "bundle"
    build_bundle(
        bundle,
        "ppocr-det",
        "1.0.0",
        [
            VariantSpec(ppocr_model, id="onnx-fp32", tolerance=Tolerance(max_rel_l2=1e-2)),
            VariantSpec(
                fp16_variant(ppocr_model, tmp_path / "fp16.onnx"),
                precision="fp16",
                id="onnx-fp16",
                target=TargetConstraints(accelerator="nvidia-gpu"),
                tolerance=Tolerance(max_rel_l2=5e-2),
            ),
        ],
        golden_inputs={"x": page},
    )
    state = tmp_path / "state"
    store = ModelStore(state)
    store.install(bundle)
    store.activate("ppocr-det", "1.0.0")
    port = _free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{state}"\nlog_json = true\n[backends]\nchoice_budget_s = 5.0\n'
        f"[api]\nhttp_port = {port}\ngrpc_port = 0\n",
        encoding="utf-8",
    )
    with (tmp_path / "daemon.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=dict(os.environ),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/v2/models/ppocr-det/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.2)
        meta = httpx.get(f"{url}/v2/models/ppocr-det", timeout=10).json()
        params = meta["parameters"]
        assert params["device"] == "CUDAExecutionProvider", params
        assert params["choice"].startswith("measured: "), params
        assert "onnx-fp16" in params["choice"]
        assert "onnx-fp32" in params["choice"]
        answer = httpx.post(
            f"{url}/v2/models/ppocr-det/infer",
            json={
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": list(page.shape),
                        "data": page.ravel().tolist(),
                    }
                ]
            },
            timeout=60,
        ).json()
        assert answer["parameters"]["variant"] == params["variant"]
        probs = np.asarray(answer["outputs"][0]["data"], np.float32)
        assert 0.0 < float((probs > 0.3).mean()) < 0.5  # text found on the page, not everywhere
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

"""``edge-agent daemon`` with ONNX Runtime sessions in worker processes (``backends.ort_process``;
"gpu" by default, forced to "always" here where no GPU is): it serves through the local API from
a worker process, and a worker killed under it costs one request, not the daemon."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from agent.backends import Artifact, LoadOptions
from agent.backends.onnxruntime import OnnxRuntimeBackend
from agent.samples import DigitsData
from tests.agent.daemon_proc import digits_daemon, running_daemon


def _workers(pid: int) -> list[int]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "agent.backends.ort_worker" in child.cmdline():
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


def test_daemon_serves_from_a_worker_process_and_survives_its_death(
    tmp_path: Path, digits_path: Path, digits: DigitsData
) -> None:
    config, port = digits_daemon(
        tmp_path,
        digits_path,
        digits,
        "worker-test",
        '[backends]\npin_backend = "onnxruntime"\nort_process = "always"\nmeasure = false\n'
        "[swap]\nwarmup_runs = 1\n",
    )
    base = f"http://127.0.0.1:{port}"
    x = digits.x_test[:2].astype(np.float32)
    tensor = {"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8]}
    body = {"inputs": [{**tensor, "data": x.ravel().tolist()}]}
    here = OnnxRuntimeBackend().load(
        Artifact(digits_path, name="digits"), LoadOptions(ort_process="never")
    )
    want = here.run({"input": x})["logits"]
    here.close()

    def infer() -> httpx.Response:
        return httpx.post(f"{base}/v2/models/digits/infer", json=body, timeout=30)

    def logits(r: httpx.Response) -> np.ndarray:  # type: ignore[type-arg]
        out = r.json()["outputs"][0]
        return np.asarray(out["data"], np.float32).reshape(out["shape"])

    with running_daemon(config, port, tmp_path / "daemon.log") as proc:
        workers = _workers(proc.pid)
        assert len(workers) == 1, workers
        r = infer()
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(logits(r), want, rtol=1e-5, atol=1e-5)

        os.kill(workers[0], signal.SIGKILL)
        codes = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = infer()
            codes.append(r.status_code)
            if r.status_code == 200:
                break
        assert codes[-1] == 200, codes
        assert codes.count(500) + codes.count(503) <= 1, codes  # the death costs one request
        np.testing.assert_allclose(logits(r), want, rtol=1e-5, atol=1e-5)
        assert proc.poll() is None
        again = _workers(proc.pid)
        assert len(again) == 1
        assert again != workers
    assert proc.returncode == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    deadline = time.monotonic() + 15
    while _running(again) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(again)  # the daemon's workers left with it


def _running(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive

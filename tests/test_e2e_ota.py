"""Over-the-air updates end to end: a control plane on loopback, two agents as real processes
(``edge-agent daemon``, each running its inference loop at 50 Hz), an operator pushing v1 then v2
through ``edgectl``. Both agents must swap to v2 with no failed or dropped inference, and the
control plane must show each device's reported version."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.updates.fleet import ADMIN_TOKEN, ControlPlane

BIN = Path(sys.executable).parent
AGENTS = ("robot-a", "robot-b")


def _agent_config(
    path: Path, name: str, state_dir: Path, cp_url: str, root: Path, token: str, extra: str = ""
) -> Path:
    path.write_text(
        f"""
device_id = "{name}"
state_dir = "{state_dir}"
log_level = "warning"
log_json = true
models = [{{name = "digits"}}]

[loop]
rate_hz = 50
drop_policy = "catch_up"
window_s = 1

[swap]
probation_s = 1
warmup_runs = 2
max_p99_ratio = 100  # latency is not what this test judges; failures and drops are

[api]
enabled = false

[control_plane]
url = "{cp_url}"
bootstrap_token = "{token}"
tuf_root_path = "{root}"
poll_interval_s = 0.3
{extra}""",
        encoding="utf-8",
    )
    return path


class Operator:
    """``edgectl`` as an operator runs it, against the control plane on loopback."""

    def __init__(self, url: str, home: Path) -> None:
        self.env = {
            **os.environ,
            "EDGEFLEET_URL": url,
            "EDGEFLEET_TOKEN": ADMIN_TOKEN,
            "EDGECTL_CONFIG": str(home / "edgectl.json"),
            "COLUMNS": "200",
        }

    def __call__(self, *args: str) -> bytes:
        res = subprocess.run(
            [str(BIN / "edgectl"), *args], env=self.env, capture_output=True, timeout=120
        )
        assert res.returncode == 0, (args, res.stdout.decode(), res.stderr.decode())
        return res.stdout


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp").start()
    yield plane
    plane.stop()


def _wait_for(
    cp: ControlPlane, version: str, timeout_s: float = 60, agents: int = len(AGENTS)
) -> list[dict[str, Any]]:
    """Until every agent (``agents`` of them) reports ``version`` committed; the devices as the
    control plane shows them."""
    deadline = time.monotonic() + timeout_s
    while True:
        with cp.admin() as c:
            devices = c.get("/v1/devices").json()
        done = [
            d
            for d in devices
            if any(
                m["name"] == "digits"
                and m["active_version"] == version
                and m["phase"] == "committed"
                for m in (d.get("reported") or {}).get("models", [])
            )
        ]
        if len(devices) == agents and len(done) == agents:
            return devices
        assert time.monotonic() < deadline, f"agents did not reach {version}: {devices}"
        time.sleep(0.2)


@pytest.mark.alone
def test_two_agents_swap_to_v2_with_no_dropped_inference(
    cp: ControlPlane, tmp_path: Path, digits_path: Path, digits: DigitsData
) -> None:
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    v2 = models.shifted(digits_path, tmp_path / "digits-v2.onnx", 5.0)
    edgectl = Operator(cp.url, tmp_path)
    root = tmp_path / "root.json"
    root.write_bytes(edgectl("tuf", "root"))  # provisioning: the fleet's root of trust
    assert json.loads(root.read_bytes())["signed"]["_type"] == "root"

    # The devices' label comes with their bootstrap token, which enrolls exactly this fleet.
    created = edgectl(
        "bootstrap-tokens", "create", "e2e", "--label", "fleet=e2e", "--uses", str(len(AGENTS))
    )
    token = created.decode().split()[-1]

    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = contextlib.ExitStack()
    try:
        for name in AGENTS:
            config = _agent_config(
                tmp_path / f"{name}.toml", name, tmp_path / name, cp.url, root, token
            )
            procs[name] = subprocess.Popen(
                [str(BIN / "edge-agent"), "daemon", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=logs.enter_context((tmp_path / f"{name}.log").open("wb")),
            )
        edgectl("models", "create", "digits")
        edgectl(
            "models",
            "push",
            str(digits_path),
            "--name",
            "digits",
            "--version",
            "1.0.0",
            "--calibration",
            str(cal),
        )
        edgectl("deploy", "digits", "1.0.0", "--to", "fleet=e2e")
        _wait_for(cp, "1.0.0")
        time.sleep(0.5)  # the loops run on v1 for a while
        edgectl(
            "models",
            "push",
            str(v2),
            "--name",
            "digits",
            "--version",
            "2.0.0",
            "--calibration",
            str(cal),
        )
        edgectl("deploy", "digits", "2.0.0", "--to", "fleet=e2e")
        devices = _wait_for(cp, "2.0.0")
        time.sleep(0.5)  # and on v2
        listing = edgectl("devices", "ls").decode()
    finally:
        summaries = {}
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for name, proc in procs.items():
            out, _ = proc.communicate(timeout=30)
            lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
            summaries[name] = lines[-1] if lines else {}
            assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        logs.close()

    for name in AGENTS:
        summary = summaries[name]
        assert summary["event"] == "stopped", summary
        loop = summary["loops"]["digits"]
        assert loop["failed"] == 0, loop
        assert loop["dropped"] == 0, loop
        assert loop["by_version"]["1.0.0"] > 0, loop
        assert loop["by_version"]["2.0.0"] > 0, loop
        assert loop["count"] == sum(loop["by_version"].values()), loop
    ids = {s["control_plane_device_id"] for s in summaries.values()}
    assert ids == {d["id"] for d in devices}
    for d in devices:
        reported = {m["name"]: m for m in d["reported"]["models"]}
        assert reported["digits"]["active_version"] == "2.0.0"
        assert reported["digits"]["last_error"] is None
    assert listing.count("digits@2.0.0") == len(AGENTS), listing


def _workers(pid: int) -> set[int]:
    """The daemon's live ONNX Runtime worker processes."""
    import psutil

    found = set()
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "agent.backends.ort_worker" in (
                child.cmdline()
            ):
                found.add(child.pid)
    return found


@pytest.mark.alone
def test_rollouts_to_a_daemon_with_worker_sessions_reuse_the_retired_worker(
    cp: ControlPlane, tmp_path: Path, digits_path: Path, digits: DigitsData
) -> None:
    """Sessions in worker processes (as on a GPU, forced here): three versions rolled out by
    the operator, no failed or dropped inference, and the third loads in the worker the first
    left, so two workers serve all three versions."""
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    edgectl = Operator(cp.url, tmp_path)
    root = tmp_path / "root.json"
    root.write_bytes(edgectl("tuf", "root"))
    created = edgectl("bootstrap-tokens", "create", "w", "--label", "fleet=w", "--uses", "1")
    token = created.decode().split()[-1]
    config = _agent_config(
        tmp_path / "w.toml",
        "robot-w",
        tmp_path / "w",
        cp.url,
        root,
        token,
        extra='[backends]\npin_backend = "onnxruntime"\nort_process = "always"\nmeasure = false\n',
    )
    edgectl("models", "create", "digits")
    workers: list[set[int]] = []
    with (tmp_path / "w.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "daemon", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            for version, shift in (("1.0.0", None), ("2.0.0", 5.0), ("3.0.0", 7.0)):
                model = (
                    digits_path
                    if shift is None
                    else models.shifted(digits_path, tmp_path / f"v{version}.onnx", shift)
                )
                edgectl(
                    "models", "push", str(model), "--name", "digits", "--version", version,
                    "--calibration", str(cal),
                )  # fmt: skip
                edgectl("deploy", "digits", version, "--to", "fleet=w")
                _wait_for(cp, version, agents=1)
                time.sleep(0.5)  # the loop runs on it for a while, the retired worker released
                workers.append(_workers(proc.pid))
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, (tmp_path / "w.log").read_text()[-3000:]
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    loop = lines[-1]["loops"]["digits"]
    assert loop["failed"] == 0, loop
    assert loop["dropped"] == 0, loop
    assert all(loop["by_version"][v] > 0 for v in ("1.0.0", "2.0.0", "3.0.0")), loop
    assert len(workers[0]) == 1, workers
    assert len(workers[1]) == 2, workers  # v2's worker and v1's, kept as the spare
    assert workers[2] == workers[1], workers  # v3 loaded in v1's worker: no third process

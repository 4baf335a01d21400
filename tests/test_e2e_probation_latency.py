"""Probation's latency verdict through real processes: a control plane on loopback, Mosquitto and
an ``edge-agent daemon`` serving local clients over the Open Inference Protocol.

A new version that is slow on one frame of a few dozen (a frame held up: the scheduler, a page
fault, a neighbour's burst) commits: one stalled frame among a short probation's inferences is
not its p99. A version slow on several frames is rolled back, and says it was its p99.

The stalls are real: the versions after the first are the digits CNN with a branch that runs a
few billion multiply-adds on the frames the test flags (a pixel at 1000) and nothing
on others (``tests.agent.store.models.stalling``). The loop runs at one frame every ten
seconds, so the probation window holds the test's own requests and no others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.updates.fleet import BOOTSTRAP_TOKEN, ControlPlane, free_port
from tests.test_e2e_fleet_truth import Agent, _api_view, _committed, _other_port, _wait

pytestmark = pytest.mark.broker

FLAG = 1000.0  # a pixel at this value makes the stalling versions run their heavy branch


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp").start()
    yield plane
    plane.stop()


def _config(
    path: Path, tmp_path: Path, cp: ControlPlane, broker: tuple[str, int], api_port: int
) -> Path:
    root = cp.root_json(tmp_path / "root.json")
    path.write_text(
        f"""
device_id = "stalls"
state_dir = "{tmp_path / "state"}"
log_level = "info"
log_json = true

[[models]]
name = "digits"

[backends]
pin_backend = "onnxruntime"  # one runtime, so every flagged frame costs the same branch
pin_precision = "fp32"
intra_op_threads = 1  # no pool thread to wait for: less scheduling noise on shared cores

[loop]
rate_hz = 0.1  # the probation window holds the test's requests, not the loop's
window_s = 1.0

[swap]
probation_s = 3
warmup_runs = 1
# a sub-millisecond model on shared cores: a bound of 100x its p99 (5 to 30 ms), which a
# flagged frame (a hundred ms and more) is far beyond
max_p99_ratio = 100

[api]
enabled = true
http_port = {api_port}
grpc_port = {_other_port(api_port)}

[mqtt]
host = "{broker[0]}"
port = {broker[1]}
telemetry_interval_s = 0.5

[control_plane]
url = "{cp.url}"
bootstrap_token = "{BOOTSTRAP_TOKEN}"
tuf_root_path = "{root}"
poll_interval_s = 1.0
poll_jitter = 0
""",
        encoding="utf-8",
    )
    return path


def _send(api: httpx.Client, frames: list[np.ndarray]) -> None:
    for frame in frames:
        answer = api.post(
            "/v2/models/digits/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "data": frame.ravel().tolist(),
                    }
                ]
            },
        )
        assert answer.status_code == 200, answer.text


def _verdict(cp: ControlPlane, device_id: str, version: str) -> dict[str, object] | None:
    """The device's view once its probation of ``version`` has a verdict (committed, or
    rolled back to another version)."""
    view = _api_view(cp, device_id)
    if view.get("phase") == "committed" and view.get("active_version") == version:
        return view
    return view if view.get("phase") == "rolled_back" else None


def _on_probation(cp: ControlPlane, device_id: str, version: str) -> bool:
    view = _api_view(cp, device_id)
    return view.get("active_version") == version and view.get("phase") == "probation"


@pytest.mark.timeout(300)
def test_one_stalled_frame_commits_and_several_roll_back(
    cp: ControlPlane,
    tmp_path: Path,
    digits_path: Path,
    digits: DigitsData,
    mqtt_broker: tuple[str, int],
) -> None:
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    stalling = models.stalling(digits_path, tmp_path / "v2.onnx", flag=FLAG)
    cp.push(stalling, cal, name="digits", version="2.0.0")
    shifted = models.shifted(digits_path, tmp_path / "shifted.onnx", 3.0)
    cp.push(models.stalling(shifted, tmp_path / "v3.onnx", flag=FLAG), cal, name="digits",
            version="3.0.0")  # fmt: skip

    frames = [digits.x_test[i] for i in range(30)]
    flagged = digits.x_test[30].copy()
    flagged[0, 0, 0] = FLAG

    port = free_port()
    config = _config(tmp_path / "agent.toml", tmp_path, cp, mqtt_broker, port)
    agent = Agent(config, tmp_path / "agent.log").start()
    try:
        with cp.admin() as admin:
            devices = _wait("enrollment", lambda: admin.get("/v1/devices").json())
        device_id = devices[0]["id"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            cp.deploy("digits", "1.0.0", device_id)
            _wait("1.0.0 on probation", lambda: _on_probation(cp, device_id, "1.0.0"))
            _send(api, frames)  # the inferences 1.0.0 needs to commit, and its baseline
            _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))
            _send(api, frames)

            # 2.0.0: 30 ordinary frames and one flagged, which runs the heavy branch
            cp.deploy("digits", "2.0.0", device_id)
            _wait("2.0.0 on probation", lambda: _on_probation(cp, device_id, "2.0.0"))
            _send(api, [flagged, *frames])
            view = _wait("a verdict on 2.0.0", lambda: _verdict(cp, device_id, "2.0.0"))
            assert view["phase"] == "committed", (view, agent.events("update_rolled_back"))

            # 3.0.0: the same frames with five flagged among them
            cp.deploy("digits", "3.0.0", device_id)
            _wait("3.0.0 on probation", lambda: _on_probation(cp, device_id, "3.0.0"))
            _send(api, [f for frame in frames[:5] for f in (flagged, frame)] + frames[5:])
            view = _wait("a verdict on 3.0.0", lambda: _verdict(cp, device_id, "3.0.0"))
        assert (view["phase"], view["active_version"]) == ("rolled_back", "2.0.0"), view
        rolled = agent.events("update_rolled_back")
        assert len(rolled) == 1, rolled
        assert rolled[0]["left"] == "3.0.0"
        assert "the previous version's" in rolled[0]["reason"], rolled[0]
    finally:
        agent.stop()

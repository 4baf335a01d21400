"""The fleet tells the truth, through real processes: a control plane on loopback, Mosquitto, and
``edge-agent daemon`` subprocesses with their inference loops running.

- After each kind of rollback (the control plane's ``rollback`` command after a commit, a
  probation verdict, boot recovery from a crash loop) the operator's view (``edgectl devices
  show --json``, the API behind it) names the version the device serves within the report
  interval; the rolled-back version is then refused, and offered again only on purpose
  (``edgectl devices retry``), when it is applied.
- A dead camera (a video path that does not exist) and a model whose input does not fit the
  frames are reported while the daemon runs: reported state, MQTT event, ``/v2/health/ready``,
  systemd ``STATUS=``, and no more watchdog pings.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import onnx
import paho.mqtt.client as mqtt
import pytest
from onnx import TensorProto, helper

from agent.models.bundle import VariantSpec, build_bundle
from agent.models.store import ModelStore
from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.updates.fleet import BOOTSTRAP_TOKEN, ControlPlane, free_port
from tests.test_e2e_ota import Operator

pytestmark = pytest.mark.broker

POLL_S = 1.0  # the agent's poll and report interval
BIN = Path(sys.executable).parent


def _config(
    path: Path,
    state_dir: Path,
    cp_url: str,
    root: Path,
    broker: tuple[str, int],
    *,
    name: str,
    models_: tuple[str, ...] = ("digits",),
    loop: str = "",
    api_port: int | None = None,
) -> Path:
    model_lines = "\n".join(f'[[models]]\nname = "{m}"' for m in models_)
    api = (
        f"enabled = true\nhttp_port = {api_port}\ngrpc_port = {_other_port(api_port)}"
        if api_port
        else "enabled = false"
    )
    path.write_text(
        f"""
device_id = "{name}"
state_dir = "{state_dir}"
log_level = "info"
log_json = true
{model_lines}

[loop]
rate_hz = 50
window_s = 0.5
{loop}

[swap]
probation_s = 4
boot_attempts = 2
warmup_runs = 1
max_p99_ratio = 100  # the error rate judges here, not latency

[api]
{api}

[mqtt]
host = "{broker[0]}"
port = {broker[1]}
telemetry_interval_s = 0.5

[control_plane]
url = "{cp_url}"
bootstrap_token = "{BOOTSTRAP_TOKEN}"
tuf_root_path = "{root}"
poll_interval_s = {POLL_S}
poll_jitter = 0
""",
        encoding="utf-8",
    )
    return path


class Agent:
    """One ``edge-agent daemon`` process; its JSON log lines land in ``log``."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.log, self.env = config, log, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "edge-agent"), "daemon", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=out,
                env={**os.environ, **(self.env or {})},
            )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                entry = json.loads(line)
                if entry.get("event") == name:
                    out.append(entry)
        return out


def _other_port(taken: int) -> int:
    """A free loopback port other than ``taken`` (``taken + 1`` may belong to anyone)."""
    while (port := free_port()) == taken:
        pass
    return port


def _wait(what: str, probe: Callable[[], Any], timeout_s: float = 90, every_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def _view(edgectl: Operator, device_id: str, model: str = "digits") -> dict[str, Any]:
    """The operator's view of one model on one device (``edgectl devices show --json``)."""
    shown = json.loads(edgectl("devices", "show", device_id, "--json"))
    reported = shown.get("reported") or {}
    return next((m for m in reported.get("models", []) if m["name"] == model), {})


def _api_view(cp: ControlPlane, device_id: str, model: str = "digits") -> dict[str, Any]:
    reported = cp.device(device_id).get("reported") or {}
    return next((m for m in reported.get("models", []) if m["name"] == model), {})


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp").start()
    yield plane
    plane.stop()


@pytest.fixture
def watcher(mqtt_broker: tuple[str, int]) -> Iterator[tuple[mqtt.Client, queue.Queue[Any]]]:
    got: queue.Queue[tuple[float, str, Any]] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.put(
        (time.time(), msg.topic, json.loads(msg.payload) if msg.payload else None)
    )
    client.connect(*mqtt_broker)
    client.subscribe("edgefleet/v1/+/events", qos=1)
    client.loop_start()
    yield client, got
    client.loop_stop()
    client.disconnect()


def _event(
    got: queue.Queue[Any], step: str, device_id: str, timeout_s: float = 60
) -> tuple[float, Any]:
    """The next ``step`` event of ``device_id`` (the broker is shared: other tests' devices
    publish events too)."""
    deadline = time.monotonic() + timeout_s
    while True:
        t, topic, payload = got.get(timeout=max(0.1, deadline - time.monotonic()))
        if payload and payload.get("step") == step and topic.split("/")[2] == device_id:
            return t, payload


def _committed(cp: ControlPlane, device_id: str, version: str) -> Callable[[], bool]:
    def probe() -> bool:
        m = _api_view(cp, device_id)
        return m.get("active_version") == version and m.get("phase") == "committed"

    return probe


def test_every_rollback_shows_in_the_operators_view_within_a_report_interval(
    cp: ControlPlane,
    tmp_path: Path,
    digits_path: Path,
    digits: DigitsData,
    mqtt_broker: tuple[str, int],
    watcher: tuple[mqtt.Client, queue.Queue[Any]],
) -> None:
    client, got = watcher
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    cp.push(
        models.shifted(digits_path, tmp_path / "v2.onnx", 5.0), cal, name="digits", version="2.0.0"
    )
    dim = tmp_path / "cal-dim.npz"  # 3.0.0 errors on bright inputs: build it on dim ones
    np.savez(dim, input=digits.x_train[:64] * 0.7)
    cp.push(models.erroring(digits_path, tmp_path / "v3.onnx"), dim, name="digits", version="3.0.0")
    cp.push(
        models.shifted(digits_path, tmp_path / "v4.onnx", 7.0), cal, name="digits", version="4.0.0"
    )
    edgectl = Operator(cp.url, tmp_path)
    root = cp.root_json(tmp_path / "root.json")
    config = _config(
        tmp_path / "agent.toml", tmp_path / "state", cp.url, root, mqtt_broker, name="truth"
    )
    agent = Agent(config, tmp_path / "agent.log").start()
    figures: dict[str, float] = {}
    try:
        with cp.admin() as admin:
            devices = _wait("enrollment", lambda: admin.get("/v1/devices").json())
        device_id = devices[0]["id"]
        cp.deploy("digits", "1.0.0", device_id)
        _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))
        cp.deploy("digits", "2.0.0", device_id)
        _wait("2.0.0 committed", _committed(cp, device_id, "2.0.0"))

        # 1. The control plane's rollback command, after the commit (an operator's abort).
        command = {
            "schema_version": 1,
            "id": uuid.uuid4().hex,
            "issued_at": datetime.now(timezone.utc).isoformat(),
            "command": "rollback",
            "model": "digits",
        }
        t0 = time.time()
        client.publish(f"edgefleet/v1/{device_id}/cmd", json.dumps(command), qos=1)
        t_event, _ = _event(got, "rolled_back", device_id)
        _wait(
            "the rollback in the view",
            lambda: _api_view(cp, device_id).get("active_version") == "1.0.0",
            every_s=0.02,
        )
        figures["command"] = time.time() - t_event
        figures["command_from_publish"] = time.time() - t0
        view = _view(edgectl, device_id)
        assert (view["active_version"], view["phase"]) == ("1.0.0", "rolled_back"), view
        assert view["last_error"] == "rejected: rolled back: requested by the control plane"
        assert agent.events("rollback_command_failed") == []
        time.sleep(3 * POLL_S)  # the desired state still says 2.0.0: refused, not retried
        assert _api_view(cp, device_id)["active_version"] == "1.0.0"
        assert len(agent.events("rejected_version_refused")) == 1  # said once

        # The operator offers it again on purpose: applied.
        edgectl("devices", "retry", device_id, "digits")
        _wait("2.0.0 committed again", _committed(cp, device_id, "2.0.0"))

        # 2. A probation verdict: 3.0.0 errors on the loop's frames.
        cp.deploy("digits", "3.0.0", device_id)
        t_event, event = _event(got, "rolled_back", device_id)
        assert event["from_version"] == "3.0.0"
        _wait(
            "the probation rollback in the view",
            lambda: _api_view(cp, device_id).get("active_version") == "2.0.0",
            every_s=0.02,
        )
        figures["probation"] = time.time() - t_event
        view = _view(edgectl, device_id)
        assert (view["phase"], view["target_version"]) == ("rolled_back", "3.0.0"), view
        assert view["last_error"].startswith("rejected: rolled back: error rate")

        # 3. Boot recovery: 4.0.0 crashes the process twice while on probation.
        cp.deploy("digits", "4.0.0", device_id)
        _wait(
            "4.0.0 on probation",
            lambda: (
                _api_view(cp, device_id).get("phase") == "probation"
                and _api_view(cp, device_id).get("active_version") == "4.0.0"
            ),
            every_s=0.02,
        )
        for starts in (2, 3):
            agent.kill()  # during probation
            agent.start()
            if starts == 2:  # this start counted a boot on probation: crash again
                _wait("a restart", lambda: len(agent.events("daemon_started")) >= 2, every_s=0.02)
        resolved = _wait("boot recovery", lambda: agent.events("update_resolved_at_boot"))
        _wait(
            "the boot rollback in the view",
            lambda: _api_view(cp, device_id).get("active_version") == "2.0.0",
            every_s=0.02,
        )
        at = datetime.fromisoformat(resolved[-1]["timestamp"].replace("Z", "+00:00"))
        figures["boot"] = time.time() - at.timestamp()
        view = _view(edgectl, device_id)
        assert (view["phase"], view["target_version"]) == ("rolled_back", "4.0.0"), view
        assert "crash loop" in view["last_error"]
    finally:
        agent.stop()
    print(  # the figures of this run (pytest -s)
        "rollback -> operator's view (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
        + f"; report interval {POLL_S} s"
    )
    # The command and the verdict are reported at once; a boot's report waits for the daemon to
    # come up (loading its models) before its first poll.
    assert figures["command"] <= 2 * POLL_S
    assert figures["probation"] <= 2 * POLL_S
    assert figures["boot"] <= 2 * POLL_S + 5


def _flat_model(path: Path) -> Path:
    """A model with a 2-D input: no frame fits it."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 10], np.ones(640, np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _install(state_dir: Path, work: Path, name: str, model: Path, golden: dict[str, Any]) -> None:
    bundle = work / f"{name}-bundle"
    build_bundle(bundle, name, "1.0.0", [VariantSpec(model)], golden_inputs=[golden])
    store = ModelStore(state_dir)
    store.install(bundle)
    store.activate(name, "1.0.0")


def _notes(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


def test_a_dead_camera_and_a_wrong_shape_model_are_reported_while_running(
    cp: ControlPlane,
    tmp_path: Path,
    digits_path: Path,
    mqtt_broker: tuple[str, int],
    watcher: tuple[mqtt.Client, queue.Queue[Any]],
) -> None:
    _client, got = watcher
    state = tmp_path / "state"
    _install(state, tmp_path, "digits", digits_path, {"input": np.zeros((1, 1, 8, 8), np.float32)})
    _install(
        state,
        tmp_path,
        "flat",
        _flat_model(tmp_path / "flat.onnx"),
        {"x": np.zeros((1, 64), np.float32)},
    )
    root = cp.root_json(tmp_path / "root.json")
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "400000"}
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    missing = tmp_path / "camera-0.mp4"  # the camera's stream file that never appears
    config = _config(
        tmp_path / "agent.toml",
        state,
        cp.url,
        root,
        mqtt_broker,
        name="eyes",
        models_=("digits", "flat", "ghost"),
        loop=f'source = "video"\nsource_path = "{missing}"',
        api_port=port,
    )
    agent = Agent(config, tmp_path / "agent.log", env).start()
    try:
        # A dead camera: every model's loop fails, and it is said everywhere while running.
        with cp.admin() as admin:
            devices = _wait("enrollment", lambda: admin.get("/v1/devices").json())
        device_id = devices[0]["id"]
        view = _wait(
            "the dead camera in the view",
            lambda: (m := _api_view(cp, device_id)).get("loop") == "failed" and m,
        )
        assert "video file not found" in view["loop_error"], view
        assert view["active_version"] == "1.0.0"
        ghost = _api_view(cp, device_id, "ghost")
        assert ghost["loop"] == "not_installed"
        assert "no version of it is installed" in ghost["loop_error"]
        _t, event = _event(got, "loop_failed", device_id)
        assert "video file not found" in event["reason"]
        with httpx.Client(base_url=api, timeout=10) as local:
            assert local.get("/v2/health/ready").status_code != 200
            assert local.get("/v2/models/digits/ready").status_code != 200
        notes = "\n".join(_notes(sock))
        assert "video file not found" in notes  # STATUS=
        time.sleep(1.0)
        _notes(sock)
        time.sleep(1.0)  # the loop stays dead: no more pings
        assert not any("WATCHDOG=1" in n for n in _notes(sock))
        assert agent.proc is not None
        assert agent.proc.poll() is None
    finally:
        agent.stop()

    # Frames that exist now, but one model's input does not fit them.
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), np.full((32, 32, 3), 40 * i, np.uint8))
    config = _config(
        tmp_path / "agent.toml",
        state,
        cp.url,
        root,
        mqtt_broker,
        name="eyes",
        models_=("digits", "flat", "ghost"),
        loop=f'source = "images"\nsource_path = "{frames}"',
        api_port=port,
    )
    _notes(sock)
    agent = Agent(config, tmp_path / "agent.log", env).start()
    try:
        view = _wait(
            "the wrong-shape model in the view",
            lambda: (
                (m := _api_view(cp, device_id, "flat")).get("loop") == "failed"
                and "cannot start" in (m.get("loop_error") or "")
                and _api_view(cp, device_id).get("loop") == "running"
                and m
            ),
        )
        assert "ConfigError" in view["loop_error"], view
        with httpx.Client(base_url=api, timeout=10) as local:
            _wait("the API up", lambda: _get_ok(local, "/v2/health/live"))
            assert local.get("/v2/models/digits/ready").status_code == 200
            assert local.get("/v2/models/flat/ready").status_code != 200
            assert local.get("/v2/health/ready").status_code != 200
        notes = "\n".join(_notes(sock))
        assert "flat: loop cannot start" in notes
    finally:
        agent.stop()
        sock.close()


def _get_ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False

"""``make demo`` end to end, Ctrl-C cleanup, and the demo's embedded MQTT broker.

The end-to-end run is the real thing in a short configuration (``EDGEFLEET_DEMO_FAST=1``):
broker, control plane, three agent processes, two real model versions built into variants, a
staged rollout with live swaps, and the summary. ``EDGEFLEET_SOAK=1`` runs the full-length demo.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties

from agent.config import load_settings
from demo.fleet import AGENTS, agent_config
from demo.procs import free_port, port_open

ROOT = Path(__file__).resolve().parents[1]


def _demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "EDGEFLEET_DEMO_DIR": str(tmp_path / "demo"), **extra}
    if os.environ.get("EDGEFLEET_SOAK") != "1":
        env["EDGEFLEET_DEMO_FAST"] = "1"
    return env


def _processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line or environment mentions ``text`` (the demo's
    directory: every child inherits ``EDGEFLEET_DEMO_DIR``)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc / "environ").read_bytes().decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            continue
        if (text in cmdline or text in environ) and "State:\tZ" not in status:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.fixture
def reap(tmp_path: Path) -> Iterator[None]:
    """Whatever a failed test leaves of the demo's processes is killed, by pid."""
    yield
    for line in _processes_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


@pytest.mark.alone
@pytest.mark.timeout(180)
@pytest.mark.usefixtures("reap")
def test_demo_rolls_out_v2_with_no_failed_or_dropped_inference(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "demo.fleet"],
        cwd=ROOT,
        env=_demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "OK: every device runs digits 1.1.0; 0 failed, 0 dropped" in out
    assert "broker: " in out
    assert "built digits 1.1.0: " in out
    assert "accepted" in out
    # Staged: one device first, then the rest (which one first is the rollout's hash).
    waves = re.findall(r"wave (\d): digits 1\.1\.0 to (.+)$", out, flags=re.MULTILINE)
    assert [w[0] for w in waves] == ["1", "2"], out[-3000:]
    first, second = (set(w[1].split(", ")) for w in waves)
    assert len(first) == 1
    assert first | second == {name for name, _ in AGENTS}
    summary = out[out.index("Summary") :]
    for name, _labels in AGENTS:
        row = next(line for line in summary.splitlines() if name in line)
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells[1] == "1.1.0", row
        assert "1.0.0: " in cells[2], row  # it served v1.0.0 before the swap ...
        assert "1.1.0: " in cells[2], row  # ... and v1.1.0 after it
        assert cells[3:5] == ["0", "0"], row  # none failed; none dropped across the rollout
        assert cells[5].isdigit(), row  # dropped while the fleet booted: shown, not judged
    # Every agent's summary came from its own process, and nothing is left running.
    for name, _labels in AGENTS:
        assert (tmp_path / "demo" / "logs" / f"{name}.out").read_text().count('"stopped"') == 1
    assert _processes_mentioning(str(tmp_path)) == []


def _wait_for_line(stream: Iterator[str], needle: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        for line in stream:
            lines.append(line)
            if needle in line:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout_s), "".join(lines)[-3000:]
    return lines


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("reap")
def test_ctrl_c_stops_every_child_process(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "demo.fleet"],
        cwd=ROOT,
        env=_demo_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        _wait_for_line(process.stdout, "started 3 agents", 90)
        assert len(_processes_mentioning(str(tmp_path))) >= 4  # control plane and 3 agents
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.terminate()  # the demo stops its children on SIGTERM too
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
    deadline = time.monotonic() + 5
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(tmp_path)) == []


def test_agent_config_is_valid_agent_settings(tmp_path: Path) -> None:
    text = agent_config(
        {
            "device_id": "robot-a",
            "state_dir": str(tmp_path / 'state "quoted"'),
            "models": [{"name": "digits"}],
            "loop": {"source": "synthetic", "rate_hz": 20.0, "window_s": 1.0},
            "control_plane": {"url": "http://127.0.0.1:1", "labels": {"fleet": "demo"}},
            "api": {"enabled": False},
        }
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    settings = load_settings(path)
    assert settings.state_dir == tmp_path / 'state "quoted"'
    assert settings.loop.rate_hz == 20.0
    assert settings.control_plane.labels == {"fleet": "demo"}
    assert settings.api.enabled is False
    assert [m.name for m in settings.models] == ["digits"]


# -- the embedded broker ------------------------------------------------------------------------


@pytest.fixture
def embedded_broker() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "demo.broker", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not port_open("127.0.0.1", port):
            assert process.poll() is None, "the embedded broker exited"
            assert time.monotonic() < deadline, "the embedded broker does not listen"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


class _Client:
    def __init__(self, port: int, client_id: str, protocol: MQTTProtocolVersion) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.got = threading.Condition()
        self.paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.paho.on_message = self._on_message
        self.port = port

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.got:
            self.messages.append(msg)
            self.got.notify_all()

    def start(self) -> _Client:
        self.paho.connect("127.0.0.1", self.port, keepalive=10)
        self.paho.loop_start()
        return self

    def wait(self, n: int, timeout_s: float = 5.0) -> list[mqtt.MQTTMessage]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.messages) >= n, timeout_s), self.messages
            return list(self.messages)

    def stop(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def test_embedded_broker_routes_mqtt5_and_311(embedded_broker: int) -> None:
    v5, v311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
    device = _Client(embedded_broker, "robot-1", v5)
    device.paho.will_set("fleet/robot-1/state", b"offline", qos=1, retain=True)
    device.start()
    props = Properties(3)  # PUBLISH
    props.ContentType = "application/json"
    device.paho.publish("fleet/robot-1/state", b"online", qos=1, retain=True).wait_for_publish(5)

    dashboard = _Client(embedded_broker, "dashboard", v5).start()
    legacy = _Client(embedded_broker, "legacy", v311).start()
    dashboard.paho.subscribe("fleet/+/state", qos=1)
    legacy.paho.subscribe("fleet/#", qos=0)
    retained = dashboard.wait(1)[0]
    assert (retained.topic, retained.payload, retained.retain) == (
        "fleet/robot-1/state",
        b"online",
        True,
    )
    legacy.wait(1)

    device.paho.publish("fleet/robot-1/telemetry", b"{}", qos=1, properties=props)
    telemetry = legacy.wait(2)[1]
    assert (telemetry.topic, telemetry.payload, telemetry.retain) == (
        "fleet/robot-1/telemetry",
        b"{}",
        False,
    )
    # The dashboard's filter does not match telemetry; it sees only state.
    time.sleep(0.2)
    assert [m.topic for m in dashboard.messages] == ["fleet/robot-1/state"]

    # An abrupt drop publishes the last will, retained for later subscribers too.
    device.paho.loop_stop()
    sock = device.paho.socket()
    assert sock is not None
    sock.close()
    will = dashboard.wait(2)[1]
    assert (will.topic, will.payload) == ("fleet/robot-1/state", b"offline")
    late = _Client(embedded_broker, "late", v5).start()
    late.paho.subscribe("fleet/robot-1/state", qos=1)
    assert late.wait(1)[0].payload == b"offline"

    # A clean DISCONNECT sends no will.
    polite = _Client(embedded_broker, "polite", v5)
    polite.paho.will_set("fleet/polite/state", b"gone", qos=1, retain=False)
    polite.start()
    time.sleep(0.2)
    polite.stop()
    time.sleep(0.3)
    assert all(m.topic != "fleet/polite/state" for m in legacy.messages)
    for c in (dashboard, legacy, late):
        c.stop()

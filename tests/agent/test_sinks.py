"""Result sinks: a daemon and ``edge-agent run`` publishing postprocessed results of the real
digits CNN to a JSON lines file and to the real Mosquitto at once, and the MQTT sink's bounds
(rate, size, a queue that drops its oldest) with the broker away: the loop never waits."""

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image
from pydantic import TypeAdapter

from agent.config import MqttConfig
from agent.contracts.results import (
    Box,
    Classification,
    ClassificationMessage,
    ClassScore,
    Custom,
    Detection,
    RawOutputs,
    ResultMessage,
)
from agent.sinks import LoopResult, MqttResultSink
from agent.telemetry import TelemetryClient
from tests.agent.telemetry.conftest import Broker, Subscriber, subscribe

ROOT = Path(__file__).resolve().parents[2]
MESSAGES: TypeAdapter[Any] = TypeAdapter(ResultMessage)
LABELS = [f"digit-{i}" for i in range(10)]


def _result(seq: int, size: int = 1) -> LoopResult:
    body = RawOutputs(outputs={"y" * size: {"shape": [1]}})  # type: ignore[dict-item]
    return LoopResult("m", seq, 1.0, 0.5, body)


@pytest.mark.parametrize(
    "body",
    [
        RawOutputs(outputs={"y": {"shape": [1, 10], "argmax": 3, "max": 2.5}}),  # type: ignore[dict-item]
        Classification(output="y", classes=[ClassScore(index=3, label="three", score=0.75)]),
        Detection(
            output="maps",
            width=64,
            height=32,
            boxes=[Box(x0=1.5, y0=2, x1=10, y1=12.25, score=0.9, label="text")],
        ),
        Custom(name="team", data={"best": 3, "nested": {"ok": True}}),
    ],
)
def test_one_message_per_result_whatever_its_kind(body: Any) -> None:
    result = LoopResult("digits", 7, 1763930000.1234567, 0.12345678, body)
    payload = result.json_bytes()
    assert payload is result.json_bytes()  # serialized once, for every sink
    assert json.loads(payload) == result.fields()
    message = MESSAGES.validate_json(payload)
    assert (message.model, message.seq, message.kind) == ("digits", 7, body.kind)
    assert (message.ts, message.latency_ms) == (1763930000.123457, 0.1235)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_the_queue_drops_its_oldest_and_drains_in_order() -> None:
    sink = MqttResultSink(queue_size=3, max_rate_hz=1000)
    for seq in range(1, 6):
        sink.publish(_result(seq))
    assert (sink.counters.queued, sink.counters.dropped_full, sink.pending()) == (5, 2, 3)
    sent: list[int] = []
    assert sink.drain(lambda p: sent.append(json.loads(p)["seq"]) is None, limit=2) == 2
    assert sent == [3, 4]
    assert sink.drain(lambda p: False) == 0  # not connected: it stays queued
    assert sink.pending() == 1
    assert sink.drain(lambda p: sent.append(json.loads(p)["seq"]) is None) == 1
    assert sent == [3, 4, 5]
    assert sink.counters.sent == 3


def test_rate_and_size_caps() -> None:
    clock = _Clock()
    sink = MqttResultSink(max_rate_hz=2, max_bytes=300, queue_size=100, clock=clock)
    for seq in range(1, 11):  # ten at once: a second's worth (two) passes
        sink.publish(_result(seq))
    assert (sink.counters.queued, sink.counters.dropped_rate) == (2, 8)
    clock.t += 1.0  # two more tokens
    sink.publish(_result(11, size=400))  # over max_bytes: dropped, but it took its token
    sink.publish(_result(12))
    sink.publish(_result(13))
    c = sink.counters
    assert (c.queued, c.dropped_rate, c.dropped_size, c.dropped) == (3, 9, 1, 10)


def test_a_connection_that_refuses_a_payload_drops_only_that_one() -> None:
    sink = MqttResultSink(queue_size=4)
    for seq in (1, 2):
        sink.publish(_result(seq))

    def refuse(payload: bytes) -> bool:
        raise ValueError("payload too large for the broker")

    assert sink.drain(refuse) == 0
    assert (sink.counters.send_failed, sink.pending()) == (2, 0)


__all__ = ["subscribe"]  # the telemetry tests' fixture, used here too


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto with the shipped ACL (deploy/mosquitto/acl) and password users."""
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    for user in ("dev-a", "dev-b", "dashboard"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"{user}-pw"], check=True)
    acl = ROOT / "deploy" / "mosquitto" / "acl"
    broker = Broker(
        tmp_path, extra_config=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.mark.broker
def test_results_go_on_the_devices_own_connection_and_topic_under_the_acl(
    acl_broker: Broker, state_dir: Path, subscribe: Any
) -> None:
    port = acl_broker.port
    dashboard: Subscriber = subscribe(
        port, "edgefleet/v1/+/results", username="dashboard", password="dashboard-pw"
    )
    sink = MqttResultSink(queue_size=16)
    client = TelemetryClient(
        MqttConfig(host="127.0.0.1", port=port, username="dev-a", password="dev-a-pw"),
        device_id="dev-a",
        state_dir=state_dir,
        reconnect_min_s=0.05,
    )
    client.add_outlet(sink.drain)
    with client:
        assert client.wait_connected(10)
        for seq in (1, 2, 3):
            sink.publish(_result(seq))
        assert dashboard.wait_for(lambda d: len(d.payloads("dev-a/results")) == 3)
        # dev-b, authenticated as itself, cannot publish dev-a's results; its own topic works
        spy = subscribe(port, "edgefleet/v1/dev-b/results", username="dev-b", password="dev-b-pw")
        spy.client.publish("edgefleet/v1/dev-a/results", _result(99).json_bytes(), qos=1)
        spy.client.publish("edgefleet/v1/dev-b/results", _result(7).json_bytes(), qos=1)
        assert dashboard.wait_for(lambda d: len(d.payloads("dev-b/results")) == 1)
    assert [p["seq"] for p in dashboard.payloads("dev-a/results")] == [1, 2, 3]
    assert sink.counters.sent == 3


# -- real processes ------------------------------------------------------------------------


@pytest.fixture
def device_id() -> str:
    return f"sinks-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def results(mqtt_broker: tuple[str, int], device_id: str) -> Iterator[queue.Queue[bytes]]:
    """Every message on the device's results topic."""
    got: queue.Queue[bytes] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.put(msg.payload)
    client.connect(*mqtt_broker)
    client.subscribe(f"edgefleet/v1/{device_id}/results", qos=0)
    client.loop_start()
    yield got
    client.loop_stop()
    client.disconnect()


@pytest.fixture
def images(tmp_path: Path, digits: Any) -> tuple[Path, list[int]]:
    frames = np.rint(digits.x_test[:8, 0] * 255).astype(np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(np.stack([frame] * 3, axis=-1)).save(folder / f"{i:02d}.png")
    return folder, [int(y) for y in digits.y_test[:8]]


def _loop_toml(
    folder: Path, sink: Path, *, rate_hz: float, mqtt: str = "", repeat: bool = False
) -> str:
    return (
        f"[loop]\nrate_hz = {rate_hz}\nwindow_s = 0.5\n"
        f'[loop.source]\nkind = "images"\npath = "{folder}"\n'
        + ("repeat = true\n" if repeat else "")
        + f'[loop.postprocess]\nkind = "topk"\nk = 3\nlabels = {json.dumps(LABELS)}\n'
        f'[[loop.sinks]]\nkind = "jsonl"\npath = "{sink}"\n'
        f'[[loop.sinks]]\nkind = "mqtt"\n{mqtt}'
    )


def _messages(got: queue.Queue[bytes], n: int, timeout: float = 60.0) -> list[Any]:
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        out.append(MESSAGES.validate_json(got.get(timeout=max(0.1, deadline - time.monotonic()))))
    return out


def test_the_daemon_publishes_top_k_to_a_file_and_the_broker_at_once(
    tmp_path: Path,
    state_dir: Path,
    digits_path: Path,
    device_id: str,
    mqtt_broker: tuple[str, int],
    results: queue.Queue[bytes],
    images: tuple[Path, list[int]],
) -> None:
    from tests.agent.test_daemon_systemd import _install

    _install(
        state_dir, tmp_path, "digits", digits_path, {"input": np.zeros((1, 1, 8, 8), np.float32)}
    )
    folder, truth = images
    sink = tmp_path / "results.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{state_dir}"\nlog_json = true\n'
        '[[models]]\nname = "digits"\n[api]\nenabled = false\n[swap]\nwarmup_runs = 1\n'
        f'[mqtt]\nhost = "{mqtt_broker[0]}"\nport = {mqtt_broker[1]}\n'
        + _loop_toml(folder, sink, rate_hz=40)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            got = _messages(results, 16)
        except queue.Empty:
            proc.kill()
            pytest.fail(f"no results on the broker: {proc.communicate()[1][-3000:]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert all(isinstance(m, ClassificationMessage) for m in got)
    assert {(m.model, m.output, len(m.classes)) for m in got} == {("digits", "logits", 3)}
    for m in got:
        assert [c.label for c in m.classes] == [LABELS[c.index] for c in m.classes]
        assert m.classes[0].score >= m.classes[1].score >= m.classes[2].score
        assert 0 < sum(c.score for c in m.classes) <= 1 + 1e-6
    # the image folder repeats in name order: frame seq n is image (n - 1) % 8
    right = sum(m.classes[0].index == truth[(m.seq - 1) % 8] for m in got)
    assert right >= len(got) - 2
    # the file holds the same messages (each serialized once for every sink)
    lines = {json.loads(line)["seq"]: line for line in sink.read_text().splitlines()}
    for m in got:
        assert MESSAGES.validate_json(lines[m.seq]) == m


def test_a_postprocess_that_does_not_fit_the_served_model_stops_the_daemon_at_start(
    tmp_path: Path, state_dir: Path, digits_path: Path
) -> None:
    from agent.config import load_settings
    from agent.daemon import Daemon
    from agent.errors import ConfigError
    from tests.agent.test_daemon_systemd import _install

    _install(
        state_dir, tmp_path, "digits", digits_path, {"input": np.zeros((1, 1, 8, 8), np.float32)}
    )
    settings = load_settings(
        None,
        device_id="misfit",
        state_dir=state_dir,
        models=[{"name": "digits"}],
        api={"enabled": False},
        loop={
            "postprocess": {"kind": "topk", "labels": ["cat", "dog"]},
            "sinks": [{"kind": "jsonl", "path": str(tmp_path / "r.jsonl")}],
        },
    )
    daemon = Daemon(settings)
    with pytest.raises(ConfigError, match="model digits: postprocess topk: 2 labels for output"):
        daemon.start()
    daemon.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(config: Path, digits_path: Path, duration: float) -> tuple[dict[str, Any], list[Any]]:
    argv = ["run", "--config", str(config), "--model", str(digits_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", *argv, "--duration", str(duration)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.strip().splitlines()[-1])
    logs = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    return final, logs


def test_with_the_broker_away_the_loop_keeps_going_and_counts_its_drops(
    tmp_path: Path, digits_path: Path, images: tuple[Path, list[int]]
) -> None:
    folder, _ = images
    sink = tmp_path / "results.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "away"\nstate_dir = "{tmp_path / "state"}"\nlog_json = true\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {_closed_port()}\n'
        + _loop_toml(
            folder, sink, rate_hz=100, mqtt="queue_size = 4\nmax_rate_hz = 1000\n", repeat=True
        )
    )
    final, logs = _run(config, digits_path, duration=1.5)
    count = final["total_count"]
    assert final["total_failed"] == 0
    assert count > 20  # the loop ran on while nothing could be sent
    assert len(sink.read_text().splitlines()) == count  # the other sink got every result
    closed = next(e for e in logs if e["event"] == "mqtt_results_closed")
    assert (closed["queued"], closed["sent"], closed["pending"]) == (count, 0, 4)
    assert closed["dropped"] == count - 4  # the oldest went first, each one counted
    drops = [e for e in logs if e["event"] == "mqtt_results_dropped"]
    assert drops  # said once per window, not per result
    assert drops[-1]["total_dropped"] <= count - 4
    assert sum(e["dropped"] for e in drops) == drops[-1]["total_dropped"]


def test_edge_agent_run_publishes_on_a_connection_of_its_own(
    tmp_path: Path,
    digits_path: Path,
    device_id: str,
    mqtt_broker: tuple[str, int],
    results: queue.Queue[bytes],
    images: tuple[Path, list[int]],
) -> None:
    folder, _ = images
    sink = tmp_path / "results.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{tmp_path / "state"}"\nlog_json = true\n'
        f'[mqtt]\nhost = "{mqtt_broker[0]}"\nport = {mqtt_broker[1]}\n'
        + _loop_toml(folder, sink, rate_hz=50)
    )
    final, _ = _run(config, digits_path, duration=1.5)
    # edge-agent run stops at the end of an image folder: 8 frames
    assert (final["total_count"], final["total_failed"]) == (8, 0)
    got = _messages(results, 8, timeout=10)
    assert sorted(m.seq for m in got) == list(range(1, 9))
    assert [json.loads(line)["seq"] for line in sink.read_text().splitlines()] == list(range(1, 9))

"""A running daemon on the real broker: retained birth naming what it serves, telemetry from
its inference loop, commands, and a retained "offline" when it stops."""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.config import load_settings
from agent.contracts.sketch import LatencySketch, quantile
from agent.daemon import Daemon
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.store import ModelStore

pytestmark = pytest.mark.broker


@pytest.fixture
def device_id() -> str:
    return f"daemon-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def watcher(mqtt_broker: tuple[str, int], device_id: str) -> Iterator[queue.Queue[tuple[str, Any]]]:
    """Every message on the device's topics, decoded."""
    got: queue.Queue[tuple[str, Any]] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.put(
        (msg.topic.rsplit("/", 1)[1], json.loads(msg.payload))
    )
    client.connect(*mqtt_broker)
    client.subscribe(f"edgefleet/v1/{device_id}/#", qos=1)
    client.loop_start()
    yield got
    client.loop_stop()
    client.disconnect()


def _next(got: queue.Queue[tuple[str, Any]], kind: str, pred: Any = lambda _p: True) -> Any:
    while True:
        topic, payload = got.get(timeout=15)
        if topic == kind and pred(payload):
            return payload


def test_birth_telemetry_and_offline(
    tmp_path: Path,
    state_dir: Path,
    digits_path: Path,
    device_id: str,
    mqtt_broker: tuple[str, int],
    watcher: queue.Queue[tuple[str, Any]],
) -> None:
    build_bundle(
        tmp_path / "b",
        "digits",
        "1.0.0",
        [VariantSpec(digits_path)],
        golden_inputs=[{"input": np.zeros((1, 1, 8, 8), np.float32)}],
    )
    store = ModelStore(state_dir)
    store.install(tmp_path / "b")
    store.activate("digits", "1.0.0")
    settings = load_settings(
        None,
        device_id=device_id,
        state_dir=state_dir,
        models=[{"name": "digits"}],
        api={"enabled": False},
        loop={"rate_hz": 100, "window_s": 0.5},
        mqtt={"host": mqtt_broker[0], "port": mqtt_broker[1], "telemetry_interval_s": 0.5},
    )
    daemon = Daemon(settings)
    daemon.start()
    try:
        birth = _next(watcher, "state", lambda p: p["status"] == "online")
        assert [(m["name"], m["version"], m["backend"]) for m in birth["models"]] == [
            ("digits", "1.0.0", "onnxruntime")
        ]
        assert len(birth["models"][0]["digest"]) == 64
        assert birth["profile"]["arch"]
        report = _next(watcher, "telemetry", lambda p: any(m["count"] for m in p["models"]))
        digits = next(m for m in report["models"] if m["name"] == "digits")
        assert digits["version"] == "1.0.0"
        assert digits["failed"] == 0
        assert digits["latency_p50_ms"] > 0
        # the window's latencies as a mergeable sketch: what fleet percentiles are read from
        sketch = LatencySketch.model_validate(digits["latency_sketch"])
        assert sketch.count == pytest.approx(digits["count"] - digits["failed"])
        p50 = quantile(sketch.as_counts(), 0.5, zero_count=sketch.zero_count)
        assert p50 == pytest.approx(digits["latency_p50_ms"], rel=0.25)
        assert report["system"]["memory_total_bytes"] > 0
    finally:
        daemon.stop()
    offline = _next(watcher, "state", lambda p: p["status"] == "offline")
    assert offline["reason"] == "shutdown"

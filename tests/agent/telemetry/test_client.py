"""The MQTT link against the real Mosquitto on 127.0.0.1:1883 (and a private one for outages)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.config import MqttConfig
from agent.contracts.events import UpdateEvent
from agent.contracts.profile import CpuInfo, HardwareProfile
from agent.contracts.telemetry import (
    Command,
    ModelTelemetry,
    RollbackCommand,
    SlotIdentity,
    StatePayload,
    TelemetryPayload,
)
from agent.errors import ConfigError, TelemetryError
from agent.events import EventBus
from agent.telemetry import SystemMetricsCollector, TelemetryClient
from tests.agent.telemetry.conftest import Broker, Subscriber

pytestmark = pytest.mark.broker

PROFILE = HardwareProfile(
    arch="x86_64", os="linux", python="3.11", cpu=CpuInfo(cores=2), memory_bytes=1 << 30
)
SLOT = SlotIdentity(
    name="detector", version="1.2.0", variant_id="onnx-int8", backend="onnxruntime", digest="a" * 64
)


def make_client(
    port: int,
    device_id: str,
    state_dir: Path,
    *,
    interval_s: float = 60.0,
    spool_max_bytes: int = 1 << 20,
    **kw: Any,
) -> TelemetryClient:
    config = MqttConfig(
        host="127.0.0.1",
        port=port,
        telemetry_interval_s=interval_s,
        spool_max_bytes=spool_max_bytes,
    )
    kw.setdefault("slots", lambda: [SLOT])
    kw.setdefault("profile", PROFILE)
    return TelemetryClient(
        config,
        device_id=device_id,
        state_dir=state_dir,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
        keepalive_s=5,
        **kw,
    )


def event(device_id: str, seq: int) -> UpdateEvent:
    return UpdateEvent(
        device_id=device_id,
        seq=seq,
        ts=datetime.now(timezone.utc),
        model="detector",
        version="1.2.0",
        step="committed",
    )


def seqs(sub: Subscriber) -> list[int]:
    return [p["seq"] for p in sub.payloads("/events")]


def command(**fields: Any) -> bytes:
    body = {"id": "c1", "issued_at": "2025-01-01T00:00:00Z", "command": "check-update"}
    body.update(fields)
    return json.dumps(body).encode()


def test_birth_is_retained_and_last_will_marks_offline(
    mqtt_broker: tuple[str, int],
    device_id: str,
    state_dir: Path,
    subscribe: Callable[..., Subscriber],
) -> None:
    port = mqtt_broker[1]
    early = subscribe(port, f"edgefleet/v1/{device_id}/state")
    client = make_client(port, device_id, state_dir)
    client.start()
    try:
        assert early.wait_for(lambda s: len(s.payloads("/state")) >= 1)
        # A subscriber that arrives later still gets the birth: it is retained.
        late = subscribe(port, f"edgefleet/v1/{device_id}/state")
        assert late.wait_for(lambda s: len(s.payloads("/state")) >= 1)
        birth = StatePayload.model_validate(late.payloads("/state")[0])
        assert late.messages[0].retain
        assert birth.status == "online"
        assert birth.models == (SLOT,)
        assert birth.profile == PROFILE
        assert birth.agent_version

        # Sever the TCP connection without DISCONNECT: the broker publishes the last will.
        sock = client._paho.socket() if client._paho else None
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        assert late.wait_for(
            lambda s: (
                [p["status"] for p in s.payloads("/state")][:3] == ["online", "offline", "online"]
            )
        ), late.payloads("/state")
        will = StatePayload.model_validate(late.payloads("/state")[1])
        assert will.reason == "connection_lost"
        assert client.counters().connects == 2
    finally:
        client.stop()
    # A clean stop leaves a retained "offline" for anyone who looks later.
    after = subscribe(port, f"edgefleet/v1/{device_id}/state")
    assert after.wait_for(lambda s: len(s.payloads("/state")) >= 1)
    final = after.payloads("/state")[-1]
    assert (final["status"], final["reason"]) == ("offline", "shutdown")
    after.client.publish(f"edgefleet/v1/{device_id}/state", b"", retain=True)  # tidy the broker


def test_telemetry_is_periodic_and_carries_window_and_system(
    mqtt_broker: tuple[str, int],
    device_id: str,
    state_dir: Path,
    subscribe: Callable[..., Subscriber],
) -> None:
    port = mqtt_broker[1]
    sub = subscribe(port, f"edgefleet/v1/{device_id}/telemetry")
    stats = ModelTelemetry(
        name="detector",
        version="1.2.0",
        window_s=0.1,
        count=10,
        failed=1,
        dropped=2,
        throughput_per_s=90.0,
        latency_p50_ms=5.0,
        latency_p95_ms=7.0,
        latency_p99_ms=9.0,
    )
    client = make_client(
        port,
        device_id,
        state_dir,
        interval_s=0.1,
        model_stats=lambda: [stats],
        system_metrics=SystemMetricsCollector(use_nvml=False).collect,
    )
    with client:
        assert sub.wait_for(lambda s: len(s.payloads("/telemetry")) >= 3)
    received = [TelemetryPayload.model_validate(p) for p in sub.payloads("/telemetry")]
    assert [t.seq for t in received] == list(range(len(received)))
    assert received[0].models == (stats,)
    assert received[0].system.memory_total_bytes
    assert received[0].system.memory_total_bytes > 0
    assert all(m.qos == 0 and not m.retain for m in sub.messages)
    assert client.counters().telemetry_delivered >= 3
    assert client.spool.counters().telemetry_dropped == 0  # counters outlive the closed spool


def test_events_from_the_bus_arrive_in_order_at_qos1(
    mqtt_broker: tuple[str, int],
    device_id: str,
    state_dir: Path,
    subscribe: Callable[..., Subscriber],
) -> None:
    port = mqtt_broker[1]
    sub = subscribe(port, f"edgefleet/v1/{device_id}/events")
    bus = EventBus(device_id)
    client = make_client(port, device_id, state_dir)
    bus.subscribe(client.publish_event)
    with client:
        assert client.wait_connected(10)
        for i in range(50):
            bus.emit("download_started" if i % 2 else "committed", model="detector", version=str(i))
        assert sub.wait_for(lambda s: len(seqs(s)) >= 50)
        assert seqs(sub) == list(range(1, 51))
        assert all(m.qos == 1 for m in sub.messages)
        assert sub.wait_for(lambda s: len(client.spool) == 0)  # removed only after PUBACK
        assert client.counters().events_delivered == 50


def test_event_for_another_device_is_refused_and_not_spooled(
    device_id: str, state_dir: Path
) -> None:
    client = make_client(1, device_id, state_dir)
    with pytest.raises(TelemetryError, match="event for device 'other'"):
        client.publish_event(event("other", 1))
    assert len(client.spool) == 0
    client.stop()


def test_commands_are_dispatched_and_bad_ones_counted(
    mqtt_broker: tuple[str, int],
    device_id: str,
    state_dir: Path,
    subscribe: Callable[..., Subscriber],
) -> None:
    port = mqtt_broker[1]
    got: list[Command] = []
    done = threading.Event()
    client = make_client(port, device_id, state_dir)
    client.on_command("check-update", got.append)
    client.on_command("rollback", lambda c: (got.append(c), done.set()))

    def boom(_: Command) -> None:
        raise RuntimeError("handler bug")

    topic = f"edgefleet/v1/{device_id}/cmd"
    with client, structlog.testing.capture_logs() as logs:
        assert client.wait_connected(10)
        # commands go out once the broker has granted the device's subscription: one sent
        # between CONNACK and SUBACK is not delivered (this test's old race under load)
        assert client.wait_commands_ready(10)
        control = subscribe(port, topic)  # also our publisher towards the device
        pub = control.client.publish
        pub(topic, command(), qos=1)
        pub(topic, command(), qos=1)  # same id: a redelivery, handled once
        pub(topic, b"{not json", qos=1)
        pub(topic, command(id="c2", command="reboot"), qos=1)  # unknown command
        pub(topic, command(id="c3", command="rollback"), qos=1)  # rollback without model
        pub(topic, command(id="c4", pad="x" * 20_000), qos=1)  # oversized
        pub(topic, b"\xff\xfe\x00", qos=1)  # not UTF-8
        pub(topic, command(id="c5", command="rollback", model="detector"), qos=1)
        assert done.wait(10)
        assert control.wait_for(lambda s: client.counters().commands_rejected >= 5)
        client.on_command("check-update", boom)
        pub(topic, command(id="c6"), qos=1)
        pub(topic, command(id="c7", command="rollback", model="detector", rollout_id="r1"), qos=1)
        assert control.wait_for(lambda s: client.counters().commands_handled >= 3)
        # Still connected and serving after all of that.
        assert client.connected
    counters = client.counters()
    assert [c.id for c in got] == ["c1", "c5", "c7"]
    assert isinstance(got[1], RollbackCommand)
    assert got[1].model == "detector"
    assert counters.commands_duplicate == 1
    assert counters.commands_rejected == 5
    assert counters.commands_failed == 1
    assert counters.commands_handled == 3
    reasons = [e.get("reason", "") for e in logs if e["event"] == "command_rejected"]
    assert any("exceeds" in r for r in reasons)
    assert any("malformed command" in r for r in reasons)


def test_retained_command_is_not_replayed(
    mqtt_broker: tuple[str, int],
    device_id: str,
    state_dir: Path,
    subscribe: Callable[..., Subscriber],
) -> None:
    port = mqtt_broker[1]
    topic = f"edgefleet/v1/{device_id}/cmd"
    control = subscribe(port, topic)
    control.client.publish(topic, command(id="r1"), qos=1, retain=True).wait_for_publish(5)
    got: list[Command] = []
    client = make_client(port, device_id, state_dir)
    client.on_command("check-update", got.append)
    try:
        with client:
            assert control.wait_for(lambda s: client.counters().commands_rejected == 1)
        assert got == []
    finally:
        control.client.publish(topic, b"", retain=True).wait_for_publish(5)


def test_config_errors_are_clear(device_id: str, state_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.host is not set"):
        TelemetryClient(MqttConfig(), device_id=device_id, state_dir=state_dir)
    with pytest.raises(ConfigError, match="not topic-safe"):
        TelemetryClient(MqttConfig(host="h"), device_id="a/b", state_dir=state_dir)
    with pytest.raises(ConfigError, match=r"tls_ca: no such file"):
        TelemetryClient(
            MqttConfig(host="h", tls_ca=tmp_path / "nope.pem"),
            device_id=device_id,
            state_dir=state_dir,
        )
    assert not (state_dir / "spool").exists()  # nothing half-made


def test_broker_outage_mid_run_loses_no_event(
    tmp_path: Path, device_id: str, state_dir: Path, subscribe: Callable[..., Subscriber]
) -> None:
    broker = Broker(tmp_path)
    broker.start()
    gate = threading.Event()
    client = make_client(
        broker.port, device_id, state_dir, interval_s=0.05, reconnect_wait=lambda _: gate.wait()
    )
    try:
        sub = subscribe(broker.port, f"edgefleet/v1/{device_id}/#")
        client.start()
        assert client.wait_connected(10)
        for i in range(1, 11):
            client.publish_event(event(device_id, i))
        assert sub.wait_for(lambda s: len(seqs(s)) == 10)
        sub.close()

        broker.stop()  # outage: the client is held in backoff until the gate opens
        assert sub.wait_for(lambda s: not client.connected)
        first_offline = client.counters().telemetry_produced
        for i in range(11, 41):
            client.publish_event(event(device_id, i))
        assert sub.wait_for(lambda s: client.counters().telemetry_produced >= 15)
        produced_offline = client.counters().telemetry_produced

        broker.start()
        sub = subscribe(broker.port, f"edgefleet/v1/{device_id}/#")
        gate.set()
        assert client.wait_connected(10)
        assert sub.wait_for(lambda s: len(seqs(s)) >= 30)
        assert seqs(sub)[:30] == list(range(11, 41))  # none lost, in order
        telemetry = [p["seq"] for p in sub.payloads("/telemetry")]
        assert sub.wait_for(
            lambda s: (
                {p["seq"] for p in s.payloads("/telemetry")}
                >= set(range(first_offline, produced_offline))
            )
        )
        telemetry = [p["seq"] for p in sub.payloads("/telemetry")]
        assert telemetry == sorted(telemetry)  # in order, spooled and live alike
        assert client.spool.counters().telemetry_dropped == 0  # 1 MiB bound not reached
        assert client.counters().disconnects == 1
    finally:
        gate.set()
        client.stop()
        broker.stop()


def test_agent_restarted_while_offline_delivers_its_spool(
    tmp_path: Path, device_id: str, state_dir: Path, subscribe: Callable[..., Subscriber]
) -> None:
    broker = Broker(tmp_path)  # created, not started: the device boots into an outage
    gate = threading.Event()
    first = make_client(broker.port, device_id, state_dir, reconnect_wait=lambda _: gate.wait(0.05))
    first.start()
    for i in range(1, 21):
        first.publish_event(event(device_id, i))
    first.submit_telemetry()
    first.stop()  # the agent goes down with everything still spooled

    second = make_client(broker.port, device_id, state_dir, reconnect_wait=lambda _: gate.wait())
    assert len(second.spool) == 21
    second.start()
    try:
        broker.start()
        sub = subscribe(broker.port, f"edgefleet/v1/{device_id}/#")
        gate.set()
        assert sub.wait_for(lambda s: len(seqs(s)) >= 20 and len(s.payloads("/telemetry")) >= 1)
        assert seqs(sub)[:20] == list(range(1, 21))
        order = [
            m.topic.rsplit("/", 1)[1]
            for m in sub.messages
            if m.topic.endswith(("events", "telemetry"))
        ]
        assert order.index("telemetry") == 20  # spooled after the 20 events, delivered after them
        assert sub.wait_for(lambda s: len(second.spool) == 0)
    finally:
        gate.set()
        second.stop()
        broker.stop()

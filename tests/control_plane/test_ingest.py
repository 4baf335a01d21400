"""Telemetry ingestion through the real Mosquitto into SQLite and PostgreSQL.

Every test uses its own topic prefix, so the shared broker's other traffic never reaches the
ingester under test and its counters are exact.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import Engine, select, text

from agent.config import MqttConfig
from agent.contracts.events import UpdateEvent
from agent.contracts.telemetry import ModelTelemetry, SlotIdentity, TelemetryPayload
from agent.telemetry import TelemetryClient
from control_plane.db import make_engine, upgrade_database
from control_plane.errors import StorageError
from control_plane.ingest import (
    DeviceEventRow,
    DeviceLink,
    FleetLimits,
    FleetState,
    IngestOptions,
    MqttLink,
    Retention,
    TelemetryBucket,
    TelemetryIngester,
    TelemetryWriter,
)

pytestmark = pytest.mark.broker

FAST = IngestOptions(
    flush_interval_s=0.05,
    limits=FleetLimits(link_write_interval_s=0.1, bucket_write_interval_s=0.1),
)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    upgrade_database(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def prefix() -> str:
    return f"eftest-{uuid.uuid4().hex[:10]}/v1"


@pytest.fixture
def make_ingester(
    engine: Engine, mqtt_broker: tuple[str, int], prefix: str
) -> Iterator[Callable[..., TelemetryIngester]]:
    started: list[TelemetryIngester] = []

    def make(**kw: Any) -> TelemetryIngester:
        host, port = mqtt_broker
        link = MqttLink(
            host,
            port,
            client_id=f"cp-{uuid.uuid4().hex[:10]}",
            topic_prefix=prefix,
            session_expiry_s=0,
        )
        ingester = TelemetryIngester(link, engine, options=kw.pop("options", FAST), **kw)
        ingester.start()
        started.append(ingester)
        assert ingester.wait_subscribed(10), "ingester did not subscribe"
        return ingester

    yield make
    for ingester in started:
        ingester.stop()


class Publisher:
    """A raw MQTT client: publishes whatever bytes a test wants, where it wants."""

    def __init__(self, host: str, port: int) -> None:
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.connect(host, port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)


@pytest.fixture
def publisher(mqtt_broker: tuple[str, int]) -> Iterator[Publisher]:
    pub = Publisher(*mqtt_broker)
    yield pub
    pub.client.disconnect()
    pub.client.loop_stop()


def window(*, version: str = "1.0.0", p99: float = 12.0, count: int = 50) -> ModelTelemetry:
    return ModelTelemetry(
        name="detector",
        version=version,
        backend="onnxruntime",
        window_s=1.0,
        count=count,
        failed=1,
        dropped=0,
        throughput_per_s=float(count),
        latency_p50_ms=p99 / 2,
        latency_p95_ms=p99 * 0.9,
        latency_p99_ms=p99,
    )


def telemetry(device_id: str, seq: int, *, ts: datetime | None = None) -> bytes:
    payload = TelemetryPayload(
        device_id=device_id,
        seq=seq,
        ts=ts or datetime.now(timezone.utc),
        models=(window(),),
    )
    return payload.model_dump_json().encode()


def rows(engine: Engine, table: Any, device_id: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(table).where(table.device_id == device_id)))


def device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:12]}"


# -- the real agent client into the database ---------------------------------------------------


def test_agent_telemetry_state_and_events_reach_the_database(
    make_ingester: Callable[..., TelemetryIngester],
    engine: Engine,
    mqtt_broker: tuple[str, int],
    prefix: str,
    tmp_path: Path,
) -> None:
    ingester = make_ingester()
    dev = device_id()
    config = MqttConfig(
        host=mqtt_broker[0], port=mqtt_broker[1], topic_prefix=prefix, telemetry_interval_s=0.05
    )
    slot = SlotIdentity(name="detector", version="1.0.0", backend="onnxruntime")
    client = TelemetryClient(
        config,
        device_id=dev,
        state_dir=tmp_path,
        model_stats=lambda: [window()],
        slots=lambda: [slot],
        reconnect_min_s=0.05,
    )
    with client:
        assert client.wait_connected(10)
        client.publish_event(
            UpdateEvent(
                device_id=dev,
                seq=1,
                ts=datetime.now(timezone.utc),
                model="detector",
                version="1.1.0",
                from_version="1.0.0",
                step="committed",
            )
        )
        wait_until(lambda: ingester.counters().stored >= 6, what="telemetry stored")
    # The clean stop published the retained "offline" too.
    delivered = client.counters().telemetry_delivered
    wait_until(lambda: ingester.counters().received >= delivered + 3, what="birth, event, offline")
    assert ingester.sync()
    link = rows(engine, DeviceLink, dev)[0]
    assert link.status_reason == "shutdown"
    assert link.slots[0]["version"] == "1.0.0"  # the last will keeps the birth's models
    detector = link.models["detector"]
    assert detector["version"] == "1.0.0"
    assert detector["p99_ms"] == 12.0
    assert detector["health"]["inferences"] == 50 * detector["health"]["windows"]
    assert link.updates["detector"]["step"] == "committed"

    buckets = rows(engine, TelemetryBucket, dev)
    assert sum(b.windows for b in buckets) == delivered  # every window, in 1-minute buckets
    assert sum(b.inferences for b in buckets) == 50 * delivered
    assert {b.version for b in buckets} == {"1.0.0"}
    assert all(b.p99_weighted_sum / b.latency_weight == pytest.approx(12.0) for b in buckets)
    events = rows(engine, DeviceEventRow, dev)
    assert [(e.seq, e.step, e.version) for e in events] == [(1, "committed", "1.1.0")]

    c = ingester.counters()
    # birth + offline + one event + every telemetry message, and nothing dropped
    assert c.stored == c.received == delivered + 3
    assert (c.dropped_malformed, c.dropped_mismatch, c.duplicates, c.backlog) == (0, 0, 0, 0)


# -- bad input ---------------------------------------------------------------------------------


def test_malformed_and_oversized_payloads_are_counted_and_ignored(
    make_ingester: Callable[..., TelemetryIngester],
    engine: Engine,
    publisher: Publisher,
    prefix: str,
) -> None:
    ingester = make_ingester()
    good = json.loads(telemetry("x", 0))
    bad: dict[str, bytes] = {
        "not-json": b"{not json",
        "wrong-shape": json.dumps({"device_id": "?", "seq": "x"}).encode(),
        "naive-ts": json.dumps({**good, "ts": "2025-01-01T00:00:00"}).encode(),
        "nul-name": json.dumps(
            {**good, "models": [{**good["models"][0], "name": "det\u0000ector"}]}
        ).encode(),
        "long-name": json.dumps(
            {**good, "models": [{**good["models"][0], "name": "m" * 500}]}
        ).encode(),
        "binary": bytes(range(256)),
        # Pass the contract's bounds, but no column or JSON value can hold them:
        "infinite": json.dumps(
            {**good, "models": [{**good["models"][0], "throughput_per_s": float("inf")}]}
        ).encode(),
        "nan-temperature": json.dumps(
            {**good, "system": {"cpu_temperature_c": float("nan")}}
        ).encode(),
        "huge-count": json.dumps(
            {**good, "models": [{**good["models"][0], "count": 2**40, "failed": 0}]}
        ).encode(),
        "ts-out-of-range": json.dumps({**good, "ts": "0001-01-01T00:00:00+05:00"}).encode(),
    }
    devices = {name: device_id() for name in bad}
    for name, payload in bad.items():
        dev = devices[name]
        body = payload.replace(b'"x"', json.dumps(dev).encode())
        publisher.send(f"{prefix}/{dev}/telemetry", body)
    huge_dev = device_id()
    huge = json.loads(telemetry(huge_dev, 0))
    huge["models"][0]["backend"] = "x" * (70 * 1024)  # valid JSON, over the 64 KiB bound
    publisher.send(f"{prefix}/{huge_dev}/telemetry", json.dumps(huge))
    publisher.send(f"{prefix}/not a device/telemetry", telemetry("x", 0))  # id not topic-safe
    ok_dev = device_id()
    publisher.send(f"{prefix}/{ok_dev}/telemetry", telemetry(ok_dev, 0))

    wait_until(lambda: ingester.counters().received >= len(bad) + 3, what="all received")
    assert ingester.sync()
    c = ingester.counters()
    assert c.dropped_malformed == len(bad) + 1
    assert c.dropped_oversized == 1
    assert c.stored == 1
    for dev in [*devices.values(), huge_dev]:
        assert rows(engine, DeviceLink, dev) == []
        assert rows(engine, TelemetryBucket, dev) == []
    assert len(rows(engine, DeviceLink, ok_dev)) == 1
    assert len(rows(engine, TelemetryBucket, ok_dev)) == 1


def test_device_publishing_on_another_devices_topic_is_ignored(
    make_ingester: Callable[..., TelemetryIngester],
    engine: Engine,
    publisher: Publisher,
    prefix: str,
) -> None:
    ingester = make_ingester()
    victim, intruder = device_id(), device_id()
    publisher.send(f"{prefix}/{victim}/telemetry", telemetry(intruder, 0))
    forged_event = UpdateEvent(
        device_id=intruder, seq=1, ts=datetime.now(timezone.utc), model="m", step="failed"
    )
    publisher.send(f"{prefix}/{victim}/events", forged_event.model_dump_json())
    wait_until(lambda: ingester.counters().received >= 2)
    assert ingester.sync()
    c = ingester.counters()
    assert (c.dropped_mismatch, c.stored) == (2, 0)
    for dev in (victim, intruder):
        assert rows(engine, DeviceLink, dev) == []
        assert rows(engine, DeviceEventRow, dev) == []
        assert rows(engine, TelemetryBucket, dev) == []


def test_clock_skew_orders_by_receive_time_and_keeps_the_device_time(
    make_ingester: Callable[..., TelemetryIngester],
    engine: Engine,
    publisher: Publisher,
    prefix: str,
) -> None:
    ingester = make_ingester()
    ahead, behind = device_id(), device_id()
    day = timedelta(days=1)
    sent_at = datetime.now(timezone.utc)
    publisher.send(f"{prefix}/{ahead}/telemetry", telemetry(ahead, 0, ts=sent_at + day))
    publisher.send(f"{prefix}/{behind}/telemetry", telemetry(behind, 0, ts=sent_at - 400 * day))
    wait_until(lambda: ingester.counters().received >= 2)
    assert ingester.sync()
    for dev, offset in ((ahead, day), (behind, -400 * day)):
        link = rows(engine, DeviceLink, dev)[0]
        assert link.telemetry_device_ts == sent_at + offset  # kept as the device said
        assert abs((link.telemetry_received_at - sent_at).total_seconds()) < 30
        assert link.clock_skew_s == pytest.approx(offset.total_seconds(), abs=30)
        received = datetime.fromisoformat(link.models["detector"]["health"]["reported_at"])
        assert abs((received - sent_at).total_seconds()) < 30
        (bucket,) = rows(engine, TelemetryBucket, dev)
        assert (
            timedelta(0) <= link.telemetry_received_at - bucket.bucket_start < timedelta(minutes=1)
        )


def test_duplicates_after_reconnect_are_stored_once(
    make_ingester: Callable[..., TelemetryIngester],
    engine: Engine,
    publisher: Publisher,
    prefix: str,
) -> None:
    dev = device_id()
    ts = datetime.now(timezone.utc)
    events = [
        UpdateEvent(device_id=dev, seq=s, ts=ts + timedelta(seconds=s), model="m", step=step)
        .model_dump_json()
        .encode()
        for s, step in ((1, "download_started"), (2, "swapped"), (3, "committed"))
    ]
    topic = f"{prefix}/{dev}/events"
    ingester = make_ingester()
    for payload in events + events:  # a spool replay after a lost PUBACK repeats them all
        publisher.send(topic, payload)
    publisher.send(f"{prefix}/{dev}/telemetry", telemetry(dev, 7, ts=ts))
    publisher.send(f"{prefix}/{dev}/telemetry", telemetry(dev, 7, ts=ts))
    wait_until(lambda: ingester.counters().received >= 8)
    assert ingester.sync()
    c = ingester.counters()
    assert (c.duplicates, c.events_stored) == (4, 3)
    ingester.stop()

    # A restarted control plane has no memory of them: the table's unique key catches them.
    again = make_ingester()
    for payload in events:
        publisher.send(topic, payload)
    # An agent that restarted its counter: same seq, a new time - a new event, kept.
    restarted = UpdateEvent(
        device_id=dev, seq=1, ts=ts + timedelta(minutes=5), model="m", step="download_started"
    )
    publisher.send(topic, restarted.model_dump_json())
    wait_until(lambda: again.counters().received >= 4)
    assert again.sync()
    c = again.counters()
    assert (c.duplicates, c.events_stored) == (3, 1)
    stored = rows(engine, DeviceEventRow, dev)
    assert sorted((e.seq, e.step) for e in stored) == [
        (1, "download_started"),
        (1, "download_started"),
        (2, "swapped"),
        (3, "committed"),
    ]
    assert len(rows(engine, TelemetryBucket, dev)) == 1
    assert rows(engine, TelemetryBucket, dev)[0].windows == 1


# -- the write path without a broker -----------------------------------------------------------


def _fleet_with_minutes(dev: str, minutes: int, start: float) -> FleetState:
    fleet = FleetState(FleetLimits(bucket_s=60))
    for i in range(minutes):
        payload = TelemetryPayload.model_validate_json(telemetry(dev, i))
        fleet.apply(dev, payload, start + 60 * i)
    return fleet


def test_retention_keeps_buckets_by_age_and_by_rows(engine: Engine) -> None:
    dev = device_id()
    start = (time.time() // 60) * 60 - 10 * 60
    fleet = _fleet_with_minutes(dev, 10, start)  # ten 1-minute buckets
    writer = TelemetryWriter(
        engine, retention=Retention(bucket_max_age_s=5.5 * 60, bucket_max_rows=3)
    )
    writer.flush(fleet.take_writes(start + 11 * 60, everything=True))
    assert len(rows(engine, TelemetryBucket, dev)) == 10
    now = datetime.fromtimestamp(start + 10 * 60, timezone.utc)
    deleted, _ = writer.prune(now)
    left = rows(engine, TelemetryBucket, dev)
    assert (deleted, len(left)) == (7, 3)  # 5 by age, then 2 more by the row cap
    newest = datetime.fromtimestamp(start + 9 * 60, timezone.utc)
    assert max(b.bucket_start for b in left) == newest


def test_failed_flush_loses_nothing(engine: Engine) -> None:
    dev = device_id()
    # On a minute's start: ``start + 121 s`` must fall in the third minute's bucket.
    start = (time.time() // 60) * 60
    fleet = _fleet_with_minutes(dev, 3, start)
    writer = TelemetryWriter(engine)
    with engine.begin() as conn:  # the table disappears under the writer
        conn.execute(text("ALTER TABLE telemetry_buckets RENAME TO telemetry_buckets_away"))
    writes = fleet.take_writes(start + 3600, everything=True)
    with pytest.raises(StorageError, match="flush failed"):
        writer.flush(writes)
    fleet.restore(writes)
    assert rows(engine, DeviceLink, dev) == []  # one transaction: the link row went back too
    more = TelemetryPayload.model_validate_json(telemetry(dev, 99))
    fleet.apply(dev, more, start + 60 * 2 + 1)  # lands in a bucket already waiting
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE telemetry_buckets_away RENAME TO telemetry_buckets"))
    result = writer.flush(fleet.take_writes(start + 3600, everything=True))
    assert (result.links, result.buckets) == (1, 3)
    buckets = rows(engine, TelemetryBucket, dev)
    assert sorted(b.windows for b in buckets) == [1, 1, 2]
    assert sum(b.inferences for b in buckets) == 4 * 50


def test_ingester_survives_concurrent_publishers(
    make_ingester: Callable[..., TelemetryIngester],
    engine: Engine,
    mqtt_broker: tuple[str, int],
    prefix: str,
) -> None:
    """Several publishers at once: every message is accounted for, none half-written."""
    ingester = make_ingester()
    devices = [device_id() for _ in range(20)]
    per_device = 10

    def burst(chunk: list[str]) -> None:
        pub = Publisher(*mqtt_broker)
        try:
            for seq in range(per_device):
                for dev in chunk:
                    pub.client.publish(f"{prefix}/{dev}/telemetry", telemetry(dev, seq), qos=1)
            pub.send(f"{prefix}/{chunk[0]}/telemetry", b"{")  # waits for all before it
        finally:
            pub.client.disconnect()
            pub.client.loop_stop()

    threads = [threading.Thread(target=burst, args=(devices[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    total = len(devices) * per_device + 4
    wait_until(lambda: ingester.counters().received >= total, what="all received")
    assert ingester.sync()
    c = ingester.counters()
    assert (c.stored, c.dropped_malformed, c.backlog) == (total - 4, 4, 0)
    with engine.connect() as conn:
        windows = conn.execute(
            select(TelemetryBucket.windows).where(TelemetryBucket.device_id.in_(devices))
        ).scalars()
        assert sum(windows) == total - 4


def _event_payload(dev: str, seq: int, step: str) -> UpdateEvent:
    return UpdateEvent(
        device_id=dev,
        seq=seq,
        ts=datetime.now(timezone.utc),
        model="detector",
        version="2.0.0",
        from_version="1.0.0",
        step=step,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("order", ["event_first", "telemetry_first"])
def test_two_ingesters_each_with_part_of_a_device_store_both_parts(
    engine: Engine, order: str
) -> None:
    """A shared subscription deals one device's messages out in turn: one ingester holds its
    update event, the other its telemetry. Whichever writes last, the row keeps both, and an
    older part never overwrites a newer one."""
    dev = device_id()
    start = time.time()
    with_event, with_telemetry = FleetState(FleetLimits()), FleetState(FleetLimits())
    with_event.apply(dev, _event_payload(dev, 7, "committed"), start + 1.0)
    payload = TelemetryPayload.model_validate_json(telemetry(dev, 3))
    with_telemetry.apply(dev, payload, start + 2.0)
    writers = [TelemetryWriter(engine), TelemetryWriter(engine)]
    fleets = [with_event, with_telemetry]
    if order == "telemetry_first":
        fleets.reverse()
    for writer, fleet in zip(writers, fleets, strict=True):
        writer.flush(fleet.take_writes(start + 3.0, everything=True))
    (row,) = rows(engine, DeviceLink, dev)
    assert row.updates["detector"]["step"] == "committed"
    assert row.models["detector"]["health"]["inferences"] == 50
    assert row.telemetry_seq == 3
    # A late flush of an older event from the first ingester does not undo the newer one.
    with_event.apply(dev, _event_payload(dev, 9, "probation_started"), start + 4.0)
    writers[0].flush(with_event.take_writes(start + 5.0, everything=True))
    older = FleetState(FleetLimits())
    older.apply(dev, _event_payload(dev, 8, "swapped"), start + 3.5)
    writers[1].flush(older.take_writes(start + 6.0, everything=True))
    (row,) = rows(engine, DeviceLink, dev)
    assert row.updates["detector"]["step"] == "probation_started"
    assert row.models["detector"]["health"]["inferences"] == 50

"""Two ingesters split the telemetry stream through an MQTT 5 shared subscription (real
Mosquitto): every message is stored exactly once across them, none is lost unaccounted."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from agent.contracts.events import UpdateEvent
from control_plane.ingest import DeviceEventRow, MqttLink, TelemetryBucket, TelemetryIngester
from tests.control_plane.test_ingest import (
    FAST,
    Publisher,
    device_id,
    engine,  # noqa: F401  (fixture)
    prefix,  # noqa: F401  (fixture)
    telemetry,
    wait_until,
)


@pytest.fixture
def ingesters(
    engine: Engine,  # noqa: F811
    mqtt_broker: tuple[str, int],
    prefix: str,  # noqa: F811
) -> Iterator[Callable[[int], list[TelemetryIngester]]]:
    started: list[TelemetryIngester] = []
    group = f"g{uuid.uuid4().hex[:8]}"

    def make(n: int) -> list[TelemetryIngester]:
        for _ in range(n):
            link = MqttLink(
                *mqtt_broker,
                client_id=f"cp-{uuid.uuid4().hex[:10]}",
                topic_prefix=prefix,
                session_expiry_s=0,
                shared_group=group,
            )
            ingester = TelemetryIngester(link, engine, options=FAST)
            ingester.start()
            assert ingester.wait_subscribed(10)
            started.append(ingester)
        return list(started)

    yield make
    for ingester in started:
        ingester.stop()


def event(dev: str, seq: int) -> bytes:
    body: dict[str, Any] = {
        "device_id": dev,
        "seq": seq,
        "ts": "2025-01-01T00:00:00+00:00",
        "model": "detector",
        "step": "committed",
        "version": "1.0.0",
    }
    return UpdateEvent.model_validate(body).model_dump_json().encode()


def test_two_ingesters_share_the_stream_and_store_each_message_once(
    ingesters: Callable[[int], list[TelemetryIngester]],
    engine: Engine,  # noqa: F811
    mqtt_broker: tuple[str, int],
    prefix: str,  # noqa: F811
) -> None:
    first, second = ingesters(2)
    devices = [device_id() for _ in range(20)]
    per_device = 20
    pub = Publisher(*mqtt_broker)
    try:
        for seq in range(per_device):
            for dev in devices:
                pub.client.publish(f"{prefix}/{dev}/telemetry", telemetry(dev, seq), qos=1)
        for dev in devices:  # each event twice: a replay after a reconnect
            for _ in range(2):
                pub.client.publish(f"{prefix}/{dev}/events", event(dev, 1), qos=1)
        pub.send(f"{prefix}/{devices[0]}/telemetry", telemetry(devices[0], per_device))
    finally:
        pub.client.disconnect()
        pub.client.loop_stop()
    sent = len(devices) * (per_device + 2) + 1
    both = (first, second)
    wait_until(lambda: sum(i.counters().received for i in both) >= sent, what="all received")
    assert all(i.sync() for i in both)
    counts = [i.counters() for i in both]
    assert all(c.received > 0 for c in counts), "the broker gave every message to one ingester"
    assert sum(c.received for c in counts) == sent  # each message to exactly one of them
    assert sum(c.stored + c.duplicates for c in counts) == sent
    assert sum(c.dropped_overload + c.dropped_malformed for c in counts) == 0
    with engine.connect() as conn:
        windows = conn.execute(
            select(func.sum(TelemetryBucket.windows)).where(TelemetryBucket.device_id.in_(devices))
        ).scalar_one()
        events = conn.execute(
            select(func.count())
            .select_from(DeviceEventRow)
            .where(DeviceEventRow.device_id.in_(devices))
        ).scalar_one()
    assert windows == len(devices) * per_device + 1
    assert events == len(devices)  # a replayed event is stored once, whichever ingester got it

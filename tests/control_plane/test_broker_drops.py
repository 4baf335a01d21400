"""What the broker sheds is counted, not lost silently: a real Mosquitto with the project's ACL,
its queue for the control plane's session bounded, telemetry published while the ingester is
away; back, the ingester has every message the broker kept and the broker's own count of the
rest (``$SYS/broker/publish/messages/dropped``), exported as a metric."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine

from control_plane.db.engine import make_engine, upgrade_database
from control_plane.ingest import IngestOptions, MqttLink, TelemetryIngester
from control_plane.ingest.wiring import IngestCollector
from control_plane.rollouts.service import RolloutService
from tests.agent.telemetry.conftest import Broker
from tests.conftest import ROOT
from tests.control_plane.test_ingest import wait_until

pytestmark = pytest.mark.broker
QUEUED = 20  # the broker's max_queued_messages
SENT = 60


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    for user in ("control-plane", "dev-a"):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"{user}-pw"], check=True)
    acl = ROOT / "deploy" / "mosquitto" / "acl"
    broker = Broker(
        tmp_path,
        extra_config=(
            f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
            f"sys_interval 1\nmax_queued_messages {QUEUED}\n"
        ),
    )
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    upgrade_database(engine)
    yield engine
    engine.dispose()


def _ingester(broker: Broker, engine: Engine, client_id: str) -> TelemetryIngester:
    link = MqttLink(
        "127.0.0.1",
        broker.port,
        username="control-plane",
        password="control-plane-pw",
        client_id=client_id,
        topic_prefix="edgefleet/v1",
        session_expiry_s=600,  # the broker queues for it while it is away
    )
    ingester = TelemetryIngester(link, engine, options=IngestOptions(flush_interval_s=0.05))
    ingester.start()
    assert ingester.wait_subscribed(10), "ingester did not subscribe"
    return ingester


def test_what_the_broker_drops_is_counted_by_the_ingester(broker: Broker, engine: Engine) -> None:
    client_id = f"cp-{uuid.uuid4().hex[:8]}"
    first = _ingester(broker, engine, client_id)
    first.stop()  # away: its session stays, the broker queues for it (up to QUEUED)
    device = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="dev-a",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    device.username_pw_set("dev-a", "dev-a-pw")
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        for seq in range(SENT):
            body = f'{{"schema_version": 1, "device_id": "dev-a", "seq": {seq}}}'
            device.publish("edgefleet/v1/dev-a/telemetry", body, qos=1).wait_for_publish(10)
    finally:
        device.disconnect()
        device.loop_stop()
    back = _ingester(broker, engine, client_id)
    try:
        wait_until(
            lambda: back.counters().broker_dropped == SENT - QUEUED, 15, "the broker's count"
        )
        wait_until(lambda: back.counters().received == QUEUED, 15, "the queued messages")
        counters = back.counters()
        assert counters.received + (counters.broker_dropped or 0) == SENT  # none unaccounted
        registry = CollectorRegistry()
        registry.register(IngestCollector(back, RolloutService(lambda: None, interval_s=60)))  # type: ignore[arg-type]
        text = generate_latest(registry).decode()
        assert f"edgefleet_cp_broker_dropped_messages {float(SENT - QUEUED)}" in text
    finally:
        back.stop()

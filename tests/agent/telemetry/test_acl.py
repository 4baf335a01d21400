"""deploy/mosquitto/acl, loaded by a real Mosquitto: a device cannot speak for another device."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from agent.config import MqttConfig
from agent.contracts.telemetry import Command
from agent.telemetry import TelemetryClient
from tests.agent.telemetry.conftest import Broker, Subscriber
from tests.agent.telemetry.test_client import command, event
from tests.conftest import ROOT

pytestmark = pytest.mark.broker
USERS = ("dev-a", "dev-b", "control-plane")


@pytest.fixture
def acl_broker(tmp_path: Path) -> Broker:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    for user in USERS:
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, f"{user}-pw"], check=True)
    acl = ROOT / "deploy" / "mosquitto" / "acl"
    broker = Broker(
        tmp_path,
        extra_config=f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n",
    )
    broker.start()
    yield broker  # type: ignore[misc]
    broker.stop()


def test_device_cannot_publish_on_another_devices_topics(
    acl_broker: Broker, state_dir: Path, subscribe: Callable[..., Subscriber]
) -> None:
    port = acl_broker.port
    cp = subscribe(port, "edgefleet/v1/#", username="control-plane", password="control-plane-pw")
    got: list[Command] = []
    handled = threading.Event()
    client = TelemetryClient(
        MqttConfig(host="127.0.0.1", port=port, username="dev-a", password="dev-a-pw"),
        device_id="dev-a",
        state_dir=state_dir,
        reconnect_min_s=0.05,
    )
    client.on_command("check-update", lambda c: (got.append(c), handled.set()))
    with client:
        assert client.wait_connected(10)
        assert client.wait_commands_ready(10)
        client.publish_event(event("dev-a", 1))
        assert cp.wait_for(lambda s: [p["seq"] for p in s.payloads("dev-a/events")] == [1])

        # dev-b, authenticated as itself, tries to speak for dev-a and to read dev-a's commands.
        spy = subscribe(port, "edgefleet/v1/dev-a/cmd", username="dev-b", password="dev-b-pw")
        forged = event("dev-a", 99).model_dump_json().encode()
        spy.client.publish("edgefleet/v1/dev-a/events", forged, qos=1).wait_for_publish(5)
        spy.client.publish("edgefleet/v1/dev-a/state", b'{"status":"offline"}', qos=1, retain=True)
        spy.client.publish("edgefleet/v1/dev-b/events", b"{}", qos=1).wait_for_publish(5)

        # The control plane may command dev-a; dev-a receives it, dev-b does not.
        cp.client.publish("edgefleet/v1/dev-a/cmd", command(id="k1"), qos=1)
        assert handled.wait(10)
        # dev-b's own topic works, which also shows its forged messages went before it.
        assert cp.wait_for(
            lambda s: any(m.topic == "edgefleet/v1/dev-b/events" for m in s.messages)
        )
    assert [p["seq"] for p in cp.payloads("dev-a/events")] == [
        1
    ]  # the forged event never reached the control plane
    assert [p["status"] for p in cp.payloads("dev-a/state")] == ["online", "offline"]
    assert cp.payloads("dev-a/state")[-1]["reason"] == "shutdown"  # dev-a's own, not the forgery
    assert [m for m in spy.messages if m.topic.endswith("/cmd")] == []
    assert [c.id for c in got] == ["k1"]


DYNSEC = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


def _dynsec_client(username: str, password: str) -> dict[str, object]:
    """A client entry of Mosquitto's dynamic-security file (PBKDF2-SHA512, as it stores them)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
        "roles": [],
    }


@pytest.mark.skipif(not DYNSEC.is_file(), reason="the mosquitto package's dynamic-security plugin")
def test_a_refused_command_subscription_is_reported(tmp_path: Path, state_dir: Path) -> None:
    """A broker that checks subscriptions (Mosquitto's dynamic-security plugin here; its ACL
    file grants every SUBSCRIBE and filters at delivery) and gives the device no right to its
    command topic refuses it in the SUBACK: the client logs the refusal and never reports its
    commands as ready, while its telemetry still goes out."""
    security = tmp_path / "dynsec.json"
    security.write_text(
        json.dumps(
            {
                "defaultACLAccess": {
                    "publishClientSend": True,
                    "publishClientReceive": True,
                    "subscribe": False,
                    "unsubscribe": True,
                },
                "clients": [_dynsec_client("dev-a", "dev-a-pw")],
                "groups": [],
                "roles": [],
            }
        )
    )
    broker = Broker(
        tmp_path,
        extra_config=f"plugin {DYNSEC}\nplugin_opt_config_file {security}\n",
    )
    broker.start()
    client = TelemetryClient(
        MqttConfig(host="127.0.0.1", port=broker.port, username="dev-a", password="dev-a-pw"),
        device_id="dev-a",
        state_dir=state_dir,
        reconnect_min_s=0.05,
    )
    try:
        with structlog.testing.capture_logs() as logs, client:
            assert client.wait_connected(10)
            assert not client.wait_commands_ready(3)
            assert client.connected  # only the commands are refused
        refused = [e for e in logs if e["event"] == "mqtt_command_subscription_refused"]
        assert refused, [e["event"] for e in logs]
    finally:
        broker.stop()

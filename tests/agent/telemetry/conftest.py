"""Fixtures for the telemetry tests: a subscriber on the real broker, and a second Mosquitto
that a test can stop and restart (outages), both on loopback."""

from __future__ import annotations

import getpass
import json
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A broker here is often started
    after clients have been trying to reach it: a client connecting to a port in that range
    while nothing listens can be handed that same port as its source and connect to itself
    (TCP simultaneous open), and then the broker cannot bind it."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """A Mosquitto process on a free loopback port, stopped and started by the test."""

    def __init__(self, workdir: Path, extra_config: str = "") -> None:
        self.port = free_port()
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            # Run as the test's user: as root mosquitto would drop to "mosquitto", which cannot
            # read the password file in the test's private tmp dir.
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\npersistence false\n"
            + (extra_config or "allow_anonymous true\n")
        )
        self.log = workdir / f"mosquitto-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start: {self.log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def device_id() -> str:
    """Unique per test, so parallel runs on the shared broker never see each other."""
    return f"test-{uuid.uuid4().hex[:12]}"


class Subscriber:
    """A real MQTT client recording every message it receives, in order."""

    def __init__(
        self, port: int, topic: str, *, username: str | None = None, password: str | None = None
    ) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:10]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def payloads(self, suffix: str) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(m.payload) for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, predicate: Callable[[Subscriber], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))  # also poll: some predicates read no message
            return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscribe() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(port: int, topic: str, **kw: Any) -> Subscriber:
        sub = Subscriber(port, topic, **kw)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.close()

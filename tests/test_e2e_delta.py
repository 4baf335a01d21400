"""Model deltas end to end: a control plane on loopback, one ``edge-agent daemon``, the update
events watched on the real broker. N -> N+1 travels as a delta that the control plane builds
when the device needs it and signs as its own TUF target; a tampered, a truncated, a wrong-base
delta and a missing base are each refused on the device, which then takes the full archive."""

from __future__ import annotations

import json
import queue
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.samples import DigitsData
from agent.updates.delta import delta_summary, make_delta
from control_plane.deltas import delta_path
from tests.agent.store import models
from tests.agent.updates.fleet import ControlPlane
from tests.test_e2e_fleet_truth import Agent, _committed, _config, _wait
from tests.test_e2e_ota import Operator

pytestmark = pytest.mark.broker


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp", deltas=True).start()
    yield plane
    plane.stop()


class Events:
    """Every update event the device publishes on ``edgefleet/v1/<device>/events``."""

    def __init__(self, broker: tuple[str, int]) -> None:
        self.got: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.device_id: str | None = None  # set once known: other tests' devices publish too
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, msg: self.got.put(json.loads(msg.payload))
        self.client.connect(*broker)
        self.client.subscribe("edgefleet/v1/+/events", qos=1)
        self.client.loop_start()

    def of(self, version: str, step: str | None = None) -> list[dict[str, Any]]:
        while not self.got.empty():
            self.seen.append(self.got.get())
        return [
            e
            for e in self.seen
            if e.get("version") == version
            and (step is None or e.get("step") == step)
            and e.get("device_id") == self.device_id
        ]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def events(mqtt_broker: tuple[str, int]) -> Iterator[Events]:
    watcher = Events(mqtt_broker)
    yield watcher
    watcher.close()


def _variant(cp: ControlPlane, version: str) -> str:
    with cp.admin() as c:
        v = c.get(f"/v1/models/digits/versions/{version}").json()
    return str(next(var["id"] for var in v["variants"] if var.get("sha256")))


def _start(
    cp: ControlPlane, tmp_path: Path, broker: tuple[str, int]
) -> tuple[Agent, str, Operator]:
    root = cp.root_json(tmp_path / "root.json")
    config = _config(tmp_path / "agent.toml", tmp_path / "state", cp.url, root, broker, name="d1")
    config.write_text(config.read_text().replace("probation_s = 4", "probation_s = 1"))
    agent = Agent(config, tmp_path / "agent.log").start()
    with cp.admin() as admin:
        devices = _wait("enrollment", lambda: admin.get("/v1/devices").json())
    return agent, devices[0]["id"], Operator(cp.url, tmp_path)


def _update(cp: ControlPlane, device_id: str, version: str) -> None:
    cp.deploy("digits", version, device_id)
    _wait(f"{version} committed", _committed(cp, device_id, version))


def test_next_version_travels_as_a_delta(
    cp: ControlPlane,
    tmp_path: Path,
    digits_path: Path,
    digits: DigitsData,
    mqtt_broker: tuple[str, int],
    events: Events,
) -> None:
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    v2 = models.shifted(digits_path, tmp_path / "v2.onnx", 0.5)  # the head retrained
    cp.push(v2, cal, name="digits", version="2.0.0")
    agent, device_id, edgectl = _start(cp, tmp_path, mqtt_broker)
    events.device_id = device_id
    try:
        _update(cp, device_id, "1.0.0")
        assert events.of("1.0.0", "delta_applied") == []  # nothing to start from: full
        _update(cp, device_id, "2.0.0")
        listing = edgectl("models", "show", "digits").decode()
        shown = json.loads(edgectl("models", "show", "digits", "--json"))
    finally:
        agent.stop()
    full = cp.artifact_file("digits", "2.0.0").stat().st_size
    applied = _wait("delta_applied", lambda: events.of("2.0.0", "delta_applied"), 10)
    details = applied[0]["details"]
    assert applied[0]["from_version"] == "1.0.0"
    assert details["full_bytes"] == full
    assert 0 < details["delta_bytes"] < full * 0.3, details
    assert details["summary"] == delta_summary("1.0.0", details["delta_bytes"], full), details
    assert details["summary"].startswith("delta from 1.0.0, 0.5 kB of 30.7 kB"[:18]), details
    # the full archive never travelled
    assert events.of("2.0.0", "download_finished") == []
    assert events.of("2.0.0", "delta_refused") == []
    (delta,) = shown["deltas"]
    assert (delta["from_version"], delta["to_version"]) == ("1.0.0", "2.0.0")
    assert delta["size"] == details["delta_bytes"]
    assert delta["full_size"] == full
    assert "deltas" in listing, listing
    assert delta["path"] in listing, listing


def test_bad_deltas_are_refused_and_the_full_archive_is_used(
    cp: ControlPlane,
    tmp_path: Path,
    digits_path: Path,
    digits: DigitsData,
    mqtt_broker: tuple[str, int],
    events: Events,
) -> None:
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    versions = ["1.0.0", "2.0.0", "3.0.0", "4.0.0", "5.0.0"]
    for i, version in enumerate(versions):
        onnx = models.shifted(digits_path, tmp_path / f"v{i}.onnx", 0.1 * i)
        cp.push(onnx, cal, name="digits", version=version)
    archives = {v: cp.artifact_file("digits", v) for v in versions}
    variant = _variant(cp, "1.0.0")

    def signed_delta(base: str, to: str, *, built_from: str | None = None) -> Path:
        """Build and sign the delta base -> to (optionally from another archive): the blob
        the control plane serves for it is returned, to be damaged."""
        out = tmp_path / f"{base}-{to}.zst"
        make_delta(archives[built_from or base], archives[to], out)
        ref = cp.ctx.store.put_file(out)
        path = delta_path("digits", base, variant, to, variant)
        cp.ctx.tuf.add_targets({path: (ref.size, ref.sha256)})
        blob: Path = cp.ctx.store._path(ref.sha256)
        return blob

    agent, device_id, _ = _start(cp, tmp_path, mqtt_broker)
    events.device_id = device_id
    reasons: dict[str, str] = {}
    try:
        _update(cp, device_id, "1.0.0")

        blob = signed_delta("1.0.0", "2.0.0")  # tampered: same length, other bytes
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF
        blob.write_bytes(bytes(data))
        _update(cp, device_id, "2.0.0")

        blob = signed_delta("2.0.0", "3.0.0")  # truncated: the server has half of it
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
        _update(cp, device_id, "3.0.0")

        # Against the wrong base: built from 4.0.0 itself, every byte taken from its base, so on
        # 3.0.0 it rebuilds 3.0.0. (A delta from a near-identical archive can rebuild the right
        # bytes on the wrong base; the signed hash then rightly accepts them.)
        signed_delta("3.0.0", "4.0.0", built_from="4.0.0")
        _update(cp, device_id, "4.0.0")

        shutil.rmtree(tmp_path / "state" / "bases")  # the base is gone on the device
        _update(cp, device_id, "5.0.0")
    finally:
        agent.stop()
    for version in versions[1:]:
        refused = _wait(f"{version} delta_refused", lambda v=version: events.of(v, "delta_refused"))
        reasons[version] = refused[0]["reason"]
        finished = events.of(version, "download_finished")
        assert finished
        assert finished[0]["details"]["bytes"] == archives[version].stat().st_size
        assert events.of(version, "delta_applied") == []
    assert "does not match the signed" in reasons["2.0.0"], reasons
    assert "not downloaded" in reasons["3.0.0"], reasons
    assert "wrong base" in reasons["4.0.0"] or "does not decode" in reasons["4.0.0"], reasons
    assert "no base archive" in reasons["5.0.0"], reasons
    # the bad deltas' files did not stay behind
    assert not list((tmp_path / "state" / "downloads").glob("deltas_*"))

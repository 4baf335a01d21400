"""Staged rollouts run by the service from real telemetry, on SQLite and PostgreSQL.

Devices are the agent's real ``TelemetryClient`` publishing through the real Mosquitto, with a
small stand-in for the update client: a ``check-update`` command makes it read its desired state
over HTTP and "install" what it finds (reporting events); ``rollback`` puts the previous version
back. Latency per version is set by the test, so a regression is a fact, not a guess.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from agent.config import MqttConfig
from agent.contracts.events import UpdateEvent
from agent.contracts.telemetry import Command, ModelTelemetry, SlotIdentity
from agent.telemetry import TelemetryClient
from control_plane.cli import main
from control_plane.context import AppContext
from control_plane.ingest import DeviceLink
from control_plane.settings import Settings
from tests.control_plane.conftest import ADMIN, SampleFiles, enroll, make_settings, push_version

pytestmark = pytest.mark.broker

MODEL = "digits"


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def prefix() -> str:
    return f"eftest-{uuid.uuid4().hex[:10]}/v1"


@pytest.fixture
def settings(tmp_path: Path, db_url: str, mqtt_broker: tuple[str, int], prefix: str) -> Settings:
    return make_settings(
        tmp_path / "data",
        db_url,
        mqtt_host=mqtt_broker[0],
        mqtt_port=mqtt_broker[1],
        mqtt_topic_prefix=prefix,
        mqtt_client_id=f"cp-{uuid.uuid4().hex[:10]}",
        mqtt_session_expiry_s=0,
        rollout_interval_s=0.1,
        telemetry_state_write_s=0.5,
    )


class SimDevice:
    """A device: the real MQTT link, telemetry per version, and a minimal update client."""

    def __init__(
        self,
        base_url: str,
        device_id: str,
        headers: dict[str, str],
        *,
        port: int,
        prefix: str,
        state_dir: Path,
        p99_by_version: dict[str, float],
    ) -> None:
        self.device_id = device_id
        self.version = "1.0.0"
        self.previous: str | None = None
        self.p99 = p99_by_version
        self.commands: list[str] = []
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=10)
        self._seq = 0
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.link = TelemetryClient(
            MqttConfig(host="127.0.0.1", port=port, topic_prefix=prefix, telemetry_interval_s=0.1),
            device_id=device_id,
            state_dir=state_dir,
            model_stats=self._window,
            slots=lambda: [SlotIdentity(name=MODEL, version=self.version)],
            reconnect_min_s=0.05,
        )
        self.link.on_command("check-update", self._on_check_update)
        self.link.on_command("rollback", self._on_rollback)
        self.link.start()

    def _window(self) -> list[ModelTelemetry]:
        p99 = self.p99[self.version]
        return [
            ModelTelemetry(
                name=MODEL,
                version=self.version,
                backend="onnxruntime",
                window_s=0.1,
                count=20,
                failed=0,
                dropped=0,
                throughput_per_s=200.0,
                latency_p50_ms=p99 / 2,
                latency_p95_ms=p99 * 0.9,
                latency_p99_ms=p99,
            )
        ]

    def _event(self, step: Any, version: str | None, from_version: str | None) -> None:
        self._seq += 1
        self.link.publish_event(
            UpdateEvent(
                device_id=self.device_id,
                seq=self._seq,
                ts=datetime.now(timezone.utc),
                model=MODEL,
                version=version,
                from_version=from_version,
                step=step,
            )
        )

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._reconcile, daemon=True)  # handlers must not block
        thread.start()  # then listed: close() may be joining the list from another thread
        self._threads.append(thread)

    def _on_check_update(self, command: Command) -> None:
        self.commands.append(command.command)
        self._spawn()

    def _on_rollback(self, command: Command) -> None:
        # The control plane changed the desired state before sending this: follow it.
        self.commands.append(command.command)
        self._spawn()

    def _reconcile(self) -> None:
        with self._lock:
            if self._closed:
                return
            want = self.desired_version()
            if want is None or want == self.version:
                return
            if want == self.previous:
                self._event("rolled_back", want, self.version)
                self.version, self.previous = want, None
            else:
                self._event("download_started", want, self.version)
                self.previous, self.version = self.version, want
                self._event("committed", want, self.previous)
        self.link.refresh_state()

    def desired_version(self) -> str | None:
        desired = self._http.get(f"/v1/devices/{self.device_id}/desired-state").json()
        return next((m["version"] for m in desired["models"] if m["name"] == MODEL), None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for thread in self._threads:
            thread.join(10)
        self.link.stop()
        self._http.close()


@pytest.fixture
def fleet(
    client: httpx.Client,
    live_server: str,
    mqtt_broker: tuple[str, int],
    prefix: str,
    tmp_path: Path,
    digits_path: Path,
    digits_sets: SampleFiles,
) -> Iterator[Callable[..., list[SimDevice]]]:
    """Two versions of a model, N enrolled devices on 1.0.0 sending telemetry."""
    made: list[SimDevice] = []

    def make(n: int, p99_by_version: dict[str, float], site: str) -> list[SimDevice]:
        push_version(client, digits_path, digits_sets, name=MODEL, version="1.0.0")
        push_version(client, digits_path, digits_sets, name=MODEL, version="1.1.0", create=False)
        devices: list[SimDevice] = []
        for i in range(n):
            device_id, headers = enroll(client, f"robot-{i}", labels={"site": site})
            devices.append(
                SimDevice(
                    live_server,
                    device_id,
                    headers,
                    port=mqtt_broker[1],
                    prefix=prefix,
                    state_dir=tmp_path / device_id,
                    p99_by_version=p99_by_version,
                )
            )
        made.extend(devices)
        body = {"model": MODEL, "version": "1.0.0", "selector": {"site": site}}
        assert client.post("/v1/assignments", json=body, headers=ADMIN).status_code == 201
        return devices

    yield make
    for device in made:
        device.close()


def ctx_of(app: Any) -> AppContext:
    ctx: AppContext = app.state.ctx
    return ctx


def wait_for_baselines(ctx: AppContext, devices: list[SimDevice]) -> None:
    """Every device's 1.0.0 latency is in the database, so assignments record a baseline."""
    ids = [d.device_id for d in devices]

    def ready() -> bool:
        with ctx.sessions() as session:
            links = session.scalars(select(DeviceLink).where(DeviceLink.device_id.in_(ids))).all()
        healthy = [
            link
            for link in links
            if ((link.models.get(MODEL) or {}).get("health") or {}).get("p99_ms") is not None
        ]
        return len(healthy) == len(ids)

    wait_until(ready, what="baseline telemetry of every device")


def rollout(client: httpx.Client, rollout_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/rollouts/{rollout_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_healthy_rollout_is_promoted_wave_by_wave_and_completes(
    client: httpx.Client, app: Any, fleet: Callable[..., list[SimDevice]]
) -> None:
    devices = fleet(5, {"1.0.0": 10.0, "1.1.0": 10.5}, site="lab-a")
    wait_for_baselines(ctx_of(app), devices)
    body = {
        "id": "digits-healthy",
        "model": MODEL,
        "version": "1.1.0",
        "selector": {"site": "lab-a"},
        "waves": [{"count": 2, "soak_s": 0.5}, {"percent": 100, "soak_s": 0.5}],
        "rules": {"min_devices_reporting": 2, "max_p99_regression": 0.2},
    }
    r = client.post("/v1/rollouts", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    wait_until(
        lambda: rollout(client, "digits-healthy")["status"] == "completed", what="completion"
    )
    status = rollout(client, "digits-healthy")
    kinds = [d["kind"] for d in status["decisions"]]
    assert kinds == ["create", "assign", "promote", "assign", "complete"]
    assert [w["assigned"] for w in status["wave_status"]] == [2, 3]
    assert all(w["state"] == "done" for w in status["wave_status"])
    assert status["wave_status"][0]["p99_regression"] == pytest.approx(0.05, abs=0.01)
    assert status["rolled_back"] == 0
    for device in devices:
        assert device.version == "1.1.0"
        assert device.commands == ["check-update"]
        assert device.desired_version() == "1.1.0"
    by_id = {d["device_id"]: d for d in status["devices"]}
    assert set(by_id) == {d.device_id for d in devices}
    assert all(d["baseline_p99_ms"] == 10.0 for d in by_id.values())
    # Completion needed half of them reporting on the new version; the rest may still be lagging.
    assert sum(d["version"] == "1.1.0" for d in by_id.values()) >= 3

    # An operator may still roll a completed rollout back: every device returns to 1.0.0.
    r = client.post(
        "/v1/rollouts/digits-healthy/rollback", json={"reason": "bad results"}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["reason"], r.json()["rolled_back"]) == (
        "aborted",
        "bad results",
        5,
    )
    wait_until(lambda: all(d.version == "1.0.0" for d in devices), what="every device back")
    for device in devices:
        assert device.desired_version() == "1.0.0"
        assert device.commands == ["check-update", "rollback"]


def test_a_device_moved_out_of_the_selector_mid_rollout_is_not_assigned(
    client: httpx.Client, app: Any, fleet: Callable[..., list[SimDevice]]
) -> None:
    """An operator's label edit between two waves reaches the runner's next tick (its cached
    snapshot reads the device again by its stamp): the moved device is left out of the
    next wave."""
    devices = fleet(4, {"1.0.0": 10.0, "1.1.0": 10.0}, site="lab-m")
    wait_for_baselines(ctx_of(app), devices)
    body = {
        "id": "digits-moved",
        "model": MODEL,
        "version": "1.1.0",
        "selector": {"site": "lab-m"},
        "waves": [{"count": 1, "soak_s": 3.0}, {"percent": 100, "soak_s": 0.5}],
        "rules": {"min_devices_reporting": 1},
    }
    r = client.post("/v1/rollouts", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    wait_until(
        lambda: rollout(client, "digits-moved")["wave_status"][0]["assigned"] == 1,
        what="the first wave",
    )
    first = {d["device_id"] for d in rollout(client, "digits-moved")["devices"]}
    moved = next(d for d in devices if d.device_id not in first)
    r = client.patch(
        f"/v1/devices/{moved.device_id}/labels", json={"set": {"site": "lab-x"}}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert rollout(client, "digits-moved")["wave"] == 0  # still soaking: the edit came first
    wait_until(lambda: rollout(client, "digits-moved")["status"] == "completed", what="completion")
    status = rollout(client, "digits-moved")
    assert [w["assigned"] for w in status["wave_status"]] == [1, 2]
    assert moved.device_id not in {d["device_id"] for d in status["devices"]}
    assert moved.version == "1.0.0"


def test_p99_regression_aborts_and_rolls_the_canaries_back(
    client: httpx.Client, app: Any, fleet: Callable[..., list[SimDevice]]
) -> None:
    devices = fleet(6, {"1.0.0": 10.0, "1.1.0": 30.0}, site="lab-b")
    ctx = ctx_of(app)
    wait_for_baselines(ctx, devices)
    body = {
        "id": "digits-slow",
        "model": MODEL,
        "version": "1.1.0",
        "selector": {"site": "lab-b"},
        "waves": [{"count": 3, "soak_s": 600}, {"percent": 100, "soak_s": 0}],
        "rules": {"min_devices_reporting": 2, "max_p99_regression": 0.2},
    }
    assert client.post("/v1/rollouts", json=body, headers=ADMIN).status_code == 201
    wait_until(lambda: rollout(client, "digits-slow")["status"] == "aborted", what="the abort")
    status = rollout(client, "digits-slow")
    assert "p99 latency +200.0%" in status["reason"]
    assert [d["kind"] for d in status["decisions"]] == ["create", "assign", "abort", "rollback"]
    canaries = {d["device_id"] for d in status["devices"]}
    assert len(canaries) == 3
    assert all(d["rolled_back"] for d in status["devices"])
    by_id = {d.device_id: d for d in devices}
    wait_until(
        lambda: all(by_id[c].version == "1.0.0" for c in canaries), what="canaries rolled back"
    )
    for device in devices:
        assert device.desired_version() == "1.0.0"  # the rollout's assignments are gone
        if device.device_id in canaries:
            assert device.commands == ["check-update", "rollback"]
        else:
            assert device.commands == []  # untouched: never told anything
            assert device.version == "1.0.0"
    assignments = client.get("/v1/assignments", headers=ADMIN).json()
    assert all(a["created_by"] != "rollout:digits-slow" for a in assignments)
    # Aborted is terminal: the runner leaves it alone.
    ticks = ctx.rollouts.ticks if ctx.rollouts else 0
    wait_until(lambda: ctx.rollouts is not None and ctx.rollouts.ticks > ticks + 2)
    assert rollout(client, "digits-slow")["decisions"] == status["decisions"]


def test_operator_routes_roles_and_edgectl(
    client: httpx.Client,
    app: Any,
    live_server: str,
    fleet: Callable[..., list[SimDevice]],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    devices = fleet(2, {"1.0.0": 10.0, "1.1.0": 10.0}, site="lab-c")
    viewer = client.post("/v1/tokens", json={"name": "watcher", "role": "viewer"}, headers=ADMIN)
    operator = client.post("/v1/tokens", json={"name": "ops", "role": "operator"}, headers=ADMIN)
    as_viewer = {"Authorization": f"Bearer {viewer.json()['token']}"}
    as_operator = {"Authorization": f"Bearer {operator.json()['token']}"}
    body = {
        "id": "digits-ops",
        "model": MODEL,
        "version": "1.1.0",
        "selector": {"site": "lab-c"},
        "waves": [{"count": 1, "soak_s": 3600}, {"percent": 100}],
    }
    r = client.post("/v1/rollouts", json=body, headers=as_viewer)
    assert r.status_code == 403
    assert client.get("/v1/rollouts", headers=as_viewer).json() == []  # nothing half-created
    bad = {**body, "waves": [{"percent": 50}, {"percent": 10}]}
    r = client.post("/v1/rollouts", json=bad, headers=as_operator)
    assert (r.status_code, r.json()["error"]) == (422, "InvalidInputError")
    missing = {**body, "version": "9.9.9"}
    assert client.post("/v1/rollouts", json=missing, headers=as_operator).status_code == 404
    r = client.post("/v1/rollouts", json=body, headers=as_operator)
    assert r.status_code == 201, r.text
    assert r.json()["created_by"] == "ops"
    again = {**body, "id": "digits-ops-2"}
    r = client.post("/v1/rollouts", json=again, headers=as_operator)
    assert (r.status_code, r.json()["error"]) == (409, "ConflictError")
    wait_until(lambda: rollout(client, "digits-ops")["assigned"] == 1, what="the canary")
    assert client.post("/v1/rollouts/digits-ops/pause", headers=as_viewer).status_code == 403
    assert client.post("/v1/rollouts/nope/pause", headers=as_operator).status_code == 404

    monkeypatch.setenv("EDGEFLEET_URL", live_server)
    monkeypatch.setenv("EDGEFLEET_TOKEN", operator.json()["token"])
    monkeypatch.setenv("EDGECTL_CONFIG", str(tmp_path / "edgectl.json"))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["rollout", "pause", "digits-ops"]) == 0
    assert "rollout digits-ops paused" in capsys.readouterr().out
    assert main(["rollout", "pause", "digits-ops"]) == 1
    assert "ConflictError: rollout 'digits-ops' is paused: cannot pause" in capsys.readouterr().err
    assert main(["rollout", "resume", "digits-ops"]) == 0
    assert main(["rollout", "status", "digits-ops"]) == 0
    out = capsys.readouterr().out
    assert "digits-ops" in out
    assert "running" in out
    assert "assign" in out
    assert main(["rollout", "abort", "digits-ops", "--reason", "wrong build"]) == 0
    assert "aborted: wrong build" in capsys.readouterr().out
    assert main(["rollout", "ls"]) == 0
    assert "aborted" in capsys.readouterr().out
    assert main(["rollout", "status", "digits-ops", "--watch", "--interval", "0.1"]) == 0
    assert main(["rollout", "resume", "digits-ops"]) == 1  # terminal
    capsys.readouterr()

    status = rollout(client, "digits-ops")
    kinds = [d["kind"] for d in status["decisions"]]
    assert kinds == ["create", "assign", "pause", "resume", "abort", "rollback"]
    assert status["decisions"][-2]["detail"] == "wrong build"
    for device in devices:
        assert device.desired_version() == "1.0.0"
    # Another rollout of the model may start now the first one is over.
    assert client.post("/v1/rollouts", json=again, headers=as_operator).status_code == 201
    metrics = client.get("/metrics").text
    assert "edgefleet_cp_ingest_received_total" in metrics
    assert re.search(r"^edgefleet_cp_ingest_stored_total [1-9]", metrics, re.MULTILINE)
    assert re.search(r"^edgefleet_cp_ingest_backlog \d", metrics, re.MULTILINE)

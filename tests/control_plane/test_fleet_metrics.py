"""The fleet gauges of a live control plane's ``/metrics`` (control_plane.fleet_metrics)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx

from agent.contracts.state import ReportedModel, ReportedState
from control_plane.fleet_metrics import FLEET_METRICS
from tests.control_plane.conftest import ADMIN, SampleFiles, enroll, push_version


def _value(text: str, name: str, labels: str = "") -> float | None:
    pattern = rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_fleet_gauges(
    live_server: str, client: httpx.Client, digits_path: Path, digits_sets: SampleFiles
) -> None:
    push_version(client, digits_path, digits_sets)
    reporting, device = enroll(client, "robot-1", labels={"site": "lab"})
    enroll(client, "robot-2", labels={"site": "lab"})
    state = client.get(f"/v1/devices/{reporting}/desired-state", headers=device).json()
    report = ReportedState(
        device_id=reporting,
        agent_version="0.1.0",
        generation_seen=state["generation"],
        models=(ReportedModel(name="digits", active_version="1.0.0", phase="committed"),),
        updated_at="2026-01-01T00:00:00Z",  # type: ignore[arg-type]
    )
    r = client.put(
        f"/v1/devices/{reporting}/reported-state",
        json=report.model_dump(mode="json"),
        headers=device,
    )
    assert r.status_code == 200, r.text
    body = {
        "id": "r1",
        "model": "digits",
        "version": "1.0.0",
        "selector": {"site": "lab"},
        "waves": [{"percent": 100.0, "soak_s": 0.0}],
    }
    assert client.post("/v1/rollouts", json=body, headers=ADMIN).status_code == 201
    aborted = client.post("/v1/rollouts/r1/abort", json={"reason": "test"}, headers=ADMIN)
    assert aborted.status_code == 200, aborted.text

    text = client.get("/metrics", headers=ADMIN).text
    for name in FLEET_METRICS:
        assert f"# TYPE {name} gauge" in text, name
    online = _value(text, "edgefleet_fleet_devices", 'state="online"')
    never = _value(text, "edgefleet_fleet_devices", 'state="never_seen"')
    offline = _value(text, "edgefleet_fleet_devices", 'state="offline"')
    assert (online or 0) + (never or 0) + (offline or 0) == 2
    assert (online or 0) >= 1  # the one that polled and reported
    assert _value(text, "edgefleet_fleet_device_versions", 'model="digits",version="1.0.0"') == 1
    assert _value(text, "edgefleet_fleet_rollouts", 'status="aborted"') == 1
    assert _value(text, "edgefleet_fleet_rollouts", 'status="running"') == 0

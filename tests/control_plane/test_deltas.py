"""Model deltas on the real control plane: offered in a device's desired state once it reports
serving another version, signed as TUF targets, served only to the device it is offered to,
listed for operators, not offered when not worth it, and collected when no device needs them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from fastapi import FastAPI

from agent.contracts.state import DesiredState, ReportedModel, ReportedState
from agent.samples import DigitsData
from control_plane.db.models import Device
from control_plane.deltas import DeltaService
from control_plane.desired import compute_desired_state
from tests.agent.store import models
from tests.control_plane.conftest import ADMIN, SampleFiles, enroll, push_version


def _report(client: httpx.Client, device_id: str, auth: dict[str, str], version: str) -> None:
    report = ReportedState(
        device_id=device_id,
        agent_version="0.1.0",
        models=(
            ReportedModel(
                name="digits", active_version=version, variant_id="onnx-fp32", phase="committed"
            ),
        ),
        updated_at="2025-01-01T00:00:00Z",  # type: ignore[arg-type]
    )
    r = client.put(
        f"/v1/devices/{device_id}/reported-state", json=report.model_dump(mode="json"), headers=auth
    )
    assert r.status_code == 200, r.text


def _assign(client: httpx.Client, device_id: str, version: str) -> None:
    body = {"model": "digits", "version": version, "device_id": device_id}
    r = client.post("/v1/assignments", json=body, headers=ADMIN)
    assert r.status_code in (200, 201), r.text


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_delta_offered_served_listed_and_collected(
    client: httpx.Client,
    app: FastAPI,
    digits_path: Path,
    digits_sets: SampleFiles,
    digits: DigitsData,
    tmp_path: Path,
) -> None:
    push_version(client, digits_path, digits_sets, version="1.0.0")
    v2 = models.shifted(digits_path, tmp_path / "v2.onnx", 0.25)
    push_version(client, v2, digits_sets, version="2.0.0", create=False)
    device_id, auth = enroll(client, "robot-1")
    other_id, other = enroll(client, "robot-2")
    url = f"/v1/devices/{device_id}/desired-state"

    _assign(client, device_id, "2.0.0")
    # nothing reported yet: nothing to start from
    state = DesiredState.model_validate(client.get(url, headers=auth).json())
    assert state.models[0].delta is None

    _report(client, device_id, auth, "1.0.0")
    _assign(client, device_id, "2.0.0")  # a new assignment drops the cached state
    entry = DesiredState.model_validate(client.get(url, headers=auth).json()).models[0]
    delta = entry.delta
    assert delta is not None
    assert (delta.from_version, delta.from_variant_id) == ("1.0.0", "onnx-fp32")
    assert delta.artifact_path == "deltas/digits/2.0.0/onnx-fp32/1.0.0/onnx-fp32.zst"
    assert delta.size < entry.size * 0.3
    ctx = app.state.ctx
    signed = ctx.tuf.targets()[delta.artifact_path]
    assert (signed.length, signed.hashes["sha256"]) == (delta.size, delta.sha256)

    got = client.get(f"/v1/artifacts/{delta.artifact_path}", headers=auth)
    assert got.status_code == 200, got.text
    assert hashlib.sha256(got.content).hexdigest() == delta.sha256
    part = client.get(
        f"/v1/artifacts/{delta.artifact_path}", headers={**auth, "Range": "bytes=10-"}
    )
    assert part.status_code == 206
    assert part.content == got.content[10:]
    refused = client.get(f"/v1/artifacts/{delta.artifact_path}", headers=other)
    assert refused.status_code == 403, refused.text
    missing = client.get("/v1/artifacts/deltas/digits/9.9.9/x/1.0.0/x.zst", headers=ADMIN)
    assert missing.status_code == 404

    (listed,) = client.get("/v1/models/digits/deltas", headers=ADMIN).json()
    assert listed["size"] == delta.size
    assert listed["full_size"] == entry.size
    assert other_id

    # Not worth it: a service asked for deltas under 0.1 % of the archive offers none.
    clock = Clock()
    strict = DeltaService(
        store=ctx.store, tuf=ctx.tuf, work_dir=tmp_path / "w", max_ratio=0.001, clock=clock
    )
    with ctx.sessions() as session:
        device = session.get(Device, device_id)
        assert device is not None
        plain = compute_desired_state(session, device)
        ctx.tuf.remove_targets([delta.artifact_path])
        assert strict.offer(session, device, plain).models[0].delta is None
        # ... and remembers it: no second build
        assert strict.offer(session, device, plain).models[0].delta is None

    # Collected once no device needed it for keep_s.
    keeper = DeltaService(
        store=ctx.store, tuf=ctx.tuf, work_dir=tmp_path / "w", keep_s=100, clock=clock
    )
    with ctx.sessions() as session:
        device = session.get(Device, device_id)
        assert device is not None
        offered = keeper.offer(session, device, compute_desired_state(session, device))
    rebuilt = offered.models[0].delta
    assert rebuilt is not None
    assert ctx.store.exists(rebuilt.sha256)
    clock.t = 99
    assert keeper.collect() == []
    clock.t = 200
    assert keeper.collect() == [rebuilt.artifact_path]
    assert rebuilt.artifact_path not in ctx.tuf.targets()
    assert not ctx.store.exists(rebuilt.sha256)
    assert client.get("/v1/models/digits/deltas", headers=ADMIN).json() == []

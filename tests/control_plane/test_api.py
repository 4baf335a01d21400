"""The service end to end on a real app instance, on SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import httpx

from agent.contracts.state import DesiredState, ReportedModel, ReportedState
from agent.models.bundle import unpack
from tests.control_plane.conftest import (
    ADMIN,
    SampleFiles,
    enroll,
    push_version,
    upload_files,
    wait_job,
    x86_profile,
)


def test_health_ready_metrics_openapi(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    spec = client.get("/openapi.json").json()
    assert "/v1/devices/{device_id}/desired-state" in spec["paths"]
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'edgefleet_cp_http_requests_total{method="GET",route="/readyz",status="200"} 1.0' in (
        metrics.text
    )


def test_upload_build_enroll_assign_poll_download(
    client: httpx.Client, digits_path: Path, digits_sets: SampleFiles, tmp_path: Path
) -> None:
    version = push_version(client, digits_path, digits_sets)
    assert version["status"] == "ready"
    assert [v["id"] for v in version["variants"]] == ["onnx-fp32"]
    assert version["job"]["progress"] == 1.0
    assert version["job"]["log"][0] == "build started"

    device_id, device = enroll(client, labels={"site": "lab"})
    url = f"/v1/devices/{device_id}/desired-state"
    first = client.get(url, headers=device)
    assert first.status_code == 200
    empty = DesiredState.model_validate(first.json())
    assert empty.models == ()
    assert empty.generation == 0

    r = client.post(
        "/v1/assignments",
        json={"model": "digits", "version": "1.0.0", "selector": {"site": "lab"}},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    assert r.json()["devices_matched"] == 1

    polled = client.get(url, headers={**device, "If-None-Match": first.headers["ETag"]})
    assert polled.status_code == 200  # the assignment changed the state
    state = DesiredState.model_validate(polled.json())
    assert state.generation == r.json()["id"]
    (desired,) = state.models
    assert (desired.name, desired.version, desired.variant_id) == ("digits", "1.0.0", "onnx-fp32")

    etag = polled.headers["ETag"]
    idle = client.get(url, headers={**device, "If-None-Match": etag})
    assert idle.status_code == 304
    assert idle.headers["ETag"] == etag
    assert idle.content == b""
    metrics = client.get("/metrics").text
    assert 'edgefleet_cp_desired_state_polls_total{cache="hit",result="not_modified"} 1.0' in (
        metrics
    )
    route = 'route="/v1/devices/{device_id}/desired-state",status="304"'
    assert f'edgefleet_cp_http_requests_total{{method="GET",{route}}} 1.0' in metrics

    archive = client.get(f"/v1/artifacts/{desired.artifact_path}", headers=device)
    assert archive.status_code == 200
    assert len(archive.content) == desired.size
    assert archive.headers["Accept-Ranges"] == "bytes"
    import hashlib

    assert hashlib.sha256(archive.content).hexdigest() == desired.sha256
    (tmp_path / "b.tar").write_bytes(archive.content)
    manifest = unpack(tmp_path / "b.tar", tmp_path / "bundle")  # the agent's own reader
    assert [v.id for v in manifest.variants] == ["onnx-fp32"]
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert tar.getnames()[0] == "manifest.json"

    part = client.get(
        f"/v1/artifacts/{desired.artifact_path}", headers={**device, "Range": "bytes=10-99"}
    )
    assert part.status_code == 206
    assert part.content == archive.content[10:100]
    assert part.headers["Content-Range"] == f"bytes 10-99/{desired.size}"
    tail = client.get(
        f"/v1/artifacts/{desired.artifact_path}", headers={**device, "Range": "bytes=-7"}
    )
    assert tail.status_code == 206
    assert tail.content == archive.content[-7:]
    past = client.get(
        f"/v1/artifacts/{desired.artifact_path}",
        headers={**device, "Range": f"bytes={desired.size}-"},
    )
    assert past.status_code == 416
    assert past.headers["Content-Range"] == f"bytes */{desired.size}"
    assert past.json()["error"] == "RangeNotSatisfiableError"

    report = ReportedState(
        device_id=device_id,
        agent_version="0.1.0",
        generation_seen=state.generation,
        models=(
            ReportedModel(
                name="digits",
                active_version="1.0.0",
                variant_id="onnx-fp32",
                backend="onnxruntime",
                phase="committed",
            ),
        ),
        updated_at="2025-01-01T00:00:00Z",  # type: ignore[arg-type]
    )
    r = client.put(
        f"/v1/devices/{device_id}/reported-state",
        json=report.model_dump(mode="json"),
        headers=device,
    )
    assert r.status_code == 200, r.text
    shown = client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()
    assert shown["reported"]["models"][0]["phase"] == "committed"
    assert shown["desired"]["models"][0]["variant_id"] == "onnx-fp32"
    # after all this the ETag still holds: reporting does not change the desired state
    assert client.get(url, headers={**device, "If-None-Match": etag}).status_code == 304


def test_direct_assignment_beats_selector_and_labels_move_devices(
    client: httpx.Client, digits_path: Path, digits_sets: SampleFiles
) -> None:
    push_version(client, digits_path, digits_sets, version="1.0.0")
    push_version(client, digits_path, digits_sets, version="1.1.0", create=False)
    a_id, a = enroll(client, "a", labels={"group": "blue"})
    b_id, b = enroll(client, "b", labels={"group": "red"})

    def desired_version(device_id: str, headers: dict[str, str]) -> str | None:
        body = client.get(f"/v1/devices/{device_id}/desired-state", headers=headers).json()
        return body["models"][0]["version"] if body["models"] else None

    r = client.post(
        "/v1/assignments",
        json={"model": "digits", "version": "1.0.0", "selector": {"group": "blue"}},
        headers=ADMIN,
    )
    assert r.status_code == 201
    assert desired_version(a_id, a) == "1.0.0"
    assert desired_version(b_id, b) is None
    r = client.post(
        "/v1/assignments",
        json={"model": "digits", "version": "1.1.0", "device_id": b_id},
        headers=ADMIN,
    )
    assert r.status_code == 201
    assert desired_version(b_id, b) == "1.1.0"
    # b joins blue: its direct assignment still wins
    r = client.patch(f"/v1/devices/{b_id}/labels", json={"set": {"group": "blue"}}, headers=ADMIN)
    assert r.json()["labels"] == {"group": "blue"}
    assert desired_version(b_id, b) == "1.1.0"
    # a leaves blue: nothing assigned any more
    r = client.patch(f"/v1/devices/{a_id}/labels", json={"remove": ["group"]}, headers=ADMIN)
    assert r.json()["labels"] == {}
    assert desired_version(a_id, a) is None


def test_profile_update_changes_resolution(client: httpx.Client) -> None:
    device_id, device = enroll(client, profile=x86_profile(openvino=False))
    r = client.put(
        f"/v1/devices/{device_id}/profile",
        json=x86_profile().model_dump(mode="json"),
        headers=device,
    )
    assert r.status_code == 200
    assert r.json()["profile"]["runtimes"][1]["name"] == "openvino"


def test_upload_declares_the_gate_task_and_an_unknown_one_is_refused(
    client: httpx.Client, digits_path: Path, digits_sets: SampleFiles
) -> None:
    r = client.post("/v1/models", json={"name": "digits"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    bad = client.post(
        "/v1/models/digits/versions",
        data={"version": "1.0.0", "task": "ranking"},
        files=upload_files(digits_path, digits_sets),
        headers=ADMIN,
    )
    assert bad.status_code == 422, bad.text
    assert bad.json()["error"] == "InvalidInputError"
    assert "not a task" in bad.json()["message"]
    r = client.post(
        "/v1/models/digits/versions",
        data={"version": "1.0.0", "task": "classification"},
        files=upload_files(digits_path, digits_sets),
        headers=ADMIN,
    )
    assert r.status_code == 202, r.text
    assert r.json()["task"] == "classification"
    assert wait_job(client, r.json()["job"]["id"])["status"] == "succeeded"
    version = client.get("/v1/models/digits/versions/1.0.0", headers=ADMIN).json()
    assert version["task"] == "classification"
    (fp32,) = version["variants"]
    assert fp32["build"]["weight_bytes"] > 0
    assert fp32["build"]["precisions"] == {"fp32": 2}
    assert fp32["build"]["latency_ms"] > 0

"""Bad input: each a 4xx JSON error saying what is wrong, with nothing stored half-way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import func, select

from control_plane.artifacts import LocalArtifactStore
from control_plane.db import ApiToken, BuildJob, Device, ModelVersion, make_engine
from control_plane.settings import Settings
from tests.control_plane.conftest import (
    ADMIN,
    BOOTSTRAP_TOKEN,
    SampleFiles,
    enroll,
    push_version,
    upload_files,
    x86_profile,
)


def stored(settings: Settings) -> dict[str, int]:
    """Rows and blobs the service holds now."""
    engine = make_engine(settings.resolved_database_url())
    try:
        with engine.connect() as conn:
            counts = {
                t.__tablename__: conn.scalar(select(func.count()).select_from(t)) or 0
                for t in (ModelVersion, BuildJob, Device, ApiToken)
            }
    finally:
        engine.dispose()
    counts["blobs"] = LocalArtifactStore(settings.data_dir / "artifacts").count()
    return counts


def assert_error(r: httpx.Response, status: int, error: str, *words: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert body["error"] == error, body
    for word in words:
        assert word in body["message"], body
    return body


def _upload(client: httpx.Client, files: dict[str, Any], version: str = "2.0.0") -> httpx.Response:
    return client.post(
        "/v1/models/digits/versions", data={"version": version}, files=files, headers=ADMIN
    )


@pytest.fixture
def registry(client: httpx.Client, digits_path: Path, digits_sets: SampleFiles) -> httpx.Client:
    """A service holding digits 1.0.0, built."""
    push_version(client, digits_path, digits_sets)
    return client


def _mismatched_matmul(path: Path) -> Path:
    """Passes the ONNX checker, but ONNX Runtime refuses it (3 != 4 in a MatMul)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 5], np.zeros(20, np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


def test_bad_uploads_store_nothing(
    registry: httpx.Client,
    settings: Settings,
    digits_path: Path,
    digits_sets: SampleFiles,
    tmp_path: Path,
) -> None:
    client = registry
    before = stored(settings)
    cases: list[tuple[dict[str, Any], str, int, str, tuple[str, ...]]] = []

    files = upload_files(digits_path, digits_sets)
    files["onnx"] = (
        "model.onnx",
        b"this is not a protobuf at all" * 10,
        "application/octet-stream",
    )
    cases.append((files, "2.0.0", 422, "BuildInputError", ("onnx", "not an ONNX model")))

    files = upload_files(_mismatched_matmul(tmp_path / "bad.onnx"), digits_sets)
    files["calibration"] = ("cal.npz", _npz(tmp_path, x=np.zeros((4, 2, 3), np.float32)), "x")
    cases.append((files, "2.0.0", 422, "BuildInputError", ("onnx", "does not load")))

    cases.append(
        (upload_files(digits_path, digits_sets), "1.0.0", 409, "ConflictError", ("exists",))
    )

    files = upload_files(digits_path, digits_sets)
    files["calibration"] = (
        "cal.npz",
        _npz(tmp_path, input=np.zeros((4, 1, 7, 7), np.float32)),
        "application/octet-stream",
    )
    cases.append((files, "2.0.0", 422, "BuildInputError", ("calibration", "7x7", "8x8")))

    files = upload_files(digits_path, digits_sets)
    files["calibration"] = ("cal.npz", b"PK not a zip", "application/octet-stream")
    cases.append((files, "2.0.0", 422, "BuildInputError", ("calibration", "npz")))

    files = upload_files(digits_path, digits_sets)
    del files["calibration"]
    cases.append((files, "2.0.0", 422, "InvalidInputError", ("sample set",)))

    files = upload_files(digits_path, digits_sets)
    files["validation"] = (
        "val.npz",
        _npz(tmp_path, input=np.zeros((3, 1, 8, 8), np.float32), labels=np.zeros(2, np.int64)),
        "application/octet-stream",
    )
    cases.append((files, "2.0.0", 422, "BuildInputError", ("validation", "labels")))

    cases.append(
        (upload_files(digits_path, digits_sets), "2.0", 422, "InvalidInputError", ("version",))
    )

    for files, version, status, error, words in cases:
        r = _upload(client, files, version)
        body = assert_error(r, status, error, *words)
        assert stored(settings) == before, body
    assert not list((settings.data_dir / "tmp").iterdir())  # scratch cleaned up


def _npz(tmp_path: Path, **arrays: Any) -> bytes:
    path = tmp_path / "set.npz"
    np.savez(path, **arrays)
    return path.read_bytes()


def test_path_tricks_in_names(
    registry: httpx.Client, settings: Settings, digits_path: Path, digits_sets: SampleFiles
) -> None:
    client = registry
    before = stored(settings)
    for name in ("../etc", "a b", ".hidden", "x" * 65, "dig\x00its"):
        r = client.post("/v1/models", json={"name": name}, headers=ADMIN)
        assert_error(r, 422, "InvalidInputError", "name")
    for path in (
        "/v1/models/..%2F..%2Fetc/versions/1.0.0",
        "/v1/models/digits/versions/..%2F..%2F1.0.0",
        "/v1/artifacts/bundles/digits/1.0.0/..%2F..%2Fmanifest.tar",
        "/v1/artifacts/bundles/digits/1.0.0/onnx-fp32",
        "/v1/devices/..%2Fdev-1/desired-state",
    ):
        r = client.get(path, headers=ADMIN)
        assert r.status_code in (404, 422), (path, r.text)
        assert r.json()["error"] in ("InvalidInputError", "HTTPError"), r.text
    # a multipart file name is never used as a path
    files = upload_files(digits_path, digits_sets)
    files["onnx"] = ("../../../escaped.onnx", files["onnx"][1], "application/octet-stream")
    r = client.post(
        "/v1/models/digits/versions", data={"version": "1.0.1"}, files=files, headers=ADMIN
    )
    assert r.status_code == 202
    assert not list(settings.data_dir.parent.rglob("escaped.onnx"))
    assert stored(settings)["model_versions"] == before["model_versions"] + 1


def test_credentials(registry: httpx.Client, settings: Settings) -> None:
    client = registry
    a_id, a = enroll(client, "a")
    b_id, _ = enroll(client, "b")
    before = stored(settings)

    r = client.get("/v1/models")
    assert_error(r, 401, "AuthError", "missing")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_error(
        client.get("/v1/models", headers={"Authorization": "Bearer efo_forged"}),
        401,
        "AuthError",
        "unknown",
    )
    forged_device = {"Authorization": "Bearer efd_forged-credential"}
    assert_error(
        client.get(f"/v1/devices/{a_id}/desired-state", headers=forged_device), 401, "AuthError"
    )
    assert_error(
        client.get(f"/v1/devices/{b_id}/desired-state", headers=a), 403, "ForbiddenError", "own"
    )
    # b's ETag, cached for b, does not let a through the fast path either
    b_etag = client.get(f"/v1/devices/{b_id}/desired-state", headers=ADMIN).headers["ETag"]
    r = client.get(f"/v1/devices/{b_id}/desired-state", headers={**a, "If-None-Match": b_etag})
    assert_error(r, 403, "ForbiddenError", "own")
    r = client.get(
        f"/v1/devices/{a_id}/desired-state", headers={**forged_device, "If-None-Match": b_etag}
    )
    assert_error(r, 401, "AuthError")
    assert_error(
        client.put(
            f"/v1/devices/{b_id}/profile", json=x86_profile().model_dump(mode="json"), headers=a
        ),
        403,
        "ForbiddenError",
    )
    assert_error(client.get("/v1/devices", headers=a), 403, "ForbiddenError", "device")
    assert_error(
        client.get("/v1/artifacts/bundles/digits/1.0.0/onnx-fp32.tar", headers=a),
        403,
        "ForbiddenError",
        "not assigned",
    )
    r = client.post(
        "/v1/devices/enroll",
        json={
            "bootstrap_token": "wrong-bootstrap-token-000000",
            "name": "c",
            "profile": x86_profile().model_dump(mode="json"),
        },
    )
    assert_error(r, 401, "AuthError", "bootstrap")
    r = client.post(
        "/v1/devices/enroll",
        json={
            "bootstrap_token": BOOTSTRAP_TOKEN,
            "name": "../c",
            "profile": x86_profile().model_dump(mode="json"),
        },
    )
    assert_error(r, 422, "InvalidInputError", "name")
    assert stored(settings) == before

    # roles: a viewer reads, cannot write; only admins create tokens
    r = client.post("/v1/tokens", json={"name": "ci", "role": "viewer"}, headers=ADMIN)
    assert r.status_code == 201
    viewer = {"Authorization": f"Bearer {r.json()['token']}"}
    assert client.get("/v1/models", headers=viewer).status_code == 200
    assert_error(
        client.post("/v1/models", json={"name": "m"}, headers=viewer),
        403,
        "ForbiddenError",
        "operator",
    )
    assert_error(
        client.post("/v1/tokens", json={"name": "x"}, headers=viewer),
        403,
        "ForbiddenError",
        "admin",
    )
    r = client.post("/v1/tokens", json={"name": "op", "role": "operator"}, headers=ADMIN)
    operator = {"Authorization": f"Bearer {r.json()['token']}"}
    assert client.post("/v1/models", json={"name": "m"}, headers=operator).status_code == 201
    tokens = client.get("/v1/tokens", headers=ADMIN).json()
    assert "token" not in tokens[0]
    r = client.delete(f"/v1/tokens/{tokens[0]['id']}", headers=ADMIN)
    assert r.json()["revoked"] is True
    assert_error(client.get("/v1/models", headers=viewer), 401, "AuthError", "revoked")
    # an operator token may not pose as a device
    assert_error(
        client.put(f"/v1/devices/{a_id}/reported-state", json={}, headers=operator),
        401,
        "AuthError",
        "device",
    )


def test_reported_state_for_another_id_is_refused(registry: httpx.Client) -> None:
    a_id, a = enroll(registry, "a")
    body = {
        "device_id": "dev-someone-else",
        "agent_version": "0.1.0",
        "updated_at": "2025-01-01T00:00:00Z",
    }
    r = registry.put(f"/v1/devices/{a_id}/reported-state", json=body, headers=a)
    assert_error(r, 422, "InvalidInputError", "device_id")
    assert registry.get(f"/v1/devices/{a_id}", headers=ADMIN).json()["reported"] is None


def test_assignment_refusals(registry: httpx.Client) -> None:
    a_id, _ = enroll(registry, "a")
    cases = [
        ({"model": "digits", "version": "9.9.9", "device_id": a_id}, 404, "NotFoundError"),
        ({"model": "nope", "version": "1.0.0", "device_id": a_id}, 404, "NotFoundError"),
        ({"model": "digits", "version": "1.0.0", "device_id": "dev-missing"}, 404, "NotFoundError"),
        ({"model": "digits", "version": "1.0.0"}, 422, "InvalidInputError"),
        (
            {"model": "digits", "version": "1.0.0", "device_id": a_id, "selector": {"a": "b"}},
            422,
            "InvalidInputError",
        ),
        (
            {"model": "digits", "version": "1.0.0", "selector": {"Bad Key": "x"}},
            422,
            "InvalidInputError",
        ),
    ]
    for body, status, error in cases:
        assert_error(registry.post("/v1/assignments", json=body, headers=ADMIN), status, error)
    assert registry.get("/v1/assignments", headers=ADMIN).json() == []

"""Upload -> every variant, through the real builds library (ONNX FP32/FP16/INT8, OpenVINO IR).

Runs on SQLite only: the build is the slow part and the database paths are the same as in the
FP32-only tests, which run on both databases.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from agent.contracts.fit import resolve_variant
from agent.contracts.manifest import Variant
from control_plane.app import create_app
from control_plane.settings import Settings
from tests.control_plane.conftest import (
    ADMIN,
    SampleFiles,
    enroll,
    upload_files,
    wait_job,
    x86_profile,
)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cp.db'}"


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)  # the default: control_plane.builds.build_variants


def test_every_variant_built_gated_and_resolved(
    client: httpx.Client, digits_path: Path, digits_sets: SampleFiles
) -> None:
    # a zero budget: any quantized or FP16 variant that loses accuracy is rejected
    r = client.post("/v1/models", json={"name": "digits", "accuracy_budget": 0.0}, headers=ADMIN)
    assert r.status_code == 201
    r = client.post(
        "/v1/models/digits/versions",
        data={"version": "1.0.0"},
        files=upload_files(digits_path, digits_sets, validation=True),
        headers=ADMIN,
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"], timeout=240)
    assert job["status"] == "succeeded", job
    assert any("onnx-int8" in line for line in job["log"])
    version = client.get("/v1/models/digits/versions/1.0.0", headers=ADMIN).json()
    by_id = {v["id"]: v for v in version["variants"]}
    assert set(by_id) >= {"onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp16", "openvino-int8"}

    rejected = [v for v in by_id.values() if v["status"] == "rejected"]
    assert rejected, "a zero budget should reject some quantized variant"
    for v in version["variants"]:
        if v["accuracy"] is not None:
            assert v["accuracy"]["budget"] == 0.0
            assert v["accuracy"]["metric"] == "top1"  # the labelled validation set was used
            assert (v["status"] == "accepted") == (v["accuracy"]["delta"] <= 0.0), v
    for v in rejected:  # kept with their numbers, never downloadable
        assert v["accuracy"]["delta"] > 0
        assert v["artifact_path"] is None
        r = client.get(f"/v1/artifacts/bundles/digits/1.0.0/{v['id']}.tar", headers=ADMIN)
        assert r.status_code == 404

    profile = x86_profile(flags=("avx2", "avx512_vnni"), openvino=True)
    device_id, device = enroll(client, profile=profile)
    r = client.post(
        "/v1/assignments",
        json={"model": "digits", "version": "1.0.0", "device_id": device_id},
        headers=ADMIN,
    )
    assert r.status_code == 201, r.text
    state = client.get(f"/v1/devices/{device_id}/desired-state", headers=device).json()
    (desired,) = state["models"]
    assert by_id[desired["variant_id"]]["status"] == "accepted"
    # the resolver, fed the manifests inside the accepted archives, agrees with the service
    specs = [_variant_from_public(client, v) for v in by_id.values() if v["status"] == "accepted"]
    assert desired["variant_id"] == resolve_variant(specs, profile).id  # type: ignore[union-attr]
    r = client.get(f"/v1/artifacts/{desired['artifact_path']}", headers=device)
    assert r.status_code == 200
    assert len(r.content) == desired["size"]


def _variant_from_public(client: httpx.Client, public: dict[str, object]) -> Variant:
    import io
    import json
    import tarfile

    body = client.get(f"/v1/artifacts/{public['artifact_path']}", headers=ADMIN).content
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = json.load(member)
    (variant,) = manifest["variants"]
    return Variant.model_validate(variant)

"""Upload -> every variant, through the real builds library (ONNX FP32/FP16/INT8, OpenVINO IR).

Runs on SQLite only: the build is the slow part and the database paths are the same as in the
FP32-only tests, which run on both databases.
"""

from __future__ import annotations

import re
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
    # Plain INT8 loses top-1 here, so a zero budget bites: the variant is rejected, or the
    # accuracy-aware search kept the costliest nodes in float until it lost nothing.
    int8 = by_id["onnx-int8"]
    steps = int8["build"]["steps"]
    assert steps[0]["delta"] > 0, steps
    assert int8["status"] == "rejected" or (steps[-1]["delta"] <= 0 and steps[-1]["kept_float"])
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


def test_transformer_gets_int4_variants_gated_on_embeddings(
    live_server: str,
    client: httpx.Client,
    samples_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """all-MiniLM-L6-v2 pushed with ``edgectl`` with the 240-sentence corpus as its validation
    set and no calibration set: the INT8 targets are skipped, the INT4 ones built and gated on
    cosine and top-10 retrieval agreement (the task the ONNX file declares), and ``edgectl
    models show`` prints the deciding metric, build-host latency, weights and precisions."""
    import numpy as np

    from agent import minilm
    from control_plane.cli import main
    from tests.control_plane.conftest import ADMIN_TOKEN

    monkeypatch.setenv("EDGECTL_CONFIG", str(tmp_path / "edgectl.json"))
    monkeypatch.setenv("COLUMNS", "250")
    source = minilm.minilm_onnx(samples_dir)
    val = tmp_path / "val.npz"
    np.savez(val, **minilm.encode(minilm.corpus()))  # type: ignore[arg-type]
    assert main(["login", "--url", live_server, "--token", ADMIN_TOKEN]) == 0
    assert main(["models", "create", "minilm", "--budget", "5"]) == 0
    push = ["models", "push", str(source), "--name", "minilm", "--version", "1.0.0"]
    assert main([*push, "--validation", str(val)]) == 0
    capsys.readouterr()
    assert main(["models", "show", "minilm", "1.0.0"]) == 0
    shown = capsys.readouterr().out
    assert "task embedding" in shown
    variants_table = shown.split("Quantization search")[0]
    for line in variants_table.splitlines():
        if "-int4" in line:
            assert re.search(r"int4 \d+", line), line  # compute ops in 4 bits, shown
            assert "retrieval" in line or "cosine" in line, line

    version = client.get("/v1/models/minilm/versions/1.0.0", headers=ADMIN).json()
    assert version["task"] == "embedding"
    by_id = {v["id"]: v for v in version["variants"]}
    assert {"onnx-int4", "openvino-int4"} <= set(by_id)
    fp32 = by_id["onnx-fp32"]["build"]["weight_bytes"]
    for target in ("onnx-int4", "openvino-int4"):
        v = by_id[target]
        assert v["precision"] == "int4"
        assert v["status"] == "accepted", v["accuracy"]
        assert v["accuracy"]["metric"] in ("cosine", "retrieval")
        # kept the task though its raw outputs moved: relative L2 with the same budget (the old
        # gate) would have rejected it
        assert v["accuracy"]["metrics"]["rel_l2"] > v["accuracy"]["budget"], v["accuracy"]
        assert v["build"]["weight_bytes"] < 0.3 * fp32
        # ONNX Runtime: every MatMul in 4 bits; OpenVINO: NNCF keeps the most sensitive 30 %
        # of the weights (and the embeddings) in INT8
        assert v["build"]["precisions"]["int4"] >= (30 if target == "onnx-int4" else 12)
        assert v["build"]["latency_ms"] > 0
        assert v["artifact_path"] is not None
    # OpenVINO's variants gated again with the CPU plugin's reduced float type where this host
    # has one (bf16 on AVX512-BF16/AMX), and the figure shown
    from agent.backends.openvino import OpenVinoBackend

    kind = OpenVinoBackend.cpu_inference_type()
    for target in ("openvino-fp16", "openvino-int4"):
        checks = by_id[target]["accuracy"].get("reduced_compute", {})  # omitted when empty
        assert set(checks) == {kind} - {"f32"}, checks
    assert (f"{kind} " in variants_table) == (kind != "f32")
    skipped = {s["id"]: s["reason"] for s in version.get("skipped") or []}
    assert "calibration" in skipped.get("onnx-int8", ""), version.get("skipped")

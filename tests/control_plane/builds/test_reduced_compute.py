"""An FP16 variant is gated as devices run it: OpenVINO's CPU plugin computes an ``fp16`` (or
``int4``) artifact's float parts in bf16 on AVX512-BF16/AMX CPUs unless told otherwise. The gate
measures the variant in f32 and, where the build host computes in a reduced type, in that type
too; a device's agent lets its CPU compute in a reduced type only where the gate accepted it.

On the PP-OCR detector over rendered text pages, bf16 costs about 5 points of box F1 (f32: none):
the variant is accepted, its bf16 figure is not, and the agent serves it in f32."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from agent.backends.openvino import OpenVinoBackend
from agent.config import BackendConfig, SwapConfig
from agent.contracts.manifest import MANIFEST_FILE, BundleManifest
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore
from agent.samples import text_page
from control_plane.builds import build_variants
from control_plane.cli._format import reduced_compute_text

pytestmark = pytest.mark.openvino

SIZE = 320


@pytest.fixture(scope="module")
def bundle(ppocr_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reduced")
    np.savez(tmp / "val.npz", x=text_page(8, seed=100, size=SIZE))
    build_variants(
        ppocr_path,
        tmp / "bundle",
        name="ppocr-det",
        version="1.0.0",
        calibration=None,
        validation=tmp / "val.npz",
        golden=None,
        targets=("onnx-fp32", "openvino-fp16"),
        task="detection",
    )
    return tmp / "bundle"


def test_fp16_is_gated_in_f32_and_in_the_hosts_reduced_type(bundle: Path) -> None:
    raw = (bundle / MANIFEST_FILE).read_bytes()
    manifest = BundleManifest.model_validate_json(raw)
    variant = manifest.variant("openvino-fp16")
    # written only where measured: an agent older than the field still reads other manifests
    kind = OpenVinoBackend.cpu_inference_type()
    written = {
        v["id"]: "reduced_compute" in (v["accuracy"] or {}) for v in json.loads(raw)["variants"]
    }
    assert written == {"onnx-fp32": False, "openvino-fp16": kind != "f32"}
    report = variant.accuracy
    assert report is not None
    assert report.metric == "box_f1"
    assert report.delta <= 1.0
    assert variant.status == "accepted"
    if kind == "f32":  # this host computes in f32 only: nothing else to measure
        assert report.reduced_compute == {}
        assert variant.reduced_compute == frozenset()
        return
    assert set(report.reduced_compute) == {kind}
    check = report.reduced_compute[kind]  # type: ignore[index]
    assert check.delta > report.budget
    assert not check.accepted
    assert check.value == pytest.approx(report.reference - check.delta, abs=1e-3)
    assert variant.reduced_compute == frozenset()
    text = reduced_compute_text(report.model_dump(mode="json"))
    assert text == f"; {kind} {check.value:.4g} (delta {check.delta:+.3g}): f32 on {kind} CPUs"


def test_the_agent_serves_a_variant_whose_reduced_type_failed_in_f32(
    bundle: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "state", keep_versions=3)
    store.install(bundle)
    store.activate("ppocr-det", "1.0.0")
    slot = ModelSlot(
        "ppocr-det",
        store,
        swap_config=SwapConfig(warmup_runs=1),
        backend_config=BackendConfig(pin_backend="openvino"),
    )
    page = text_page(1, seed=7, size=SIZE)
    try:
        slot.start("1.0.0")
        assert slot.current is not None
        assert slot.current.variant_id == "openvino-fp16"
        served = slot.infer({"x": page})
    finally:
        slot.close()
    core = ov.Core()
    xml = str(bundle / "openvino-fp16" / "model.xml")
    f32 = core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": page})[0]
    default = core.compile_model(xml, "CPU")({"x": page})[0]
    np.testing.assert_array_equal(next(iter(served.values())), f32)
    if OpenVinoBackend.cpu_inference_type() != "f32":
        assert not np.array_equal(f32, default)  # the reduced type would have served otherwise


def test_a_daemon_serves_it_over_http_in_f32(bundle: Path, tmp_path: Path) -> None:
    """The same bundle installed on a real ``edge-agent daemon`` (OpenVINO pinned): the local
    API's answer is the f32 compile's, not the plugin's bf16 one."""
    import os

    import httpx

    from tests.agent.daemon_proc import bundle_daemon, running_daemon

    config, port = bundle_daemon(
        tmp_path,
        bundle,
        "ppocr-det",
        "1.0.0",
        "reduced-f32",
        '[backends]\npin_backend = "openvino"\n[swap]\nwarmup_runs = 1\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = 1883\ntopic_prefix = "reduced-{os.getpid()}"\n',
    )
    page = text_page(1, seed=7, size=SIZE)
    body = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": list(page.shape),
                "data": page.ravel().tolist(),
            }
        ]
    }
    with running_daemon(config, port, tmp_path / "daemon.log"):
        r = httpx.post(f"http://127.0.0.1:{port}/v2/models/ppocr-det/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    served = np.asarray(out["data"], np.float32).reshape(out["shape"])
    xml = str(bundle / "openvino-fp16" / "model.xml")
    core = ov.Core()
    f32 = core.compile_model(xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": page})[0]
    default = core.compile_model(xml, "CPU")({"x": page})[0]

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    assert rel(served, f32) < 1e-5
    if OpenVinoBackend.cpu_inference_type() != "f32":
        assert rel(default, f32) > 1e-3  # what it would have served

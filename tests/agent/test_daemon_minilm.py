"""all-MiniLM-L6-v2 as a device serves it: the control plane's build pipeline makes its INT4
weight-only OpenVINO variant (gated on the corpus's cosine and top-10 retrieval, in f32 and in
the CPU's reduced float type), a real ``edge-agent daemon`` serves it from its store, with an
inference loop on synthetic token tensors, and the unmodified Triton HTTP client sends it INT64
tokens in binary form (read-only views of the request body, each copied for OpenVINO); a
token id outside the model's tables is refused by name. The local API says what computes the
answers: the variant, and the float type the CPU plugin
computes in, which is the CPU's reduced type only where the gate accepted it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient

from agent import minilm
from agent.backends import get_backend
from agent.backends.openvino import OpenVinoBackend
from agent.contracts.manifest import MANIFEST_FILE, BundleManifest
from tests.agent.daemon_proc import bundle_daemon, running_daemon

SENTENCES = ["The forecast warns of heavy rain.", "It will pour this afternoon.", "Goal!"]

pytestmark = pytest.mark.skipif(
    not get_backend("openvino").probe().usable, reason="OpenVINO is not usable here"
)


@pytest.fixture(scope="module")
def int4_bundle(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from control_plane.builds import build_variants

    work = tmp_path_factory.mktemp("minilm-int4")
    val = work / "val.npz"
    np.savez(val, **minilm.encode(minilm.corpus()))  # type: ignore[arg-type]
    manifest = build_variants(
        minilm.minilm_onnx(samples_dir),
        work / "bundle",
        name="minilm",
        version="1.0.0",
        calibration=None,
        validation=val,
        golden=None,
        accuracy_budget=5,
        targets=("openvino-int4",),
    )
    assert [v.id for v in manifest.variants] == ["openvino-int4"]
    return work / "bundle"


def _in_process_fp32(samples_dir: Path, feeds: dict[str, Any]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(minilm.minilm_onnx(samples_dir)), providers=["CPUExecutionProvider"]
    )
    out: np.ndarray[Any, Any] = session.run([minilm.OUTPUT_NAME], feeds)[0]
    return out


@pytest.mark.parametrize("reduced", ["as gated", "withheld"])
def test_daemon_serves_minilm_int4_tokens_over_http_and_its_loop(
    int4_bundle: Path, samples_dir: Path, tmp_path: Path, reduced: str
) -> None:
    manifest = BundleManifest.model_validate_json((int4_bundle / MANIFEST_FILE).read_text())
    (variant,) = manifest.variants
    cpu_type = OpenVinoBackend.cpu_inference_type()
    backends = '[backends]\nintra_op_threads = 1\nopenvino_device = "CPU"\n'
    if reduced == "withheld":
        # the gate's reduced type withheld: what a device gets when its CPU type was rejected
        bundle = tmp_path / "bundle"
        shutil.copytree(int4_bundle, bundle)
        data = manifest.model_dump(mode="json")
        data["variants"][0]["accuracy"]["reduced_compute"] = {}
        (bundle / MANIFEST_FILE).write_text(BundleManifest.model_validate(data).model_dump_json())
        expected = "f32"
    else:
        bundle = int4_bundle
        expected = cpu_type if cpu_type in variant.reduced_compute else "f32"
    config, port = bundle_daemon(
        tmp_path,
        bundle,
        "minilm",
        "1.0.0",
        f"minilm-{os.getpid()}",
        backends + "[loop]\nrate_hz = 20\nwindow_s = 0.5\n[swap]\nwarmup_runs = 1\n",
    )
    feeds = minilm.encode(SENTENCES)
    with running_daemon(config, port, tmp_path / "daemon.log", timeout_s=120):
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        meta = client.get_model_metadata("minilm")
        inputs = []
        for name, array in feeds.items():
            item = httpclient.InferInput(name, list(array.shape), "INT64")
            item.set_data_from_numpy(array, binary_data=True)
            inputs.append(item)
        got = client.infer("minilm", inputs).as_numpy(minilm.OUTPUT_NAME)
        refused = {}
        for name, value in (("input_ids", 30522), ("input_ids", -1), ("token_type_ids", 2)):
            # an id from another tokenizer's vocabulary: OpenVINO alone would answer it
            wrong = {k: v.copy() for k, v in feeds.items()}
            wrong[name][0, 1] = value
            body = {
                "inputs": [
                    {
                        "name": k,
                        "datatype": "INT64",
                        "shape": list(v.shape),
                        "data": v.ravel().tolist(),
                    }
                    for k, v in wrong.items()
                ]
            }
            answer = httpx.post(f"http://127.0.0.1:{port}/v2/models/minilm/infer", json=body)
            refused[(name, value)] = (answer.status_code, answer.json().get("error", ""))
        # a sequence longer than the model's 512 positions
        long = {k: np.ones((1, 600), np.int64) for k in minilm.INPUT_NAMES}
        body = {
            "inputs": [
                {"name": k, "datatype": "INT64", "shape": [1, 600], "data": v.ravel().tolist()}
                for k, v in long.items()
            ]
        }
        answer = httpx.post(f"http://127.0.0.1:{port}/v2/models/minilm/infer", json=body)
        refused[("sequence", 600)] = (answer.status_code, answer.json().get("error", ""))
        again = client.infer("minilm", inputs).as_numpy(minilm.OUTPUT_NAME)  # nothing lost
        client.close()
        time.sleep(1.2)  # a loop window closes
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    state = str(tmp_path / "state")
    listed = subprocess.run(
        [sys.executable, "-m", "agent.cli", "models", "list", "--json", "--state-dir", state],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == dict.fromkeys(
        minilm.INPUT_NAMES, "INT64"
    )
    params = meta["parameters"]
    assert (params["variant"], params["backend"], params["device"]) == (
        "openvino-int4",
        "openvino",
        "CPU",
    )
    assert params["compute"] == expected, (params, variant.reduced_compute)
    [row] = json.loads(listed.stdout)
    assert row["serving"]["compute"] == expected  # what the daemon recorded for the CLI
    assert got is not None
    assert got.shape == (3, 384)
    np.testing.assert_array_equal(again, got)
    ranges = {s.name: s.value_range for s in variant.inputs}
    assert ranges == {"input_ids": (0, 30521), "attention_mask": None, "token_type_ids": (0, 1)}
    assert {s.max_shape for s in variant.inputs} == {(-1, 512)}  # declared by the ONNX file
    assert refused == {
        ("input_ids", 30522): (
            400,
            "minilm: input 'input_ids': values must lie in [0, 30521] (found 30522)",
        ),
        ("input_ids", -1): (
            400,
            "minilm: input 'input_ids': values must lie in [0, 30521] (found -1)",
        ),
        ("token_type_ids", 2): (
            400,
            "minilm: input 'token_type_ids': values must lie in [0, 1] (found 2)",
        ),
        ("sequence", 600): (
            400,
            "minilm: input 'input_ids': dimension 1 is 600 where the model takes at most 512",
        ),
    }
    ref = _in_process_fp32(samples_dir, feeds)
    cosine = np.sum(got * ref, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert float(cosine.min()) > 0.95, cosine  # 4-bit weights keep each sentence's meaning
    assert float(got[0] @ got[1]) > float(got[0] @ got[2])  # rain is nearer rain than football
    ok = [
        line
        for line in metrics.splitlines()
        if line.startswith("edge_agent_loop_frames_total{")
        and 'model="minilm"' in line
        and 'result="ok"' in line
    ]
    assert ok, metrics[-2000:]
    assert float(ok[0].rsplit(" ", 1)[1]) > 0, ok

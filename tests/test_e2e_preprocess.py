"""Preprocessing declared with the model, end to end: ``edgectl models push --preprocess``
against a real control plane (``edgectl serve``), stored with the version, written into every
variant's manifest, and applied by a real ``edge-agent daemon`` whose loop reads an image
folder. The model passes its input through (``x`` and ``-x``), so the loop's results (argmax
and max of each output) are compared with the same preprocessing done by hand. A version pushed
without preprocessing first gets the default, and the daemon warns about it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from tests.agent.updates.fleet import ADMIN_TOKEN, free_port
from tests.test_e2e_ota import Operator
from tests.test_e2e_variant_choice import BIN, serve

__all__ = ["serve"]

H, W = 32, 48  # the model's input
FRAME_H, FRAME_W = 40, 64  # the camera's frames: another aspect ratio
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SPEC = (
    f"resize={H}x{W},layout=nchw,mean={','.join(map(str, MEAN))},std={','.join(map(str, STD))},"
    "color=bgr,fit=letterbox,pad=114"
)


def passthrough_model(path: Path) -> Path:
    """``image`` Nx3xHxW -> ``pos`` = image * 1, ``neg`` = -image."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["image", "one"], ["pos"]),
            helper.make_node("Neg", ["image"], ["neg"]),
        ],
        "passthrough",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, H, W])],
        [
            helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["N", 3, H, W]),
            helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", 3, H, W]),
        ],
        initializer=[one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def by_hand(frame: np.ndarray[Any, Any], declared: bool) -> np.ndarray[Any, Any]:
    """The model's input for ``frame`` (RGB uint8), computed here without the agent's code."""
    if not declared:  # the default: stretch to the input, RGB, x / 255
        img = cv2.resize(frame, (W, H), interpolation=cv2.INTER_LINEAR).astype(np.float64) / 255
        return img.transpose(2, 0, 1)[None]
    s = min(H / FRAME_H, W / FRAME_W)
    nh, nw = round(FRAME_H * s), round(FRAME_W * s)
    canvas = np.full((H, W, 3), 114, np.uint8)
    top, left = (H - nh) // 2, (W - nw) // 2
    canvas[top : top + nh, left : left + nw] = cv2.resize(
        frame, (nw, nh), interpolation=cv2.INTER_LINEAR
    )
    bgr = canvas[:, :, ::-1].astype(np.float64) / 255
    norm = (bgr - np.array(MEAN)) / np.array(STD)
    return norm.transpose(2, 0, 1)[None]


def digest(x: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "pos": (int(x.argmax()), float(x.max())),
        "neg": (int((-x).argmax()), float((-x).max())),
    }


def _config(tmp_path: Path, url: str, token: str, tuf_root: Path, folder: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f"""
device_id = "pre-device"
state_dir = "{tmp_path / "state"}"
log_json = true
models = [{{name = "pre"}}]

[backends]
pin_backend = "onnxruntime"
pin_precision = "fp32"
intra_op_threads = 1

[loop]
rate_hz = 20
window_s = 1
sink_path = "{tmp_path / "results.jsonl"}"

[loop.source]
kind = "images"
path = "{folder}"

[swap]
probation_s = 0.5
warmup_runs = 1
probation_min_inferences = 1
max_p99_ratio = 100

[api]
http_port = {free_port()}
grpc_port = 0

[control_plane]
url = "{url}"
bootstrap_token = "{token}"
tuf_root_path = "{tuf_root}"
poll_interval_s = 0.5
""",
        encoding="utf-8",
    )
    return path


def _api(url: str, path: str) -> Any:
    res = httpx.get(f"{url}{path}", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    res.raise_for_status()
    return res.json()


def _last_results(path: Path, n: int = 3) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return [json.loads(line) for line in lines[-n:]]


def _wait_for_outputs(
    sink: Path, want: dict[str, Any], proc: subprocess.Popen[bytes], log: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    last: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        last = _last_results(sink)
        if last and all(_matches(r, want) for r in last):
            return last[-1]
        time.sleep(0.3)
    raise AssertionError(f"loop results {last} never matched {want}")


def _matches(record: dict[str, Any], want: dict[str, Any]) -> bool:
    for name, (argmax, top) in want.items():
        out = record["outputs"][name]
        if out["argmax"] != argmax or abs(out["max"] - top) > 1e-4:
            return False
    return True


@pytest.mark.timeout(600)
def test_preprocessing_pushed_with_the_model_is_applied_on_the_device(
    serve: str, tmp_path: Path
) -> None:
    edgectl = Operator(serve, tmp_path)
    tuf_root = tmp_path / "root.json"
    tuf_root.write_bytes(edgectl("tuf", "root"))
    model = passthrough_model(tmp_path / "pre.onnx")
    rng = np.random.default_rng(7)
    frame = rng.integers(0, 256, size=(FRAME_H, FRAME_W, 3), dtype=np.uint8)
    folder = tmp_path / "camera"
    folder.mkdir()
    Image.fromarray(frame).save(folder / "frame.png")
    golden = tmp_path / "golden.npz"
    np.savez(golden, image=rng.random((4, 3, H, W), dtype=np.float32))
    edgectl("models", "create", "pre")
    edgectl(
        "models", "push", str(model), "--name", "pre", "--version", "1.0.0", "--golden", str(golden)
    )
    token = (
        edgectl("bootstrap-tokens", "create", "pre", "--label", "fleet=pre", "--uses", "1")
        .decode()
        .split()[-1]
    )
    config = _config(tmp_path, serve, token, tuf_root, folder)
    log = tmp_path / "agent.log"
    sink = tmp_path / "results.jsonl"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "daemon", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        edgectl("deploy", "pre", "1.0.0", "--to", "fleet=pre")
        # Declared nothing: the default (stretched, RGB, x/255), and a warning saying so.
        _wait_for_outputs(sink, digest(by_hand(frame, declared=False)), proc, log)
        warnings = [
            json.loads(line)
            for line in log.read_text().splitlines()
            if '"loop_without_preprocessing"' in line
        ]
        assert len(warnings) == 1, log.read_text()[-3000:]
        assert warnings[0]["source"] == "images"
        assert warnings[0]["version"] == "1.0.0"

        pushed = edgectl(
            "models",
            "push",
            str(model),
            "--name",
            "pre",
            "--version",
            "1.1.0",
            "--preprocess",
            SPEC,
            "--golden",
            str(golden),
        ).decode()
        assert "preprocessing: resize 32x48 (letterbox), NCHW, bgr" in pushed
        edgectl("deploy", "pre", "1.1.0", "--to", "fleet=pre")
        want = digest(by_hand(frame, declared=True))
        assert want != digest(by_hand(frame, declared=False))
        _wait_for_outputs(sink, want, proc, log)
        warnings_after = log.read_text().count('"loop_without_preprocessing"')
        assert warnings_after == 1  # the declared version brought no warning
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    # Stored with the version, and in every variant's manifest the devices download.
    assert (
        "preprocessing: resize 32x48 (letterbox)"
        in edgectl("models", "show", "pre", "1.1.0").decode()
    )
    shown = _api(serve, "/v1/models/pre/versions/1.1.0")
    assert shown["preprocessing"]["fit"] == "letterbox"
    assert tuple(shown["preprocessing"]["std"]) == STD
    pulled = tmp_path / "pulled"
    edgectl("models", "pull", "pre", "1.1.0", "--out", str(pulled))
    archives = sorted(pulled.glob("*.tar"))
    assert archives
    for archive in archives:
        with tarfile.open(archive) as tar:
            member = tar.extractfile("manifest.json")
            assert member is not None
            manifest = json.load(member)
        assert manifest["preprocessing"]["resize"] == [H, W], archive.name
        assert manifest["preprocessing"]["color"] == "bgr"
        assert manifest["preprocessing"]["mean"] == list(MEAN)


def test_a_bad_preprocess_spec_is_refused_before_upload(serve: str, tmp_path: Path) -> None:
    edgectl = Operator(serve, tmp_path)
    model = passthrough_model(tmp_path / "pre.onnx")
    golden = tmp_path / "golden.npz"
    np.savez(golden, image=np.zeros((2, 3, H, W), np.float32))
    edgectl("models", "create", "pre")
    args = ["--name", "pre", "--version", "1.0.0", "--preprocess"]
    for spec, message in (
        ("resize=640,layout=nchw", "resize"),
        ("resize=64x64,std=0,1,1", "std must not contain zeros"),
        ("resize=64x64,fit=squash", "fit"),
        ("resize=64x64,gamma=2", "unknown key"),
    ):
        res = subprocess.run(
            [str(BIN / "edgectl"), "models", "push", str(model), *args, spec],
            env=edgectl.env,
            capture_output=True,
            timeout=120,
        )
        err = res.stderr.decode()
        assert res.returncode != 0, spec
        assert message in err, (spec, err)
        assert "Traceback" not in err
    # The server checks the field too (a client that skips the CLI's check).
    for bad in ('{"fit": "squash"}', "resize=8x8,std=0", "x" * 2000):
        answer = httpx.post(
            f"{serve}/v1/models/pre/versions",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            data={"version": "1.0.0", "preprocessing": bad},
            files={
                "onnx": ("pre.onnx", model.read_bytes(), "application/octet-stream"),
                "golden": ("golden.npz", golden.read_bytes(), "application/octet-stream"),
            },
            timeout=60,
        )
        assert answer.status_code in (400, 413, 422), answer.text
    assert not _api(serve, "/v1/models/pre")["versions"]  # nothing was stored

"""The daemon is the product: a control plane (``edgectl serve``, a real process) builds every
variant of a model, and one ``edge-agent daemon`` per board class (the recorded board files of
``tests/fixtures/boards`` standing in for the hardware, this machine's runtimes running the
models) enrolls, is offered the variants that fit its profile, measures them, serves the
fastest within tolerance through the loop and the local API, and reports it. The operator's
views (``/v1/devices/...``, ``edgectl devices show``) and the local API must agree on what
serves and say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.backends.choice import Choice
from agent.contracts.profile import HardwareProfile
from agent.samples import DigitsData
from tests.agent.updates.fleet import ADMIN_TOKEN, BOOTSTRAP_TOKEN, free_port
from tests.test_e2e_ota import Operator

BIN = Path(sys.executable).parent
BOARDS = Path(__file__).resolve().parent / "fixtures" / "boards"
# One device per board class: this x86 machine itself, a Jetson and a Raspberry Pi (their board
# files), and an x86 box of another vendor. The CI form runs this machine and the Jetson (four
# daemons measuring at once on two cores is most of this test's time); EDGEFLEET_SOAK=1 all four.
ALL_DEVICES = {
    "live-x86": Path("/"),
    "jetson": BOARDS / "jetson-orin-nano-super-jp6",
    "rpi5": BOARDS / "rpi5-bookworm",
    "zen4": BOARDS / "x86-amd-zen4",
}
DEVICES = (
    ALL_DEVICES
    if os.environ.get("EDGEFLEET_SOAK") == "1"
    else {k: ALL_DEVICES[k] for k in ("live-x86", "jetson")}
)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[str]:
    """``edgectl serve`` on a free loopback port, with the full variant build."""
    port = free_port()
    env = {
        **os.environ,
        "EDGEFLEET_CP__DATA_DIR": str(tmp_path / "cp"),
        "EDGEFLEET_CP__ADMIN_TOKEN": ADMIN_TOKEN,
        "EDGEFLEET_CP__BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN,
        "EDGEFLEET_CP__HOST": "127.0.0.1",
        "EDGEFLEET_CP__PORT": str(port),
        "EDGEFLEET_CP__LOG_LEVEL": "warning",
        "EDGEFLEET_CP__DATABASE_URL": "",
        "EDGEFLEET_CP__DESIRED_STATE_CACHE_TTL_S": "0",
    }
    with (tmp_path / "cp.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "edgectl"), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            assert proc.poll() is None, (tmp_path / "cp.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "edgectl serve did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _config(
    tmp_path: Path, name: str, root: Path, url: str, tuf_root: Path, port: int, token: str
) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"""
device_id = "{name}"
state_dir = "{tmp_path / name}"
log_level = "info"
log_json = true
models = [{{name = "digits"}}]

[hardware]
root = "{root}"

[backends]
choice_budget_s = 2.0
intra_op_threads = 1

[loop]
rate_hz = 20
window_s = 1

[swap]
probation_s = 1
warmup_runs = 2
max_p99_ratio = 100

[api]
http_port = {port}
grpc_port = 0

[control_plane]
url = "{url}"
bootstrap_token = "{token}"
tuf_root_path = "{tuf_root}"
poll_interval_s = 0.5

[control_plane.labels]
board = "{name}"
""",
        encoding="utf-8",
    )
    return path


def _devices(url: str) -> dict[str, dict[str, Any]]:
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as c:
        listing = c.get("/v1/devices").json()
        return {d["name"]: c.get(f"/v1/devices/{d['id']}").json() for d in listing}


def _serving(device: dict[str, Any]) -> dict[str, Any] | None:
    for m in (device.get("reported") or {}).get("models", []):
        if m["name"] == "digits" and m["phase"] == "committed" and m.get("variant_id"):
            return dict(m)
    return None


@pytest.mark.timeout(600)
def test_each_board_class_serves_its_measured_variant(
    serve: str, tmp_path: Path, digits_path: Path, digits: DigitsData
) -> None:
    edgectl = Operator(serve, tmp_path)
    tuf_root = tmp_path / "root.json"
    tuf_root.write_bytes(edgectl("tuf", "root"))
    cal = tmp_path / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    edgectl("models", "create", "digits")
    edgectl(
        "models",
        "push",
        str(digits_path),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--calibration",
        str(cal),
    )
    ports = {name: free_port() for name in DEVICES}
    # fleet=boards comes with the bootstrap token; board=<name> is only the device's request
    created = edgectl(
        "bootstrap-tokens",
        "create",
        "boards",
        "--label",
        "fleet=boards",
        "--uses",
        str(len(DEVICES)),
    )
    token = created.decode().split()[-1]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = contextlib.ExitStack()
    try:
        for name, root in DEVICES.items():
            config = _config(tmp_path, name, root, serve, tuf_root, ports[name], token)
            procs[name] = subprocess.Popen(
                [str(BIN / "edge-agent"), "daemon", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=logs.enter_context((tmp_path / f"{name}.log").open("wb")),
            )
        edgectl("deploy", "digits", "1.0.0", "--to", "fleet=boards")
        deadline = time.monotonic() + 240
        while True:
            devices = _devices(serve)
            if len(devices) == len(DEVICES) and all(_serving(d) for d in devices.values()):
                break
            for name, proc in procs.items():
                assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < deadline, json.dumps(devices, indent=1)[-4000:]
            time.sleep(0.5)
        shown = {name: edgectl("devices", "show", d["id"]).decode() for name, d in devices.items()}
        apis = {}
        for name, port in ports.items():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
                meta = api.get("/v2/models/digits").json()
                answer = api.post(
                    "/v2/models/digits/infer",
                    json={
                        "inputs": [
                            {
                                "name": "input",
                                "datatype": "FP32",
                                "shape": [1, 1, 8, 8],
                                "data": digits.x_test[0].ravel().tolist(),
                            }
                        ]
                    },
                ).json()
            apis[name] = (meta, answer)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()

    with httpx.Client(
        base_url=serve, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    ) as c:
        version = c.get("/v1/models/digits/versions/1.0.0").json()
    accepted = {v["id"] for v in version["variants"] if v["status"] == "accepted"}
    assert len(accepted) >= 3, version["variants"]  # the build yields several variants

    # Offline: the operator pulls the archives, a technician installs them as one version.
    pulled = tmp_path / "usb"
    edgectl("models", "pull", "digits", "1.0.0", "--out", str(pulled))
    archives = sorted(str(p) for p in pulled.glob("*.tar"))
    assert len(archives) == len(accepted)
    offline = tmp_path / "offline-device"
    res = subprocess.run(
        [str(BIN / "edge-agent"), "models", "install", *archives, "--state-dir", str(offline)],
        capture_output=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr.decode()
    listing = subprocess.run(
        [str(BIN / "edge-agent"), "models", "list", "--json", "--state-dir", str(offline)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    [row] = json.loads(listing.stdout)
    assert set(row["variants"]) == accepted

    for name, device in devices.items():
        reported = _serving(device)
        assert reported is not None
        desired = device["desired"]["models"][0]
        offered = [c["variant_id"] for c in desired["candidates"]]
        # What the control plane offers is what the variant contract says fits this profile;
        # the device served one of them and says why, in the operator's views and its API.
        profile = HardwareProfile.model_validate(device["profile"])
        assert offered[0] == desired["variant_id"]
        assert set(offered) <= accepted
        assert reported["variant_id"] in offered, (name, reported, offered)
        assert reported["choice"], reported
        if len(offered) > 1:
            assert reported["choice"].startswith("measured: "), reported["choice"]
        assert reported["variant_id"] in shown[name], shown[name]
        assert reported["choice"][:40] in shown[name].replace("\n", ""), shown[name]
        meta, answer = apis[name]
        assert meta["parameters"]["variant"] == reported["variant_id"], meta
        assert answer["model_version"] == "1.0.0"
        assert answer["parameters"]["variant"] == reported["variant_id"], answer
        assert np.argmax(answer["outputs"][0]["data"]) == digits.y_test[0]
        if len(offered) > 1:
            # Every fetched candidate's archive stays as a delta base: the next version can
            # travel as a delta from whichever variant the device serves.
            bases = tmp_path / name / "bases" / "digits" / "1.0.0"
            kept = {p.stem for p in bases.glob("*.tar")}
            assert reported["variant_id"] in kept, (name, kept)
            assert len(kept) >= 2, (name, kept)
        if profile.board.kind == "jetson":
            # This machine's ONNX Runtime has no CUDA provider: GPU variants are left out.
            assert not any(v.startswith("onnx-fp16") for v in offered), offered

    # This x86 CPU: the daemon serves the variant its measurement found fastest within
    # tolerance (a ten-percent tie goes to the more accurate), whichever runtime that is.
    choices = [
        Choice.model_validate_json(p.read_bytes())
        for p in (tmp_path / "live-x86" / "choices").glob("*.json")
        if not p.name.startswith("serving-")
    ]
    assert len(choices) == 1
    choice = choices[0]
    timed = [m for m in choice.measurements if m.status == "measured" and m.p50_ms is not None]
    fastest = min(m.p50_ms for m in timed if m.p50_ms is not None)
    chosen = choice.measurement(choice.chosen)
    assert chosen.p50_ms is not None
    assert chosen.p50_ms <= fastest * 1.10 + 1e-9
    live = _serving(devices["live-x86"])
    assert live is not None
    assert live["variant_id"] == choice.chosen.split(":", 2)[2]

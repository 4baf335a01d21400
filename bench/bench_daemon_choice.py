"""The daemon's variant choice, measured from outside: is the variant ``edge-agent daemon`` serves
within 10% of the fastest accepted variant, and what does its local API add?

For the PP-OCR detector (golden input: a rendered text page, 1x3x640x640) and the digits CNN this
builds the full variant set with the control plane's build (ONNX FP32/FP16/INT8, OpenVINO IR
FP16/INT8, each behind the accuracy gate), installs every accepted variant as one version in a
fresh state directory, and starts a real ``edge-agent daemon`` on it (default settings: the
measured choice with its own time budget). Once the daemon serves, the bench

1. times the daemon's local API (HTTP, binary tensors, one client) against an in-process
   session of the same variant, side by side in alternating rounds (PP-OCR only);
2. stops the daemon and times every accepted variant that fits this machine exhaustively, in
   alternating blocks with the daemon's hot-path options, then prints chosen p50 / fastest
   accepted p50.

    .venv/bin/python bench/bench_daemon_choice.py [--models ppocr-det,digits] [--build-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.backends import LoadOptions, load_first
from agent.contracts.fit import fitting
from agent.hardware import detect_profile
from agent.models.slots import read_serving_record, variant_artifact
from agent.models.store import ModelStore
from agent.samples import digits_cnn, digits_data, ppocr_detector, text_page

BIN = Path(sys.executable).parent
ROUNDS = {"ppocr-det": 40, "digits": 5000}  # runs per variant
API_ROUNDS = {"ppocr-det": 40}
BLOCKS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build(name: str, work: Path) -> Path:
    """The control plane's full variant build of ``name`` (kept under ``work``); the bundle."""
    from control_plane.builds import build_variants

    if name == "ppocr-det":
        source = ppocr_detector()
        cal = work / "cal.npz"
        np.savez(cal, x=np.concatenate([text_page(1, seed) for seed in range(8)]))
        golden = work / "golden.npz"
        np.savez(golden, x=text_page(1, 100))
        task = "detection"
    else:
        source = digits_cnn()
        data = digits_data()
        cal = work / "cal.npz"
        np.savez(cal, input=data.x_train[:128])
        golden = work / "golden.npz"
        np.savez(golden, input=data.x_test[:1])
        task = "classification"
    out = work / f"bundle-{name}"
    if (out / "manifest.json").exists():  # --build-dir: built by an earlier run
        print(f"{name}: reusing the bundle in {out}")
        return out
    started = time.perf_counter()
    manifest = build_variants(
        source,
        out,
        name=name,
        version="1.0.0",
        calibration=cal,
        validation=None,
        golden=golden,
        task=task,  # type: ignore[arg-type]
    )
    accepted = [v.id for v in manifest.variants if v.status == "accepted"]
    rejected = [v.id for v in manifest.variants if v.status != "accepted"]
    print(
        f"{name}: built in {time.perf_counter() - started:.1f} s; accepted {accepted}; "
        f"rejected {rejected}"
    )
    return out


def start_daemon(state_dir: Path, port: int) -> subprocess.Popen[bytes]:
    config = state_dir.parent / f"{state_dir.name}.toml"
    config.write_text(
        f"""
device_id = "bench"
state_dir = "{state_dir}"
log_level = "warning"
log_json = true

[api]
http_port = {port}
grpc_port = 0
""",
        encoding="utf-8",
    )
    log = (state_dir.parent / f"{state_dir.name}.log").open("wb")
    return subprocess.Popen(
        [str(BIN / "edge-agent"), "daemon", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def wait_ready(port: int, name: str, proc: subprocess.Popen[bytes], timeout_s: float) -> float:
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited with {proc.returncode}")
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/v2/models/{name}/ready", timeout=2)
            if r.status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("daemon did not serve in time")


def api_vs_inprocess(
    port: int, name: str, feeds: dict[str, np.ndarray[Any, Any]], session: Any, rounds: int
) -> tuple[float, float]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inputs = []
        for key, array in feeds.items():
            tensor = httpclient.InferInput(key, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array, binary_data=True)
            inputs.append(tensor)
        api: list[float] = []
        local: list[float] = []
        for _ in range(3):
            client.infer(name, inputs)
            session.run(feeds)
        for _ in range(rounds):
            t = time.perf_counter()
            client.infer(name, inputs)
            api.append(time.perf_counter() - t)
            t = time.perf_counter()
            session.run(feeds)
            local.append(time.perf_counter() - t)
    finally:
        client.close()
    return float(np.median(api)) * 1e3, float(np.median(local)) * 1e3


def exhaustive(
    bundle: Path, name: str, feeds: dict[str, np.ndarray[Any, Any]], rounds: int
) -> dict[str, float]:
    """p50 ms of every accepted variant that fits here, interleaved rounds, the daemon's
    hot-path options."""
    from agent.models.bundle import read_manifest

    manifest = read_manifest(bundle)
    sessions = {}
    # The variants that fit this machine by the variant contract: what the daemon chose among.
    for v in fitting(manifest.variants, detect_profile()).ranked:
        artifact = variant_artifact(name, v, bundle)
        try:
            sessions[v.id] = load_first(artifact, LoadOptions(), order=(v.runtime,))
        except Exception as exc:
            print(f"  {v.id}: does not load here ({exc})")
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(feeds)
    # Blocks of back-to-back runs per variant, the variants alternating between blocks: a served
    # model runs back to back too (warm caches), and alternating spreads any background load
    # over every variant alike.
    per_block = max(1, rounds // BLOCKS)
    for _ in range(BLOCKS):
        for k, s in sessions.items():
            for _ in range(per_block):
                t = time.perf_counter()
                s.run(feeds)
                times[k].append(time.perf_counter() - t)
    for s in sessions.values():
        s.close()
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def golden_feeds(bundle: Path) -> dict[str, np.ndarray[Any, Any]]:
    from agent.models.bundle import golden_sets, read_manifest

    return dict(golden_sets(bundle, read_manifest(bundle))[0].inputs)


def run(name: str, work: Path, builds: Path) -> dict[str, Any]:
    bundle = build(name, builds)
    state = work / f"state-{name}"
    store = ModelStore(state)
    store.install(bundle)
    store.activate(name, "1.0.0")
    port = _free_port()
    proc = start_daemon(state, port)
    result: dict[str, Any] = {"model": name}
    try:
        result["disk_to_serving_s"] = wait_ready(port, name, proc, timeout_s=300)
        record = read_serving_record(state / "choices", name)
        assert record is not None, "the daemon wrote no serving record"
        result["chosen"] = record.variant_id
        result["why"] = record.choice
        feeds = golden_feeds(bundle)
        if name in API_ROUNDS:
            from agent.models.bundle import read_manifest

            variant = next(v for v in read_manifest(bundle).variants if v.id == record.variant_id)
            artifact = variant_artifact(name, variant, bundle)
            session = load_first(artifact, LoadOptions(), order=(variant.runtime,))
            try:
                api, local = api_vs_inprocess(port, name, feeds, session, API_ROUNDS[name])
            finally:
                session.close()
            result["api_p50_ms"], result["inprocess_p50_ms"] = api, local
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    p50 = exhaustive(bundle, name, feeds, ROUNDS[name])
    result["p50_ms"] = p50
    fastest = min(p50, key=lambda k: p50[k])
    result["fastest"] = fastest
    result["ratio"] = p50[result["chosen"]] / p50[fastest]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocr-det,digits")
    parser.add_argument(
        "--build-dir", type=Path, help="keep the built bundles here and reuse them in later runs"
    )
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-daemon-choice-") as tmp:
        builds = args.build_dir or Path(tmp) / "builds"
        builds.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            rows.append(run(name, Path(tmp), builds))
    for r in rows:
        print(f"\n{r['model']}: the daemon serves {r['chosen']} ({r['why']})")
        print(f"  disk to serving (measuring included): {r['disk_to_serving_s']:.1f} s")
        for k, v in sorted(r["p50_ms"].items(), key=lambda kv: kv[1]):
            mark = " <- served" if k == r["chosen"] else ""
            print(f"  {k:18} p50 {v:8.3f} ms{mark}")
        print(f"  chosen / fastest accepted ({r['fastest']}): {r['ratio']:.3f}  (goal <= 1.10)")
        if "api_p50_ms" in r:
            print(
                f"  local API p50 {r['api_p50_ms']:.2f} ms / in-process p50 "
                f"{r['inprocess_p50_ms']:.2f} ms = {r['api_p50_ms'] / r['inprocess_p50_ms']:.3f}"
            )
    print("\n" + json.dumps([{k: v for k, v in r.items() if k != "why"} for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

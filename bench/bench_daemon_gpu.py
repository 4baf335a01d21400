"""The daemon on an NVIDIA GPU: which variant does ``edge-agent daemon`` serve, and how fast is it
against a plain ONNX Runtime CUDA FP32 ``session.run``?

Run on the GPU machine (docs/gpu.md): ResNet-50 (torchvision, random weights, batch 1) is exported
to ONNX and the control plane's FP16 converter makes its GPU variant. A bundle with both
(``onnx-fp32`` for any device, ``onnx-fp16`` for NVIDIA GPUs) is installed in a fresh state
directory and a real ``edge-agent daemon`` serves it: it measures the variants that fit (both,
on a device whose ONNX Runtime has the CUDA provider) and serves the fastest within tolerance.
The bench reads what it serves from the local API's model metadata, checks an answer over HTTP,
stops the daemon, and then times, side by side in alternating blocks:

- the served variant through the agent's own GPU path (I/O binding, CUDA graphs), as the daemon
  runs it;
- plain ``onnxruntime.InferenceSession(fp32, providers=["CUDAExecutionProvider"]).run``.

    python3 bench/bench_daemon_gpu.py [--out results.json]
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

from agent.backends import Artifact, LoadOptions, load_first
from agent.contracts.manifest import TargetConstraints, Tolerance
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.store import ModelStore

EXPORT = """
import sys, torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet50(weights=None).eval()
x = torch.randn(1, 3, 224, 224)
kw = dict(input_names=["input"], output_names=["logits"], opset_version=17)
try:
    torch.onnx.export(m, (x,), sys.argv[1], dynamo=False, **kw)
except Exception as exc:
    print("torchscript exporter failed, using dynamo:", exc, file=sys.stderr)
    torch.onnx.export(m, (x,), sys.argv[1], dynamo=True, **kw)
"""
BLOCKS = 10
RUNS = 400  # per variant


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_bundle(work: Path) -> tuple[Path, Path, np.ndarray[Any, Any]]:
    from control_plane.builds._onnx import convert_fp16

    fp32 = work / "resnet50.onnx"
    subprocess.run([sys.executable, "-c", EXPORT, str(fp32)], check=True)
    fp16 = work / "resnet50-fp16.onnx"
    convert_fp16(fp32, fp16)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    bundle = work / "bundle"
    build_bundle(
        bundle,
        "resnet50",
        "1.0.0",
        [
            VariantSpec(fp32, id="onnx-fp32", tolerance=Tolerance(max_rel_l2=1e-2)),
            VariantSpec(
                fp16,
                precision="fp16",
                id="onnx-fp16",
                target=TargetConstraints(accelerator="nvidia-gpu"),
                tolerance=Tolerance(max_rel_l2=2e-2),
            ),
        ],
        golden_inputs={"input": x},
    )
    return bundle, fp32, x


def serve(bundle: Path, work: Path) -> dict[str, Any]:
    import httpx

    state = work / "state"
    store = ModelStore(state)
    store.install(bundle)
    store.activate("resnet50", "1.0.0")
    port = _free_port()
    config = work / "agent.toml"
    config.write_text(
        f"""
device_id = "gpu-bench"
state_dir = "{state}"
log_level = "info"
log_json = true

[backends]
choice_budget_s = 10.0

[api]
http_port = {port}
grpc_port = 0
""",
        encoding="utf-8",
    )
    log = (work / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"daemon exited {proc.returncode}:\n{(work / 'daemon.log').read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/v2/models/resnet50/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > 300:
                raise SystemExit("the daemon did not serve within 300 s")
            time.sleep(0.2)
        ready_s = time.perf_counter() - started
        meta = httpx.get(f"{url}/v2/models/resnet50", timeout=10).json()
        x = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
        answer = httpx.post(
            f"{url}/v2/models/resnet50/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 3, 224, 224],
                        "data": x.ravel().tolist(),
                    }
                ]
            },
            timeout=30,
        ).json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return {"ready_s": ready_s, "meta": meta, "answer_variant": answer["parameters"]["variant"]}


def compare(bundle: Path, fp32: Path, variant: str, x: np.ndarray[Any, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    from agent.models.bundle import read_manifest

    spec = next(v for v in read_manifest(bundle).variants if v.id == variant)
    served = load_first(
        Artifact(bundle / spec.entrypoint, format=spec.format, precision=spec.precision),
        LoadOptions(),
        order=(spec.runtime,),
    )
    plain = ort.InferenceSession(str(fp32), providers=["CUDAExecutionProvider"])
    runs = {
        "daemon-variant": lambda: served.run({"input": x}),
        "plain-fp32": lambda: plain.run(None, {"input": x}),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        for _ in range(20):
            fn()
    for _ in range(BLOCKS):
        for k, fn in runs.items():
            for _ in range(RUNS // BLOCKS):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    device = served.device
    served.close()
    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {"p50_ms": p50, "device": device, "speedup": p50["plain-fp32"] / p50["daemon-variant"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("bench_daemon_gpu: the CUDA provider is not available (install onnxruntime-gpu)")
    with tempfile.TemporaryDirectory(prefix="bench-daemon-gpu-") as tmp:
        work = Path(tmp)
        bundle, fp32, x = make_bundle(work)
        served = serve(bundle, work)
        params = served["meta"]["parameters"]
        variant = params["variant"]
        result = {**served, **compare(bundle, fp32, variant, x)}
    print(f"the daemon serves {variant} on {params['device']} ({params['choice']})")
    print(f"  ready (load, measure, warm, validate): {result['ready_s']:.1f} s")
    print(f"  answer over HTTP computed by: {result['answer_variant']}")
    for k, v in result["p50_ms"].items():
        print(f"  {k:16} p50 {v:.3f} ms")
    print(
        f"  daemon-chosen variant / plain ONNX Runtime CUDA FP32 session.run: "
        f"{result['speedup']:.2f}x faster  (goal >= 1.5x)"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

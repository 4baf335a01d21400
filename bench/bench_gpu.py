"""The agent's NVIDIA path against a plain ONNX Runtime CUDA session, side by side in one run.

Run on the GPU machine (docs/gpu.md). For ResNet-50 (torchvision, random weights, exported to ONNX
here in a subprocess so this process never imports PyTorch) and the PP-OCR detector, batch 1 and 8:

- plain:       ``InferenceSession(fp32, CUDA provider).run(None, {name: numpy fp32})``
- agent fp32:  ``OnnxRuntimeBackend().load(...)``: I/O binding + CUDA graph, FP32 model
- agent fp16:  the same on the FP16 variant (FP32 inputs/outputs, ``keep_io_types``)

Every call is host numpy in -> host numpy out, with a different frame each call. Variants are
interleaved in rounds. Then a swap on the GPU: a loop thread runs the agent's session back to
back while the main thread loads, warms and swaps in a new one 50 times; p99 during swaps / steady
p99, and GPU memory (NVML) after the 50th swap / after the first.

    python3 bench/bench_gpu.py [--ppocr PATH] [--rounds 5] [--swaps 50]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.backends import Artifact, LoadOptions  # noqa: E402
from agent.backends.onnxruntime import (  # noqa: E402
    CAPTURE_RUNS,
    OnnxRuntimeBackend,
    OrtBoundSession,
)
from agent.backends.ort_worker import OrtWorkerSession  # noqa: E402
from agent.gpu_metrics import NvmlReader  # noqa: E402
from agent.logs import configure_logging  # noqa: E402
from agent.samples import text_page  # noqa: E402

HEURISTIC = {"cudnn_conv_algo_search": "HEURISTIC"}
TOLERANCE = {"resnet50": 2e-2, "ppocr-det": 1e-3}  # see output_error

EXPORT = """
import sys, torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet50(weights=None).eval()
x = torch.randn(int(sys.argv[2]), 3, 224, 224)
kw = dict(input_names=["input"], output_names=["logits"], opset_version=17)
try:
    torch.onnx.export(m, (x,), sys.argv[1], dynamo=False, **kw)
except Exception as exc:
    print("torchscript exporter failed, using dynamo:", exc, file=sys.stderr)
    torch.onnx.export(m, (x,), sys.argv[1], dynamo=True, **kw)
"""


def export_resnet50(path: Path, batch: int) -> Path:
    if not path.exists():
        tmp = path.with_suffix(".tmp.onnx")
        subprocess.run([sys.executable, "-c", EXPORT, str(tmp), str(batch)], check=True)
        tmp.replace(path)
    return path


def fp16_variant(src: Path, dst: Path) -> Path:
    """The control plane's FP16 variant of ``src`` (FP32 inputs and outputs)."""
    if not dst.exists():
        from control_plane.builds._onnx import convert_fp16

        tmp = dst.with_suffix(".tmp")
        convert_fp16(src, tmp)
        tmp.replace(dst)
    return dst


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def bench_model(
    label: str, fp32: Path, fp16: Path, input_name: str, shape: tuple[int, ...], rounds: int
) -> dict[str, Any]:
    import onnxruntime as ort

    backend = OnnxRuntimeBackend()
    pinned = LoadOptions(input_shapes={input_name: shape})
    nhwc = LoadOptions(
        input_shapes={input_name: shape},
        ort_provider_options={"CUDAExecutionProvider": {"prefer_nhwc": "1"}},
    )
    plain = ort.InferenceSession(str(fp32), providers=["CUDAExecutionProvider"])
    agent32 = backend.load(Artifact(fp32, name=label), pinned)
    agent16 = backend.load(Artifact(fp16, name=label, precision="fp16"), pinned)
    agent16n = backend.load(Artifact(fp16, name=label, precision="fp16"), nhwc)
    sessions = (agent32, agent16, agent16n)
    graphs = [isinstance(s, OrtBoundSession) and s.cuda_graph for s in sessions]
    if label.startswith("resnet"):
        rng = np.random.default_rng(0)
        frames = [rng.standard_normal(shape, dtype=np.float32) for _ in range(8)]
    else:
        frames = [text_page(shape[0], seed) for seed in range(8)]
    variants = {
        "plain": lambda x: plain.run(None, {input_name: x})[0],
        "agent32": lambda x: next(iter(agent32.run({input_name: x}).values())),
        "agent16": lambda x: next(iter(agent16.run({input_name: x}).values())),
        "agent16n": lambda x: next(iter(agent16n.run({input_name: x}).values())),
    }
    # Accuracy on every frame before timing: the agent's outputs against plain FP32.
    errors = {"agent32": 0.0, "agent16": 0.0, "agent16n": 0.0}
    for x in frames:
        ref = variants["plain"](x)
        for name, worst in errors.items():
            errors[name] = max(worst, output_error(label, variants[name](x), ref))
    iters = max(20, int(0.25 / _probe_seconds(variants["plain"], frames)))
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            fn = variants[name]
            for i in range(3):
                fn(frames[i])
            for i in range(iters):
                x = frames[i % len(frames)]
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    for s in sessions:
        s.close()
    gc.collect()
    return {
        "label": label,
        "batch": shape[0],
        "p50": {k: pct(v, 50) for k, v in times.items()},
        "p99": {k: pct(v, 99) for k, v in times.items()},
        "errors": errors,
        "graphs": graphs,
        "calls": len(times["plain"]),
    }


def output_error(label: str, got: np.ndarray[Any, Any], ref: np.ndarray[Any, Any]) -> float:
    """ResNet: max |difference| / max |logit|. PP-OCR: share of pixels on opposite sides of the
    detector's 0.3 threshold (what decides the boxes; the steep sigmoid's edges may move)."""
    if label.startswith("resnet"):
        return float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-6)
    return float(((got > 0.3) != (ref > 0.3)).mean())


def _probe_seconds(fn: Any, frames: list[np.ndarray[Any, Any]]) -> float:
    for x in frames[:3]:
        fn(x)
    t0 = time.perf_counter()
    for x in frames[:5]:
        fn(x)
    return max((time.perf_counter() - t0) / 5, 1e-5)


def bench_swap(
    model: Path,
    input_name: str,
    shape: tuple[int, ...],
    swaps: int,
    *,
    cuda_options: dict[str, str] | None = None,
    switch_interval_s: float | None = None,
    graph_runner: bool = True,
    ort_process: str = "gpu",
    spare: bool = True,
    release_delay_s: float | None = None,
    collect: bool = False,
    warm_runs: int = 1 + CAPTURE_RUNS,
) -> dict[str, Any]:
    """``graph_runner=False``: runs on the caller's thread (graphs captured per thread);
    ``collect``: a full ``gc.collect()`` after each close, as the session's close once did;
    ``warm_runs``: runs before the switch (the default reaches the capture: the binding's own
    first run, then the runs up to the capture; with fewer, the serving thread captures);
    ``release_delay_s``: ``LoadOptions.ort_release_delay_s`` (``None``: its default)."""
    backend = OnnxRuntimeBackend()
    options = LoadOptions(
        input_shapes={input_name: shape},
        ort_provider_options={"CUDAExecutionProvider": cuda_options or {}},
        ort_graph_runner=graph_runner,
        ort_process=ort_process,  # type: ignore[arg-type]
        ort_spare_worker=spare,
    )
    if release_delay_s is not None:
        options = dataclasses.replace(options, ort_release_delay_s=release_delay_s)
    default_interval = sys.getswitchinterval()
    if switch_interval_s is not None:
        sys.setswitchinterval(switch_interval_s)
    artifact = Artifact(model, name="swap", precision="fp16")
    frame = np.random.default_rng(1).random(shape, dtype=np.float32)
    holder = {"session": backend.load(artifact, options)}
    done = {"runs": 0, "errors": 0}
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    ticks: list[float] = []

    def ticker() -> None:  # how long a Python thread can be kept from running (the GIL)
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    def loop() -> None:
        while not stop.is_set():
            session = holder["session"]
            t0 = time.perf_counter()
            try:
                session.run({input_name: frame})
            except Exception:
                done["errors"] += 1
                continue
            samples.append((t0, time.perf_counter() - t0))
            done["runs"] += 1

    windows: list[tuple[float, float]] = []
    phases: list[tuple[str, float, float]] = []
    used: list[int] = []
    with NvmlReader() as nvml:
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        tick_thread = threading.Thread(target=ticker, daemon=True)
        tick_thread.start()
        time.sleep(1.0)
        for _ in range(swaps):
            t_start = time.perf_counter()
            new = backend.load(artifact, options)
            t_loaded = time.perf_counter()
            for _ in range(warm_runs):
                new.run({input_name: frame})
            t_warm = time.perf_counter()
            old, holder["session"] = holder["session"], new
            seen = done["runs"]
            while done["runs"] < seen + 2:  # drain: the loop has moved to the new session
                time.sleep(0.0005)
            t_switched = time.perf_counter()
            old.close()
            if isinstance(old, OrtWorkerSession):
                old.wait_released(10)  # released in its own process: inside the window
            del old
            t_closed = time.perf_counter()
            if collect:
                gc.collect()
            t_end = time.perf_counter()
            phases += [
                ("load", t_start, t_loaded),
                ("warm", t_loaded, t_warm),
                ("switch", t_warm, t_switched),
                ("close", t_switched, t_closed),
                ("gc", t_closed, t_end),
            ]
            windows.append((t_start, time.perf_counter()))
            used.append(nvml.memory_used_bytes())
            time.sleep(0.3)
        stop.set()
        thread.join()
        tick_thread.join()
        holder["session"].close()
    sys.setswitchinterval(default_interval)

    def in_swap(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    during = [dt for t, dt in samples if in_swap(t)]
    steady = [dt for t, dt in samples if not in_swap(t)]
    gaps = [b - a for a, b in itertools.pairwise(ticks) if in_swap(b)]
    slow = sorted(during, reverse=True)[:5]
    # Where the serving thread was held up: stalls of the ticker thread over 5 ms by swap phase.
    stalls: dict[str, list[float]] = {}
    for a, b in itertools.pairwise(ticks):
        if b - a > 0.005:
            for name, p0, p1 in phases:
                if a < p1 and b > p0:
                    stalls.setdefault(name, []).append(round((b - a) * 1000, 1))
    # Which phase the slow runs overlapped (slow: over 1.2 x the steady p99, the goal).
    limit = 1.2 * pct(steady, 99) / 1000 if steady else float("inf")
    slow_by_phase: dict[str, int] = {}
    slow_runs = 0
    for t, dt in samples:
        if dt > limit and in_swap(t):
            slow_runs += 1
            hit = [name for name, p0, p1 in phases if t < p1 and t + dt > p0] or ["after"]
            for name in dict.fromkeys(hit):
                slow_by_phase[name] = slow_by_phase.get(name, 0) + 1
    phase_ms = {
        name: round(float(np.median([p1 - p0 for n, p0, p1 in phases if n == name])) * 1000, 1)
        for name in ("load", "warm", "switch", "close", "gc")
    }
    return {
        "swaps": swaps,
        "p99_during": pct(during, 99),
        "p99_steady": pct(steady, 99),
        "p50_during": pct(during, 50),
        "p50_steady": pct(steady, 50),
        "n_during": len(during),
        "n_steady": len(steady),
        "errors": done["errors"],
        "mem_first": used[0],
        "mem_last": used[-1],
        "swap_s": float(np.median([b - a for a, b in windows])),
        "max_tick_gap_ms": max(gaps) * 1000 if gaps else 0.0,
        "slowest_during_ms": [round(x * 1000, 2) for x in slow],
        "stalls_by_phase_ms": {k: sorted(v, reverse=True)[:6] for k, v in stalls.items()},
        "phase_ms": phase_ms,
        "slow_by_phase": slow_by_phase,
        "slow_runs": slow_runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppocr", type=Path, default=os.environ.get("EDGEFLEET_PPOCR_ONNX"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgefleet-bench-gpu"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--swaps", type=int, default=50)
    parser.add_argument("--swap-only", action="store_true", help="only the swap section")
    args = parser.parse_args()
    configure_logging("warning")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("bench_gpu: the CUDA provider is not available (install onnxruntime-gpu)")
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.ppocr is None:
        from agent.samples import ppocr_detector

        args.ppocr = ppocr_detector(work)
    ppocr16 = fp16_variant(args.ppocr, work / "ppocr-fp16.onnx")
    with NvmlReader() as nvml:
        gpu = nvml.read()[0].name
    print(f"GPU: {gpu}; onnxruntime {ort.__version__}; {args.rounds} interleaved rounds")
    if args.swap_only:
        swap_section(work, args.swaps)
        return
    rows = []
    for batch in (1, 8):
        r32 = export_resnet50(work / f"resnet50-b{batch}.onnx", batch)
        r16 = fp16_variant(r32, work / f"resnet50-b{batch}-fp16.onnx")
        rows.append(bench_model("resnet50", r32, r16, "input", (batch, 3, 224, 224), args.rounds))
    for batch in (1, 8):
        shape = (batch, 3, 640, 640)
        rows.append(bench_model("ppocr-det", args.ppocr, ppocr16, "x", shape, args.rounds))

    print()
    print(
        "Latency per call, ms (host numpy in -> host numpy out), p50/p99. plain: InferenceSession"
    )
    print(
        ".run on the CUDA provider with FP32 numpy; agent: OnnxRuntimeBackend session (I/O binding"
    )
    print("+ CUDA graph); a16n: agent fp16 with prefer_nhwc=1. x: plain p50 / agent p50.")
    print("err vs plain fp32: ResNet max|d|/max|logit|; PP-OCR share of map pixels flipped at 0.3")
    cols = ("plain", "agent32", "agent16", "agent16n")
    head = (
        f"{'model':<10}{'b':>2}{'plain':>12}{'agent fp32':>12}{'agent fp16':>12}{'a16n':>12}"
        f"{'x32':>6}{'x16':>6}{'x16n':>6}{'err32':>9}{'err16':>9}{'err16n':>9}{'graph':>7}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        p50, p99, err = row["p50"], row["p99"], row["errors"]
        cells = "".join(f"{f'{p50[k]:.2f}/{p99[k]:.2f}':>12}" for k in cols)
        ratios = "".join(f"{p50['plain'] / p50[k]:>6.2f}" for k in cols[1:])
        errs = "".join(f"{err[k]:>9.1e}" for k in cols[1:])
        graph = "".join("y" if g else "n" for g in row["graphs"])
        print(f"{row['label']:<10}{row['batch']:>2}{cells}{ratios}{errs}{graph:>7}")
    b1 = [r["p50"]["plain"] / r["p50"]["agent16"] for r in rows if r["batch"] == 1]
    within = all(r["errors"]["agent16"] <= TOLERANCE[r["label"]] for r in rows)
    print(
        f"goal: agent fp16 >= 1.5x plain fp32 at batch 1: {', '.join(f'{x:.2f}x' for x in b1)}"
        f" -> {'met' if min(b1) >= 1.5 else 'NOT met'}; fp16 outputs "
        f"{'within' if within else 'OUTSIDE'} tolerance {TOLERANCE}"
    )

    swap_section(work, args.swaps)


def swap_section(work: Path, swaps: int) -> None:
    r16 = fp16_variant(
        export_resnet50(work / "resnet50-b1.onnx", 1), work / "resnet50-b1-fp16.onnx"
    )
    shape = (1, 3, 224, 224)
    passes = [
        ("worker, spare", bench_swap(r16, "input", shape, swaps)),
        ("spare, no delay", bench_swap(r16, "input", shape, swaps, release_delay_s=0.0)),
        ("worker, exits", bench_swap(r16, "input", shape, swaps, spare=False)),
        ("runner here", bench_swap(r16, "input", shape, swaps, ort_process="never")),
        (
            "caller's thread",
            bench_swap(r16, "input", shape, swaps, ort_process="never", graph_runner=False),
        ),
    ]
    print()
    print("Swap on GPU: ResNet-50 fp16 b1 on the agent path, loop thread back to back; each swap =")
    print(
        f"load + {1 + CAPTURE_RUNS} warm runs + switch + drain + close of the old session (for a"
        " worker process: until it has released the model), then 0.3 s steady. 'worker, spare':"
        " sessions in worker processes, the retired one kept for the next load (the default);"
        " 'worker, exits': the retired worker exits; 'runner here': in this process, every run on"
        " the session's graph runner thread; 'caller's thread': in this process, on the loop thread"
    )
    head = (
        f"{'pass':<17}{'swaps':>6}{'steady p50/p99':>16}{'swap p50/p99':>15}{'ratio p99':>10}"
        f"{'swap ms':>8}{'fails':>6}{'GPU MiB 1st/last':>18}{'ratio':>7}"
    )
    print(head)
    print("-" * len(head))
    for name, sw in passes:
        ratio = sw["p99_during"] / sw["p99_steady"]
        steady = f"{sw['p50_steady']:.2f}/{sw['p99_steady']:.2f}"
        during = f"{sw['p50_during']:.2f}/{sw['p99_during']:.2f}"
        mem = f"{sw['mem_first'] / 2**20:.0f}/{sw['mem_last'] / 2**20:.0f}"
        print(
            f"{name:<17}{sw['swaps']:>6}{steady:>16}{during:>15}{ratio:>10.2f}"
            f"{sw['swap_s'] * 1000:>8.0f}{sw['errors']:>6}{mem:>18}"
            f"{sw['mem_last'] / sw['mem_first']:>7.3f}"
        )
    print("goal: p99 during swap / steady p99 <= 1.2; GPU memory after last / after first swap")
    for name, sw in passes:
        print(
            f"{name}: longest stall of a Python thread during swaps {sw['max_tick_gap_ms']:.1f} ms;"
            f" slowest runs during swaps {sw['slowest_during_ms']} ms"
        )
        print(f"  phases (median ms) {sw['phase_ms']}; stalls > 5 ms {sw['stalls_by_phase_ms']}")
        print(
            f"  runs over 1.2 x steady p99 during swaps: {sw['slow_runs']} of"
            f" {sw['n_during']}, by phase overlapped {sw['slow_by_phase']}"
        )


if __name__ == "__main__":
    main()

"""Which part of another process's session life slows a serving process's frames on one GPU.

The slot bench (``bench_swap.py --gpu --verbose``) puts most of a swap's slow frames on the new
version while the retired version's worker releases its model: two processes, two CUDA
contexts (or one MPS server). This isolates the question. Process A serves the PP-OCR detector
(1x3x320x320, CUDA graphs, as a worker session does) at 100 Hz and records every frame; process B
loads the same model, runs 5 warm-up runs, idles, closes the session, then collects and trims
its heap, ``--cycles`` times, and records when each phase began and ended (``time.monotonic``
is one clock for both). Every frame of A is put in the phase of B it overlaps; the rest is
steady. Modes, one after the other in one run:

- ``plain``: B's sessions use their own device arena (what a worker does today);
- ``envarena``: B registers one CUDA arena for the process
  (``onnxruntime.create_and_register_allocator_v2``) and its sessions use it
  (``session.use_env_allocators``): a closed session's device memory stays in the arena for the
  next load instead of being freed and allocated again.

Run under the CUDA Multi-Process Service by starting ``nvidia-cuda-mps-control -d`` first (with
``CUDA_MPS_PIPE_DIRECTORY`` and ``CUDA_MPS_LOG_DIRECTORY`` set for both).

    python3 bench/bench_gpu_neighbours.py [--modes plain,envarena] [--cycles 6]

Needs ONNX Runtime's CUDA provider and ``EDGEFLEET_PPOCR_ONNX`` (or the rapidocr wheel).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.backends import Artifact, LoadOptions, get_backend
from agent.samples import ppocr_detector

SHAPE = (1, 3, 320, 320)
PERIOD_S = 0.01
now = time.monotonic


def _maker(env_arena: bool) -> Callable[[], Any]:
    import onnxruntime as ort

    if env_arena:
        info = ort.OrtMemoryInfo(
            "Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator_v2(
            "CUDAExecutionProvider", info, {}, ort.OrtArenaCfg(0, -1, -1, -1)
        )
        base = ort.SessionOptions

        class _EnvAllocatorOptions(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                super().__init__()
                self.add_session_config_entry("session.use_env_allocators", "1")

        ort.SessionOptions = _EnvAllocatorOptions  # what the agent's backend creates
    backend = get_backend("onnxruntime")
    given = os.environ.get("EDGEFLEET_PPOCR_ONNX")
    model = Path(given) if given else ppocr_detector()
    options = LoadOptions(input_shapes={"x": SHAPE}, ort_process="never")
    return lambda: backend.load(Artifact(model, format="onnx", precision="fp32"), options)


def _feeds() -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.random.default_rng(0).random(SHAPE, dtype=np.float32)}


def serve(seconds: float) -> None:
    session = _maker(False)()
    feeds = _feeds()
    for _ in range(30):
        session.run(feeds)
    print("ready", flush=True)
    frames: list[tuple[float, float]] = []
    end, due = now() + seconds, now()
    while now() < end:
        t = now()
        if t < due:
            time.sleep(due - t)
        due += PERIOD_S
        start = now()
        session.run(feeds)
        frames.append((start, now() - start))
    print(json.dumps(frames), flush=True)


def churn(mode: str, cycles: int) -> None:
    make = _maker(mode == "envarena")
    libc = ctypes.CDLL(None)
    feeds = _feeds()
    phases: list[tuple[int, str, float, float]] = []
    time.sleep(0.5)
    for cycle in range(cycles):
        t0 = now()
        session = make()
        t1 = now()
        phases.append((cycle, "load", t0, t1))
        for _ in range(5):
            session.run(feeds)
        t2 = now()
        phases.append((cycle, "warm-up", t1, t2))
        time.sleep(0.4)
        t3 = now()
        session.close()
        del session
        t4 = now()
        phases.append((cycle, "close", t3, t4))
        gc.collect()
        libc.malloc_trim(0)
        phases.append((cycle, "gc+trim", t4, now()))
        time.sleep(0.6)
    print(json.dumps(phases), flush=True)


def _last_json(text: str) -> Any:
    return json.loads([line for line in text.splitlines() if line.startswith("[")][-1])


def compare(mode: str, cycles: int) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(cycles * 2.5 + 4)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    while server.stdout.readline().strip() != "ready":
        pass
    churner = subprocess.run(
        [sys.executable, __file__, "--churn", mode, "--cycles", str(cycles)],
        capture_output=True,
        text=True,
        check=False,
    )
    frames = _last_json(server.stdout.read())
    server.wait()
    if churner.returncode:
        print(f"== {mode}: the loading process failed\n{churner.stderr[-2000:]}")
        return
    phases = _last_json(churner.stdout)

    def phase_of(start: float, took: float) -> str | None:
        for cycle, name, begin, end in phases:
            if start + took >= begin and start <= end + 0.005:
                return f"{'first ' if cycle == 0 else ''}{name}"
        return None

    steady = [took for start, took in frames if phase_of(start, took) is None]
    p99 = float(np.percentile(steady, 99))
    print(
        f"== {mode}: steady p50 {statistics.median(steady) * 1e3:.2f} ms, "
        f"p99 {p99 * 1e3:.2f} ms ({len(steady)} frames)"
    )
    during: dict[str, list[float]] = {}
    for start, took in frames:
        phase = phase_of(start, took)
        if phase is not None:
            during.setdefault(phase, []).append(took)
    lengths: dict[str, list[float]] = {}
    for cycle, name, begin, end in phases:
        lengths.setdefault(f"{'first ' if cycle == 0 else ''}{name}", []).append(end - begin)
    print(f"   {'phase of B':16}{'B ms':>8}{'frames':>8}{'> 1.2 p99':>10}{'max ms':>8}")
    for phase, took in sorted(during.items()):
        slow = sum(t > 1.2 * p99 for t in took)
        print(
            f"   {phase:16}{statistics.median(lengths[phase]) * 1e3:8.1f}{len(took):8}"
            f"{slow:10}{max(took) * 1e3:8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="plain,envarena")
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--serve", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--churn", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("bench_gpu_neighbours: the CUDA provider is not available (docs/gpu.md)")
    if args.serve is not None:
        serve(args.serve)
    elif args.churn is not None:
        churn(args.churn, args.cycles)
    else:
        for mode in args.modes.split(","):
            compare(mode, args.cycles)


if __name__ == "__main__":
    main()

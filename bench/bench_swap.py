"""Hot swap figures for the PP-OCR text detector on ONNX Runtime and on OpenVINO, side by side.

- p99 latency of a fixed-rate hot loop during swap windows / steady-state p99 (goal <= 1.2),
  with dropped and failed requests counted (goal 0);
- time from "new version on disk" to "serving it", split into load, warm-up, validation,
  promote (reload with the hot path's thread count; 0 here) and switch;
- RSS after 50 swap cycles / RSS after the first (goal <= 1.05); a cycle is one swap, v1 and v2
  alternating.

Each runtime is measured twice, side by side: ``plain`` (``ModelSlot(quiet_swap=False)``: the
loader works whenever it likes and the request that leaves a retired version last closes it) and
``quiet`` (the default: the loader's load and runs start between frames, loads are background
loads, closes happen on the loader thread); ``--inproc`` adds ``inproc``, quiet swaps that load in
this process (``ModelSlot(background_loads=False)``: OpenVINO compiles here). ``--gpu`` runs
the same on ONNX Runtime's CUDA provider (shapes pinned so CUDA graphs capture) with a faster
loop (``--rate``), sessions in worker processes (the default there), the retired version's worker
kept as the spare that loads the next one (the default) and releasing its model
``LoadOptions.ort_release_delay_s`` after the switch, and adds ``qnow``: quiet swaps whose retired
worker releases at once (``ort_release_delay_s=0``), ``qexit``: quiet swaps whose
retired worker exits (``LoadOptions(ort_spare_worker=False)``), and ``here``: quiet swaps with the
sessions in this process (``LoadOptions(ort_process="never")``). On the GPU a swap window lasts
until the retired version's worker has released its model (kept) or exited, and GPU memory is
read too.

Input 1x3x320x320 (640 makes each round several times longer on a 2-core box). The hot path runs
with 1 intra-op thread and the loader with 1 (``SwapConfig.loader_threads``), so on 2 cores each
has its own. Rounds interleave the backends: steady window, then swap window, per backend per
round (20 rounds on CPU, 6 on the GPU where the loop runs at 100 Hz). Run:
``.venv/bin/python bench/bench_swap.py [--rounds N] [--cycles N]``. A swap window ends when the
retired version has let its model go, seen by a join on its releaser (``--window-end poll``: by
polling the process table, as the bench did before; see docs/gpu.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from agent.backends import LoadOptions, get_backend
from agent.backends.ort_worker import OrtWorkerSession, spare_pids
from agent.config import BackendConfig, SwapConfig
from agent.contracts.manifest import Tolerance
from agent.gpu_metrics import NvmlReader
from agent.logs import configure_logging
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.probation import p99
from agent.models.slots import ModelSlot, SwapReport
from agent.models.store import ModelStore
from agent.samples import ppocr_detector

SHAPE = (1, 3, 320, 320)
RATE_HZ = 12.0
# column suffix -> ModelSlot(quiet_swap=..., background_loads=...), LoadOptions.ort_process,
# LoadOptions.ort_spare_worker, LoadOptions.ort_release_delay_s (None: the default, or
# --release-delay-ms)
MODES: dict[str, tuple[bool, bool, str, bool, float | None]] = {
    "plain": (False, False, "gpu", True, None),
    "quiet": (True, True, "gpu", True, None),
    "qnow": (True, True, "gpu", True, 0.0),
    "qexit": (True, True, "gpu", False, None),
    "inproc": (True, False, "gpu", True, None),
    "here": (True, True, "never", True, None),
}
GPU_ONLY = ("qnow", "qexit", "here")


class HotLoop:
    """A fixed-rate inference loop on a slot (catch-up, never skips), recording latencies."""

    def __init__(
        self, slot: ModelSlot, feeds: dict[str, np.ndarray[Any, Any]], rate_hz: float = RATE_HZ
    ) -> None:
        self.slot, self.feeds, self.rate_hz = slot, feeds, rate_hz
        self.latencies: list[tuple[float, float]] = []  # (start time, latency)
        self.versions: list[str] = []  # the version that answered each one
        self.attempts = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        period, due = 1.0 / self.rate_hz, time.perf_counter()
        while not self._stop.is_set():
            self.attempts += 1
            start = time.perf_counter()
            try:
                computed, _ = self.slot.infer_versioned(self.feeds)
                self.latencies.append((start, time.perf_counter() - start))
                self.versions.append(computed.version)
            except Exception:
                self.failures += 1
            due += period
            time.sleep(max(0.0, due - time.perf_counter()))

    def __enter__(self) -> HotLoop:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def make_store(
    root: Path,
    model: Path,
    runtimes: list[str],
    feeds: dict[str, np.ndarray[Any, Any]],
    tolerance: Tolerance | None = None,
) -> ModelStore:
    store = ModelStore(root / "state", keep_versions=3)
    for version in ("1.0.0", "1.0.1"):
        out = root / f"bundle-{version}"
        build_bundle(
            out,
            "ppocr-det",
            version,
            [
                VariantSpec(model, runtime=rt, tolerance=tolerance)  # type: ignore[arg-type]
                for rt in runtimes
            ],
            golden_inputs=[feeds],
        )
        store.install(out)
    store.activate("ppocr-det", "1.0.0")
    return store


def text_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray[Any, Any]:
    """Dark word-like strokes on a light page, normalized as PP-OCR expects. Random noise is no
    golden input for a detector: its sigmoid outputs sit near 1e-9, where FP32 runtimes differ
    relatively by far more than any tolerance."""
    rng = np.random.default_rng(seed)
    h, w = shape[2], shape[3]
    img = np.full((h, w, 3), 235, np.float32)
    for row in range(h // 10, h - 20, 40):
        x0 = 20
        while x0 < w - 30:
            width = int(rng.integers(4, 14))
            img[row : row + 18, x0 : x0 + width] = 20
            x0 += width + int(rng.integers(3, 9))
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    out: np.ndarray[Any, Any] = ((img / 255 - mean) / std).transpose(2, 0, 1)[None]
    return out.astype(np.float32)


def rss() -> int:
    """This process's RSS and its workers' (ONNX Runtime worker processes, compile children)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return int(total)


def gpu_memory(settle_s: float = 5.0) -> int | None:
    """Device memory in use on GPU 0 (NVML) once it has stopped changing (the driver frees an
    exited worker's context a moment after the process is gone), or ``None`` without a GPU."""
    try:
        with NvmlReader() as nvml:
            used = nvml.memory_used_bytes()
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                time.sleep(0.2)
                again = nvml.memory_used_bytes()
                if again == used:
                    break
                used = again
            return used
    except Exception:
        return None


def retired_workers_exited(slots: Iterable[ModelSlot], timeout_s: float = 10.0) -> None:
    """Wait until no worker process is left but those of the versions that serve and the
    spare (a retired version's worker once it has released its model)."""
    sessions = [getattr(s.current, "_session", None) for s in slots]
    serving = {s.pid for s in sessions if isinstance(s, OrtWorkerSession)}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = set()
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error):  # gone, or a zombie: it has exited
                argv = child.cmdline()
                if child.status() != psutil.STATUS_ZOMBIE and "agent.backends.ort_worker" in argv:
                    workers.add(child.pid)
        if workers <= serving | set(spare_pids()):
            return
        time.sleep(0.01)


def released(session: object, timeout_s: float = 10.0) -> None:
    """Wait until a retired session has let its model go: a worker session's releaser thread
    has seen its worker release (kept as the spare) or exit. A join, not a poll of the process
    table: walking ``/proc`` from the bench's thread every few ms holds the GIL that the hot
    loop's thread needs the moment its worker answers, and on the GPU (2 ms frames) that wait
    was most of the slow frames counted in the window."""
    wait = getattr(session, "wait_released", None)
    if wait is None:  # a session in this process: closed on the loader thread (settle)
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not wait(0.05):
        time.sleep(0.005)  # not closed yet: the last request on it has not left


def swap_phase(version: str, old: str, first_new: float | None, start: float) -> str:
    """Where a request of a swap window fell: on the old version, the first one on the new
    version, or a later one on it."""
    if version == old:
        return "old"
    return "first new" if start == first_new else "new"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=None, help="swaps per column (20 on CPU, 6 with --gpu)"
    )
    parser.add_argument("--steady-s", type=float, default=2.0)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--verbose", action="store_true", help="where the slow requests fell")
    parser.add_argument("--model", type=Path, default=None, help="PP-OCR detector ONNX file")
    parser.add_argument("--gpu", action="store_true", help="ONNX Runtime on the CUDA provider")
    parser.add_argument("--rate", type=float, default=None, help=f"loop Hz ({RATE_HZ:g} on CPU)")
    parser.add_argument(
        "--inproc", action="store_true", help="also quiet swaps that load in this process"
    )
    parser.add_argument("--trace-gpu", action="store_true", help="GPU memory after each cycle")
    parser.add_argument("--modes", default=None, help="comma-separated columns (default: all)")
    parser.add_argument(
        "--window-end",
        choices=("join", "poll"),
        default="join",
        help="how the bench sees a retired worker's release end: a join on the session's "
        "releaser (default) or a poll of the process table every 10 ms (the old way)",
    )
    parser.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="the interpreter's thread switch interval (sys.setswitchinterval; Python's is 5 ms)",
    )
    parser.add_argument(
        "--release-delay-ms",
        type=float,
        default=None,
        help="a retired worker releases its model this long after the switch (default: "
        "LoadOptions.ort_release_delay_s; the qnow column: 0)",
    )
    args = parser.parse_args()
    configure_logging("error")
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    rate = args.rate or (100.0 if args.gpu else RATE_HZ)
    # At 12 Hz a round's swap window holds 12-20 frames: with 6 rounds the p99 of the windows is
    # their second-slowest frame and one stray frame moves the ratio by tenths. 20 rounds (about
    # 5.5 min for the four CPU columns) put it at the fifth.
    args.rounds = args.rounds or (6 if args.gpu else 20)

    backends = ("onnxruntime",) if args.gpu else ("onnxruntime", "openvino")
    usable = [rt for rt in backends if get_backend(rt).probe().usable]
    missing = set(backends) - set(usable)
    feeds = {"x": text_image(SHAPE)}
    tmp = tempfile.TemporaryDirectory(prefix="bench-swap-")
    model = args.model or ppocr_detector()
    # The CUDA provider runs FP32 convolutions in TF32: about 1e-3 off the CPU reference.
    tolerance = Tolerance(max_rel_l2=0.02) if args.gpu else None
    store = make_store(Path(tmp.name), model, usable, feeds, tolerance)
    options = (
        LoadOptions(input_shapes={"x": SHAPE}) if args.gpu else LoadOptions(intra_op_threads=1)
    )
    if args.release_delay_ms is not None:
        options = dataclasses.replace(options, ort_release_delay_s=args.release_delay_ms / 1e3)
    modes = [m for m in MODES if (m != "inproc" or args.inproc) and (m not in GPU_ONLY or args.gpu)]
    if args.modes:
        modes = [m for m in modes if m in args.modes.split(",")]
    runtimes = [f"{rt[:4]}-{mode}" for rt in usable for mode in modes]

    def slot_for(rt: str, mode: str) -> ModelSlot:
        quiet, background, process, spare, delay = MODES[mode]
        return ModelSlot(
            "ppocr-det",
            store,
            swap_config=SwapConfig(loader_threads=1, warmup_runs=5, policy="availability"),
            backend_config=BackendConfig(pin_backend=rt),  # type: ignore[arg-type]
            load_options=dataclasses.replace(
                options,
                ort_process=process,  # type: ignore[arg-type]
                ort_spare_worker=spare,
                ort_release_delay_s=options.ort_release_delay_s if delay is None else delay,
            ),
            latency_runs=3,
            quiet_swap=quiet,
            background_loads=background,
        )

    slots = {
        col: slot_for(rt, col.split("-")[1])
        for rt in usable
        for col in runtimes
        if col.startswith(rt[:4])
    }
    for slot in slots.values():
        slot.start("1.0.0")

    steady: dict[str, list[float]] = {rt: [] for rt in runtimes}
    window: dict[str, list[float]] = {rt: [] for rt in runtimes}
    reports: dict[str, list[SwapReport]] = {rt: [] for rt in runtimes}
    failed = dict.fromkeys(runtimes, 0)
    # (latency, start after swap start, first new-version frame after it, swap end after it, by)
    where: dict[str, list[tuple[float, float, float, float, str]]] = {rt: [] for rt in runtimes}
    dropped = dict.fromkeys(runtimes, 0)
    for r in range(args.rounds):
        for rt in runtimes:
            slot = slots[rt]
            with HotLoop(slot, feeds, rate) as loop:
                time.sleep(args.steady_s)
                retiring = getattr(slot.current, "_session", None)
                swap_start = time.perf_counter()
                reports[rt].append(slot.swap("1.0.1" if r % 2 == 0 else "1.0.0"))
                slot.settle(10.0)  # the retired version released on the loader thread
                if args.window_end == "poll":
                    retired_workers_exited(slots.values())
                else:
                    released(retiring)
                swap_end = time.perf_counter()
                time.sleep(0.2)  # the retired session drains and closes inside the window
            old_version = loop.versions[0] if loop.versions else ""
            first_new = next(
                (t for (t, _), v in zip(loop.latencies, loop.versions, strict=True)
                 if v != old_version),
                None,
            )  # fmt: skip
            switched = (first_new or swap_end) - swap_start
            for (start, latency), version in zip(loop.latencies, loop.versions, strict=True):
                end = start + latency
                in_window = end >= swap_start and start <= swap_end + 0.2
                (window if in_window else steady)[rt].append(latency)
                if in_window:
                    phase = swap_phase(version, old_version, first_new, start)
                    where[rt].append(
                        (latency, start - swap_start, switched, swap_end - swap_start, phase)
                    )
            failed[rt] += loop.failures
            dropped[rt] += loop.attempts - len(loop.latencies) - loop.failures

    memory: dict[str, tuple[int, int]] = {}
    gpu: dict[str, tuple[int | None, int | None]] = {}
    first_gpu: int | None = None
    for rt in runtimes:
        slot = slots[rt]
        version = slot.version
        first = 0
        for cycle in range(1, args.cycles + 1):
            version = "1.0.1" if version == "1.0.0" else "1.0.0"
            slot.swap(version)
            slot.settle(5.0)  # quiet swaps release the retired version after swap() returns
            if cycle == 1:
                retired_workers_exited(slots.values())
                first = rss()
                first_gpu = gpu_memory()
            if args.trace_gpu:
                retired_workers_exited(slots.values())
                workers = [c.pid for c in psutil.Process().children() if c.status() != "zombie"]
                print(f"cycle {cycle}: GPU {(gpu_memory() or 0) >> 20} MiB, workers {workers},"
                      f" spare {spare_pids()}")  # fmt: skip
        retired_workers_exited(slots.values())
        memory[rt] = (first, rss())
        gpu[rt] = (first_gpu, gpu_memory())

    print(
        f"PP-OCR detector {'x'.join(map(str, SHAPE))}, hot loop {rate:g} Hz, 1 thread; "
        f"loader 1 thread; {args.rounds} rounds interleaved; {psutil.cpu_count()} CPUs; "
        f"window end by {args.window_end}; switch interval {sys.getswitchinterval() * 1e3:g} ms; "
        f"release delay {options.ort_release_delay_s * 1e3:g} ms (qnow 0); "
        f"device {next(iter(slots.values())).current.device}"  # type: ignore[union-attr]
    )
    header = f"{'':34}" + "".join(f"{rt:>14}" for rt in runtimes)
    print(header)

    def row(label: str, values: list[str]) -> None:
        print(f"{label:34}" + "".join(f"{v:>14}" for v in values))

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1e3:.1f}"

    row("steady p99 (ms)", [ms(p99(steady[rt])) for rt in runtimes])
    row("swap-window p99 (ms)", [ms(p99(window[rt])) for rt in runtimes])
    row(
        "swap-window / steady p99 (<=1.2)",
        [f"{(p99(window[rt]) or 0) / (p99(steady[rt]) or 1):.2f}" for rt in runtimes],
    )
    row("samples steady / window", [f"{len(steady[rt])}/{len(window[rt])}" for rt in runtimes])
    row("dropped / failed (0)", [f"{dropped[rt]}/{failed[rt]}" for rt in runtimes])
    for field in ("load_s", "warmup_s", "validation_s", "promote_s", "switch_s"):
        row(
            f"disk->serving: {field[:-2]} (ms, median)",
            [ms(float(np.median([getattr(x, field) for x in reports[rt]]))) for rt in runtimes],
        )
    row(
        "disk->serving: total (ms, median)",
        [ms(float(np.median([x.disk_to_serving_s for x in reports[rt]]))) for rt in runtimes],
    )
    row(
        f"RSS after 1 / {args.cycles} cycles (MB)",
        [f"{memory[rt][0] / 1e6:.0f}/{memory[rt][1] / 1e6:.0f}" for rt in runtimes],
    )
    row(
        f"RSS {args.cycles} / 1 (<=1.05)",
        [f"{memory[rt][1] / memory[rt][0]:.3f}" for rt in runtimes],
    )
    if args.gpu:
        row(
            f"GPU memory {args.cycles} / 1 (<=1.02)",
            [
                f"{(gpu[rt][1] or 0) / (gpu[rt][0] or 1):.3f}" if gpu[rt][0] else "-"
                for rt in runtimes
            ],
        )
    if args.verbose:
        for rt in runtimes:
            worst = sorted(where[rt], reverse=True)[:12]
            print(
                rt,
                "slowest in windows (ms; ms after swap start: started, new version's first "
                "frame, window end; by):",
            )
            rows = [(*(round(x * 1e3) for x in w[:4]), w[4]) for w in worst]
            print("   ", rows)
            limit = 1.2 * (p99(steady[rt]) or 0)
            by_phase: dict[str, int] = {}
            for latency, *_, phase in where[rt]:
                if latency > limit:
                    by_phase[phase] = by_phase.get(phase, 0) + 1
            print("    over 1.2 x steady p99, by the version that answered:", by_phase)
    if missing:
        print(f"not measured (runtime not usable here): {', '.join(sorted(missing))}")
    for slot in slots.values():
        slot.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

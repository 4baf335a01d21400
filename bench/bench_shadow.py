"""Shadow evaluation's cost to the serving path: serving p99 with a shadow / without, side by side.

The PP-OCR text detector (1x3x320x320, ONNX Runtime, 1 intra-op thread on the hot path) serves
at a fixed rate (catch-up, never skips) on a rendered text page. Rounds alternate two windows on
the same slot: ``off`` (no shadow) and ``on`` (a second version of the same model loaded beside
it with ``ModelSlot.load_shadow`` and compared on ``--share`` of the inferences by
``agent.shadow.ShadowEvaluator``, as the daemon does during a rollout's shadow stage). Within
``on`` the evaluator's window is taken every ``--interval`` seconds, as the daemon's telemetry
tick does, and the bench counts the windows that carried compared samples.

Prints per round and over every round's latencies pooled per mode (short alternating windows, so
a burst of background load lands on both modes alike): serving p50/p99 in each mode and the
on/off p99 ratio (goal <= 1.10 at 10 % of frames), samples compared and skipped, the shadow's
busy share and its task metric; then windows with samples / windows.

    .venv/bin/python bench/bench_shadow.py [--rounds 12] [--window-s 4] [--rate 25] [--share 0.1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_swap import SHAPE, HotLoop, make_store, text_image

from agent.backends import LoadOptions
from agent.config import BackendConfig, SwapConfig
from agent.logs import configure_logging
from agent.models.probation import p99
from agent.models.slots import ModelSlot
from agent.samples import ppocr_detector
from agent.shadow import ShadowEvaluator, model_task

RATE_HZ = 25.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--window-s", type=float, default=4.0)
    parser.add_argument("--share", type=float, default=0.1, help="share of frames shadowed")
    parser.add_argument("--busy", type=float, default=0.25, help="max busy share of the shadow")
    parser.add_argument("--interval", type=float, default=1.0, help="telemetry interval, s")
    parser.add_argument("--rate", type=float, default=RATE_HZ, help="loop Hz")
    args = parser.parse_args()
    configure_logging("error")

    feeds = {"x": text_image(SHAPE)}
    tmp = tempfile.TemporaryDirectory(prefix="bench-shadow-")
    store = make_store(Path(tmp.name), ppocr_detector(), ["onnxruntime"], feeds)
    slot = ModelSlot(
        "ppocr-det",
        store,
        swap_config=SwapConfig(loader_threads=1, warmup_runs=3, policy="availability"),
        backend_config=BackendConfig(pin_backend="onnxruntime"),
        load_options=LoadOptions(intra_op_threads=1),
        latency_runs=3,
    )
    slot.start("1.0.0")
    runner, manifest = slot.load_shadow("1.0.1")
    task = model_task(manifest) or "detection"

    evaluator = ShadowEvaluator(
        "ppocr-det", runner, task=task, sample_share=args.share, max_busy_share=args.busy
    )
    pooled: dict[str, list[float]] = {"off": [], "on": []}
    windows = carried = samples = skipped = 0
    busy: list[float] = []
    values: list[float] = []
    print(
        f"PP-OCR detector {SHAPE}, onnxruntime, {args.rate:g} Hz, shadow on {args.share:.0%} "
        f"of frames (task {task}), {args.rounds} rounds of {args.window_s:g} s off then "
        f"{args.window_s:g} s on; percentiles over each mode's pooled latencies"
    )
    print(f"{'round':>5} {'off p50':>8} {'off p99':>8} {'on p50':>8} {'on p99':>8} {'samples':>7}")
    for r in range(args.rounds):
        with HotLoop(slot, feeds, args.rate) as off:
            time.sleep(args.window_s)
        slot.observer = evaluator.offer
        with HotLoop(slot, feeds, args.rate) as on:
            end = time.perf_counter() + args.window_s
            n = 0
            while time.perf_counter() < end:
                time.sleep(min(args.interval, max(0.0, end - time.perf_counter())))
                w = evaluator.take_window()
                windows += 1
                carried += w.samples > 0
                n += w.samples
                skipped += w.skipped
                busy.append(w.busy_share)
                if w.value is not None:
                    values.append(w.value)
        slot.observer = None
        samples += n
        assert off.failures == on.failures == 0
        off_lat = [lat * 1e3 for _, lat in off.latencies]
        on_lat = [lat * 1e3 for _, lat in on.latencies]
        pooled["off"] += off_lat
        pooled["on"] += on_lat
        print(
            f"{r + 1:>5} {statistics.median(off_lat):8.2f} {p99(off_lat) or 0.0:8.2f} "
            f"{statistics.median(on_lat):8.2f} {p99(on_lat) or 0.0:8.2f} {n:7d}"
        )
    evaluator.close(retire=False)
    off_p99, on_p99 = p99(pooled["off"]) or 0.0, p99(pooled["on"]) or 0.0
    print(
        f"{'all':>5} {statistics.median(pooled['off']):8.2f} {off_p99:8.2f} "
        f"{statistics.median(pooled['on']):8.2f} {on_p99:8.2f} {samples:7d}"
    )
    print(
        f"serving p99 with shadow / without: {on_p99 / off_p99:.3f} (goal <= 1.10); "
        f"{len(pooled['off'])} / {len(pooled['on'])} inferences"
    )
    print(
        f"shadow: {samples} samples, {skipped} skipped, mean busy share "
        f"{statistics.mean(busy) if busy else 0.0:.1%}, {evaluator.model} task metric mean "
        f"{statistics.mean(values) if values else float('nan'):.2f}"
    )
    print(f"telemetry windows carrying shadow samples: {carried}/{windows}")
    runner.retire()
    slot.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

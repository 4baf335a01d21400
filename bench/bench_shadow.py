"""Shadow evaluation's cost to the serving path: serving p99 with a shadow / without, side by side.

The PP-OCR text detector (1x3x320x320, ONNX Runtime, 1 intra-op thread on the hot path) serves
at a fixed rate (catch-up, never skips) on a rendered text page. Rounds alternate two windows on
the same slot: ``off`` (no shadow) and ``on`` (a second version of the same model loaded beside
it with ``ModelSlot.load_shadow`` and compared on ``--share`` of the inferences by
``agent.shadow.ShadowEvaluator``, as the daemon does during a rollout's shadow stage). Within
``on`` the evaluator's window is taken every ``--interval`` seconds, as the daemon's telemetry
tick does, and the bench counts the windows that carried compared samples.

Prints per round and the median: serving p50/p99 in each mode and the on/off p99 ratio (goal
<= 1.10 at 10 % of frames), samples compared, skipped, the shadow's busy share and its task
metric; then windows with samples / windows.

    .venv/bin/python bench/bench_shadow.py [--rounds 5] [--window-s 12] [--rate 25] [--share 0.1]
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
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window-s", type=float, default=12.0)
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

    rows: list[dict[str, float]] = []
    windows = carried = 0
    print(
        f"PP-OCR detector {SHAPE}, onnxruntime, {args.rate:g} Hz, shadow on {args.share:.0%} "
        f"of frames (task {task}), {args.window_s:g} s per window, {args.rounds} rounds"
    )
    print(
        f"{'round':>5} {'off p50':>8} {'off p99':>8} {'on p50':>8} {'on p99':>8} "
        f"{'ratio':>6} {'samples':>7} {'skipped':>7} {'busy':>5} {'value':>6}"
    )
    for r in range(args.rounds):
        with HotLoop(slot, feeds, args.rate) as off:
            time.sleep(args.window_s)
        evaluator = ShadowEvaluator(
            "ppocr-det",
            runner,
            task=task,
            sample_share=args.share,
            max_busy_share=args.busy,
        )
        slot.observer = evaluator.offer
        samples = skipped = 0
        busy: list[float] = []
        values: list[float] = []
        with HotLoop(slot, feeds, args.rate) as on:
            end = time.perf_counter() + args.window_s
            while time.perf_counter() < end:
                time.sleep(args.interval)
                w = evaluator.take_window()
                windows += 1
                carried += w.samples > 0
                samples += w.samples
                skipped += w.skipped
                busy.append(w.busy_share)
                if w.value is not None:
                    values.append(w.value)
        slot.observer = None
        evaluator.close(retire=False)  # the same loaded version serves every round
        off_lat = [lat for _, lat in off.latencies]
        on_lat = [lat for _, lat in on.latencies]
        row = {
            "off_p50": statistics.median(off_lat) * 1e3,
            "off_p99": (p99(off_lat) or 0.0) * 1e3,
            "on_p50": statistics.median(on_lat) * 1e3,
            "on_p99": (p99(on_lat) or 0.0) * 1e3,
            "samples": samples,
            "skipped": skipped,
            "busy": statistics.mean(busy) if busy else 0.0,
            "value": statistics.mean(values) if values else float("nan"),
        }
        row["ratio"] = row["on_p99"] / row["off_p99"] if row["off_p99"] else float("nan")
        rows.append(row)
        print(
            f"{r + 1:>5} {row['off_p50']:8.2f} {row['off_p99']:8.2f} {row['on_p50']:8.2f} "
            f"{row['on_p99']:8.2f} {row['ratio']:6.3f} {row['samples']:7.0f} "
            f"{row['skipped']:7.0f} {row['busy']:5.1%} {row['value']:6.1f}"
        )
        assert off.failures == on.failures == 0
    med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    print(
        f"{'median':>5} {med['off_p50']:8.2f} {med['off_p99']:8.2f} {med['on_p50']:8.2f} "
        f"{med['on_p99']:8.2f} {med['ratio']:6.3f} {med['samples']:7.0f} "
        f"{med['skipped']:7.0f} {med['busy']:5.1%} {med['value']:6.1f}"
    )
    print(f"serving p99 with shadow / without: {med['ratio']:.3f} (goal <= 1.10)")
    print(f"telemetry windows carrying shadow samples: {carried}/{windows}")
    runner.retire()
    slot.close()
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

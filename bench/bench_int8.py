"""INT8 variants on this CPU: latency ratios against ONNX Runtime FP32, and the accuracy cost.

Builds the bundles with ``control_plane.builds.build_variants``: the digits CNN (top-1 gate)
and the PP-OCR text detector twice, once with the task gate (``task="detection"``: box F1
after DB decoding) and accuracy-aware INT8, once as the old gate built it (relative L2, one
MinMax quantization each). Times every variant side by side in rounds (each round runs each
variant once, in turn) and prints median latencies, ratios to a plain ONNX Runtime FP32
session (``InferenceSession`` with its defaults), the deciding
metric of each variant, the best accepted PP-OCR variant's box F1 against FP32 on held-out
pages, and both build times. Every variant runs as a device runs it, through the agent's own
backend and the configuration it gives that precision (the agent's ONNX Runtime sessions do not
spin between runs, so its FP32 row is slower than the plain one). Goal: best accepted PP-OCR
variant >= 3.0x ORT FP32 with box F1 >= 0.98.

    .venv/bin/python bench/bench_int8.py [--rounds N] [--size 640] [--pages 16] [--budget 1.0]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.backends import LoadOptions, get_backend
from agent.contracts.accuracy import box_f1
from agent.logs import configure_logging
from agent.models.slots import variant_artifact
from agent.samples import digits_cnn, digits_data, ppocr_detector, text_page
from control_plane.builds import Int8Search, build_variants

Run = Callable[[], Any]
PLAIN = "ORT FP32, plain session"  # the baseline every ratio is against


def agent_run(bundle: Path, variant: Any, feeds: dict[str, Any]) -> Run:
    """The variant as a device runs it: the agent's own backend, with the configuration it
    gives that precision (OpenVINO: ``INFERENCE_PRECISION_HINT=f32`` for FP32 and INT8, so the
    parts INT8 leaves in float do not run in bf16 on AMX or AVX512-BF16 CPUs)."""
    session = get_backend(variant.runtime).load(
        variant_artifact(variant.id, variant, bundle), LoadOptions()
    )
    return lambda: session.run(feeds)


def time_side_by_side(runs: dict[str, Run], rounds: int, calls: int) -> dict[str, float]:
    """Median milliseconds per call; each round times ``calls`` calls of every variant in turn."""
    for run in runs.values():
        for _ in range(3):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - start) * 1000.0 / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(title: str, medians: dict[str, float], baseline: str) -> None:
    base = medians[baseline]
    print(f"\n{title}")
    print(f"  {'variant':<34} {'median ms':>10} {'speed-up vs ORT FP32':>22}")
    for name, ms in sorted(medians.items(), key=lambda kv: kv[1]):
        print(f"  {name:<34} {ms:>10.3f} {base / ms:>21.2f}x")


def runs_for(bundle: Path, manifest: Any, feeds: dict[str, Any]) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    for v in manifest.variants:
        if v.precision == "fp16" and v.runtime == "onnxruntime":
            continue  # a GPU variant (target accelerator nvidia-gpu): not timed on a CPU
        label = f"{v.id} ({v.status})"
        runs[label] = agent_run(bundle, v, feeds)
        if v.id == "onnx-fp32":  # the baseline: a plain session, ONNX Runtime's defaults
            import onnxruntime as ort

            plain = ort.InferenceSession(
                str(bundle / v.entrypoint), providers=["CPUExecutionProvider"]
            )
            runs[PLAIN] = functools.partial(plain.run, None, feeds)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--size", type=int, default=640, help="PP-OCR sample page size")
    parser.add_argument(
        "--pages", type=int, default=16, help="PP-OCR validation pages (8 generalize too little)"
    )
    parser.add_argument("--budget", type=float, default=1.0, help="points of the metric")
    args = parser.parse_args()
    configure_logging("warning")
    print(f"CPU cores visible: {os.cpu_count()}; rounds: {args.rounds} (variants interleaved)")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp_name:
        tmp = Path(tmp_name)

        # -- digits CNN -------------------------------------------------------------------
        data = digits_data()
        np.savez(tmp / "d-cal.npz", input=data.x_train[:300])
        np.savez(tmp / "d-val.npz", input=data.x_test, labels=data.y_test)
        started = time.monotonic()
        digits = build_variants(
            digits_cnn(),
            tmp / "digits",
            name="digits",
            version="1.0.0",
            calibration=tmp / "d-cal.npz",
            validation=tmp / "d-val.npz",
            golden=None,
        )
        print(f"digits bundle built in {time.monotonic() - started:.1f} s")
        one = {"input": data.x_test[:1]}
        batch = {"input": data.x_test[:256]}
        d1 = time_side_by_side(runs_for(tmp / "digits", digits, one), args.rounds, calls=200)
        d256 = time_side_by_side(runs_for(tmp / "digits", digits, batch), args.rounds, calls=10)

        # -- PP-OCR detector: the task gate + accuracy-aware INT8 vs the old gate ----------
        size = args.size
        np.savez(tmp / "p-cal.npz", x=text_page(8, seed=1, size=size))
        np.savez(tmp / "p-val.npz", x=text_page(args.pages, seed=100, size=size))
        common: dict[str, Any] = {
            "name": "ppocr-det",
            "version": "1.0.0",
            "calibration": tmp / "p-cal.npz",
            "validation": tmp / "p-val.npz",
            "golden": None,
            "accuracy_budget": args.budget,
        }
        started = time.monotonic()
        old = build_variants(
            ppocr_detector(),
            tmp / "ppocr-old",
            task="generic",  # relative L2, one MinMax quantization each: the old gate
            search=Int8Search(
                calibration_methods=("MinMax",), openvino_presets=("performance",), max_steps=0
            ),
            **common,
        )
        old_seconds = time.monotonic() - started
        started = time.monotonic()
        ppocr = build_variants(ppocr_detector(), tmp / "ppocr", task="detection", **common)
        new_seconds = time.monotonic() - started
        print(
            f"PP-OCR full variant set built at {size}x{size}: task gate + accuracy-aware INT8"
            f" {new_seconds:.1f} s, old gate {old_seconds:.1f} s"
        )
        page = {"x": text_page(1, seed=7, size=640)}
        runs = runs_for(tmp / "ppocr", ppocr, page)
        old_runs = runs_for(tmp / "ppocr-old", old, page)
        runs |= {
            f"old gate: {k}": v
            for k, v in old_runs.items()
            if not k.startswith("onnx-fp32") and k != PLAIN
        }
        p640 = time_side_by_side(runs, args.rounds, calls=1)
        base = PLAIN
        best_ppocr = min(
            (k for k in p640 if k.endswith("(accepted)") and not k.startswith("old gate")),
            key=lambda k: p640[k],
        )
        best_old = min(
            (
                k
                for k in p640
                if k.endswith("(accepted)")
                and (k.startswith("old gate") or k == "onnx-fp32 (accepted)")
            ),
            key=lambda k: p640[k],
        )
        held_out = text_page(8, seed=500, size=640)
        best_variant = ppocr.variant(best_ppocr.split(" ")[0])
        f1 = held_out_f1(tmp / "ppocr", ppocr.variant("onnx-fp32"), best_variant, held_out)

    base = PLAIN
    print_table("digits CNN, batch 1 (1x1x8x8)", d1, base)
    print_table("digits CNN, batch 256", d256, base)
    print_table("PP-OCR detector, 1x3x640x640 (task gate; old-gate variants marked)", p640, base)
    print("\naccuracy vs FP32 (from the manifests' accuracy gate)")
    for model, manifest in (("digits", digits), ("ppocr-det", ppocr), ("ppocr old", old)):
        for v in manifest.variants:
            a = v.accuracy
            if a is None:
                continue
            kept = len(v.build.kept_float) if v.build else 0
            print(
                f"  {model:<10} {v.id:<14} {a.metric:<9} fp32 {a.reference:7.2f}"
                f"  variant {a.value:7.2f}  delta {a.delta:6.2f}  float ops kept {kept:<3}"
                f" {v.status}"
            )
    int8 = digits.variant("onnx-int8").accuracy
    assert int8 is not None
    print("\nsummary")
    d_int8 = next(k for k in d1 if k.startswith("onnx-int8"))
    print(
        f"  digits    ORT INT8 / ORT FP32 speed-up: batch 1 {d1[base] / d1[d_int8]:.2f}x,"
        f" batch 256 {d256[base] / d256[d_int8]:.2f}x; top-1 drop {int8.delta:.2f} points"
    )
    print(
        f"  ppocr-det best accepted variant (task gate) / ORT FP32: "
        f"{p640[base] / p640[best_ppocr]:.2f}x ({best_ppocr}); held-out box F1 vs FP32"
        f" {f1:.3f} (goal >= 3.0x, F1 >= 0.98)"
    )
    print(
        f"  ppocr-det best accepted variant (old rel-L2 gate) / ORT FP32: "
        f"{p640[base] / p640[best_old]:.2f}x ({best_old})"
    )
    print(
        f"  ppocr-det full variant set build time: {new_seconds:.1f} s with the task gate and"
        f" accuracy-aware INT8, {old_seconds:.1f} s with the old gate"
        f" ({new_seconds / old_seconds:.2f}x)"
    )


def held_out_f1(bundle: Path, fp32: Any, variant: Any, pages: np.ndarray[Any, Any]) -> float:
    """Box F1 (DB decoding) of ``variant`` against FP32 on pages the gate never saw, both run
    as a device runs them (the agent's backends)."""
    outputs = []
    for v in (fp32, variant):
        session = get_backend(v.runtime).load(variant_artifact(v.id, v, bundle), LoadOptions())
        outputs.append(
            np.concatenate([next(iter(session.run({"x": p[None]}).values())) for p in pages])
        )
        session.close()
    return box_f1(outputs[0], outputs[1])[0]


if __name__ == "__main__":
    main()

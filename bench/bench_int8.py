"""INT8 variants on this CPU: latency ratios against ONNX Runtime FP32, and the accuracy cost.

Builds the bundles with ``control_plane.builds.build_variants`` (digits CNN, PP-OCR text
detector), adds ONNX Runtime INT8 recipes that differ in one knob, then times every variant
side by side in rounds (each round runs each variant once, in turn) and prints median
latencies, ratios to ONNX Runtime FP32 and the digits CNN's top-1 drop. Goal: INT8 >= 2.5x
faster than FP32 with <= 1 point of top-1 lost.

    .venv/bin/python bench/bench_int8.py [--rounds N]
"""

from __future__ import annotations

import argparse
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

from agent.logs import configure_logging
from agent.samples import digits_cnn, digits_data, ppocr_detector
from control_plane.builds import Int8Recipe, build_variants
from control_plane.builds._onnx import quantize_int8
from control_plane.builds._samples import SampleSet

Run = Callable[[], Any]


def text_pages(count: int, size: int, seed: int) -> np.ndarray[Any, Any]:
    """Pages of printed words, normalized as PP-OCR expects (NCHW float32)."""
    import cv2

    rng = np.random.default_rng(seed)
    words = ["edge", "fleet", "robot", "INT8", "model", "2024", "camera", "depth", "ready"]
    mean = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]
    out = np.empty((count, 3, size, size), np.float32)
    for k in range(count):
        page = np.full((size, size, 3), int(rng.integers(200, 256)), np.uint8)
        for _ in range(size // 48):
            scale = float(rng.uniform(0.5, 1.5)) * size / 320
            text = " ".join(rng.choice(words, 3))
            org = (int(rng.integers(0, size // 4)), int(rng.integers(int(30 * scale) + 2, size)))
            color = tuple(int(c) for c in rng.integers(0, 80, 3))
            thickness = max(1, round(2 * scale))
            cv2.putText(page, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness)
        out[k] = (page.astype(np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
    return out


def ort_run(path: Path, feeds: dict[str, Any]) -> Run:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, feeds)


def ov_run(path: Path, feeds: dict[str, Any]) -> Run:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda: request.infer(feeds)


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
        path = bundle / v.entrypoint
        label = f"{v.id} ({v.status})"
        runs[label] = ort_run(path, feeds) if v.runtime == "onnxruntime" else ov_run(path, feeds)
    return runs


def _best(medians: dict[str, float]) -> float:
    return min(ms for name, ms in medians.items() if name.endswith("(accepted)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
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

        # -- PP-OCR detector --------------------------------------------------------------
        np.savez(tmp / "p-cal.npz", x=text_pages(8, 320, seed=1))
        started = time.monotonic()
        ppocr = build_variants(
            ppocr_detector(),
            tmp / "ppocr",
            name="ppocr-det",
            version="1.0.0",
            calibration=tmp / "p-cal.npz",
            validation=None,
            golden=None,
        )
        print(f"PP-OCR bundle built in {time.monotonic() - started:.1f} s (calibrated at 320x320)")
        fp32 = tmp / "ppocr" / ppocr.variant("onnx-fp32").entrypoint
        cal = SampleSet({"x": text_pages(8, 320, seed=1)[:, None]})
        knobs = {
            "ort-int8 QDQ u8/s8 reduce_range": Int8Recipe(reduce_range=True),
            "ort-int8 QOperator u8/s8": Int8Recipe(quant_format="QOperator"),
            "ort-int8 QDQ s8/s8": Int8Recipe(activation_type="QInt8"),
        }
        page = {"x": text_pages(1, 640, seed=7)}
        runs = runs_for(tmp / "ppocr", ppocr, page)
        for label, recipe in knobs.items():
            out = tmp / f"{label.replace(' ', '_').replace('/', '')}.onnx"
            quantize_int8(fp32, out, cal, batch=True, recipe=recipe)
            runs[label] = ort_run(out, page)
        p640 = time_side_by_side(runs, args.rounds, calls=1)
        reference = runs["onnx-fp32 (accepted)"]()[0]
        knob_error = {
            label: float(np.linalg.norm(runs[label]()[0] - reference) / np.linalg.norm(reference))
            for label in knobs
        }

    base = "onnx-fp32 (accepted)"
    print_table("digits CNN, batch 1 (1x1x8x8)", d1, base)
    print_table("digits CNN, batch 256", d256, base)
    print_table("PP-OCR detector, 1x3x640x640", p640, base)
    print("\nPP-OCR INT8 recipes (not gated): relative L2 vs FP32 on the timed page")
    for label, err in knob_error.items():
        print(f"  {label:<34} {100 * err:6.2f} %")
    print("\naccuracy vs FP32 (from the manifests' accuracy gate)")
    for model, manifest in (("digits", digits), ("ppocr-det", ppocr)):
        for v in manifest.variants:
            a = v.accuracy
            if a is None:
                continue
            print(
                f"  {model:<10} {v.id:<14} {a.metric:<9} fp32 {a.reference:7.2f}"
                f"  variant {a.value:7.2f}  delta {a.delta:6.2f}  {v.status}"
            )
    int8 = digits.variant("onnx-int8").accuracy
    assert int8 is not None
    offered = {k: v for k, v in p640.items() if k.endswith("(accepted)")}
    fastest = min(p640, key=lambda k: p640[k])
    best_ppocr = min(offered, key=lambda k: offered[k])
    print("\nsummary (goal: INT8 >= 2.5x faster than ORT FP32, <= 1 point top-1 lost)")
    d_int8 = next(k for k in d1 if k.startswith("onnx-int8"))
    print(
        f"  digits    ORT INT8 / ORT FP32 speed-up: batch 1 {d1[base] / d1[d_int8]:.2f}x,"
        f" batch 256 {d256[base] / d256[d_int8]:.2f}x;"
        f" best accepted variant batch 1 {d1[base] / _best(d1):.2f}x,"
        f" batch 256 {d256[base] / _best(d256):.2f}x;"
        f" top-1 drop {int8.delta:.2f} points"
    )
    int8_key = next(k for k in p640 if k.startswith("onnx-int8"))
    print(
        f"  ppocr-det ORT INT8 / ORT FP32 speed-up: {p640[base] / p640[int8_key]:.2f}x;"
        f" best accepted variant {p640[base] / p640[best_ppocr]:.2f}x ({best_ppocr});"
        f" fastest of all {p640[base] / p640[fastest]:.2f}x ({fastest})"
    )


if __name__ == "__main__":
    main()

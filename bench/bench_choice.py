"""Choice quality: is the backend+precision the chooser picks within 10% of the fastest?

For the PP-OCR detector (1x3x640x640) and the digits CNN (1x1x8x8) this builds the candidates
(ONNX Runtime FP32, ONNX Runtime INT8 static QDQ per-channel, OpenVINO FP32 from the ONNX file,
OpenVINO reduced float (bf16/f16), OpenVINO on the INT8 file), measures all of them exhaustively
in interleaved rounds, then runs the chooser (its own bounded budget) and prints the chosen
candidate's exhaustive p50 against the fastest accurate one and the fastest of all.

    .venv/bin/python bench/bench_choice.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.backends import LoadOptions, get_backend
from agent.backends.choice import Candidate, candidates_for_files, choose, rel_l2
from agent.config import BackendConfig
from agent.hardware import detect_profile
from agent.samples import digits_cnn, digits_data, ppocr_detector

ROUNDS = {"ppocr-det": 25, "digits": 400}
BUDGET_S = 15.0


def text_image(height: int, width: int, seed: int) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 235, np.float32)
    for _ in range(max(2, height * width // 8000)):
        y = int(rng.integers(0, max(1, height - 20)))
        x = int(rng.integers(0, max(1, width // 3)))
        h = int(rng.integers(8, 18))
        for k in range(int(rng.integers(4, 12))):
            img[y : y + h, x + k * 10 : x + k * 10 + 6] = float(rng.integers(0, 60))
    img = (img / 255.0 - 0.5) / 0.5
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def quantize(src: Path, dst: Path, input_name: str, calib: list[np.ndarray[Any, Any]]) -> Path:
    """ONNX Runtime static INT8, QDQ, per-channel weights (opset >= 13 for per-channel)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    up = dst.with_name(dst.stem + "-op13.onnx")
    onnx.save(version_converter.convert_version(model, 13) if opset < 13 else model, str(up))
    pre = dst.with_name(dst.stem + "-pre.onnx")
    quant_pre_process(str(up), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter({input_name: x} for x in calib)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return dst


def exhaustive(
    cands: list[Candidate], feeds: dict[str, np.ndarray[Any, Any]], rounds: int
) -> dict[str, tuple[float | None, float | None]]:
    """candidate id -> (p50 ms, rel_l2 vs the ORT FP32 reference); None when it cannot run."""
    sessions: dict[str, Any] = {}
    for c in cands:
        try:
            sessions[c.id] = get_backend(c.backend).load(c.artifact, LoadOptions())
        except Exception as exc:
            print(f"  {c.id}: cannot load ({str(exc)[:100]})")
    ref_id = next(c.id for c in cands if c.backend == "onnxruntime" and c.precision == "fp32")
    ref = sessions[ref_id].run(feeds)
    acc = {cid: rel_l2(s.run(feeds), ref)[0] for cid, s in sessions.items()}
    times: dict[str, list[float]] = {cid: [] for cid in sessions}
    for _ in range(3):
        for s in sessions.values():
            s.run(feeds)
    for _ in range(rounds):
        for cid, s in sessions.items():
            t0 = time.perf_counter()
            s.run(feeds)
            times[cid].append(time.perf_counter() - t0)
    out: dict[str, tuple[float | None, float | None]] = {c.id: (None, None) for c in cands}
    for cid, ts in times.items():
        out[cid] = (float(np.median(ts)) * 1e3, acc[cid])
    for s in sessions.values():
        s.close()
    return out


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-choice-") as tmp:
        return run(Path(tmp))


def run(work: Path) -> int:
    profile = detect_profile()
    digits = digits_data()
    ppocr = ppocr_detector()
    models = {
        "ppocr-det": (
            ppocr,
            "x",
            [text_image(640, 640, 100)],
            [text_image(640, 640, s) for s in range(8)],
        ),
        "digits": (
            digits_cnn(),
            "input",
            [digits.x_test[:1], digits.x_test[1:129]],
            [digits.x_train[i : i + 32] for i in range(0, 320, 32)],
        ),
    }
    print(f"machine: {profile.cpu.model}, {profile.cpu.cores} cores, flags {profile.cpu.flags}")
    print(f"runtimes: {[(r.name, r.version) for r in profile.runtimes if r.usable]}")
    rows = []
    for name, (fp32, input_name, golden, calib) in models.items():
        int8 = quantize(fp32, work / f"{name}-int8.onnx", input_name, calib)
        cands = candidates_for_files(
            fp32, int8=[int8], backends=("onnxruntime", "openvino"), name=name
        )
        feeds = {input_name: golden[0]}
        print(f"\n== {name}: exhaustive, {ROUNDS[name]} interleaved rounds")
        ex = exhaustive(cands, feeds, ROUNDS[name])
        t0 = time.perf_counter()
        choice = choose(
            cands,
            profile,
            [{input_name: g} for g in golden],
            config=BackendConfig(choice_budget_s=BUDGET_S),
            model=name,
        )
        took = time.perf_counter() - t0
        tol = {c.id: c.tolerance.max_rel_l2 for c in cands}
        print(f"{'candidate':44} {'p50 ms':>9} {'rel_l2':>9} {'allowed':>8}  chooser p50")
        for c in cands:
            p50, err = ex[c.id]
            m = choice.measurement(c.id)
            mark = " <- chosen" if c.id == choice.chosen else ""
            print(
                f"{c.id:44} {p50 if p50 is not None else float('nan'):9.3f} "
                f"{err if err is not None else float('nan'):9.2g} {tol[c.id]:8g}  "
                f"{m.p50_ms if m.p50_ms is not None else float('nan'):.3f} ({m.status}){mark}"
            )
        accurate = [
            p for cid, (p, e) in ex.items() if p is not None and e is not None and e <= tol[cid]
        ]
        everything = [p for p, _ in ex.values() if p is not None]
        chosen_p50 = ex[choice.chosen][0] or float("nan")
        rows.append((name, choice.chosen, chosen_p50, min(accurate), min(everything), took))
    print("\n== choice quality (exhaustive p50 of the chosen / fastest; goal <= 1.10)")
    print(f"{'model':10} {'chosen':40} {'vs accurate':>12} {'vs any':>8} {'choose s':>9}")
    for name, chosen, cp, fa, fany, took in rows:
        print(f"{name:10} {chosen:40} {cp / fa:12.3f} {cp / fany:8.3f} {took:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

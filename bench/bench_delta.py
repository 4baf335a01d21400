"""Model delta figures, side by side in one run: delta bytes / full bytes per encoding, and the
time to rebuild on this CPU against the time to download the full archive at 10 Mbit/s.

Every archive is a real bundle ``.tar`` as devices receive it (``build_bundle`` + ``pack``:
manifest, model file, golden inputs and outputs), so the figures include what a version changes
besides its weights. Cases:

- digits fine-tune: the digits CNN (``agent.samples.digits_cnn``, trained 30 epochs) trained 2
  more epochs on its training set with Gaussian input noise (sigma 0.05, lr 0.01): same
  architecture, every weight moved. Also digits retrained from scratch with another seed (the
  worst case: nothing shared but the layout).
- PP-OCR det FP32 re-export with one layer changed: the largest convolution's weights (of
  about 0.9 M in all)
  multiplied by (1 + N(0, 0.01)), saved again with ``onnx.save``.
- INT8 of the new version against the INT8 of the old one: ONNX Runtime dynamic quantization
  (weights int8) of both PP-OCR det versions above, and of both digits versions.

Encodings: ``patch-from`` (zstd -19 with the old archive as dictionary), ``xor-planes`` (same
length only), bsdiff4, and what ``make_delta`` chooses (the smaller of the first two). Goal:
chosen <= 0.3 for the fine-tune.

Run: ``.venv/bin/python bench/bench_delta.py`` (about a minute).
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bsdiff4
import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import samples  # noqa: E402
from agent.models.bundle import VariantSpec, build_bundle, pack  # noqa: E402
from agent.updates.delta import apply_delta, delta_method, make_delta  # noqa: E402

LINK_BPS = 10e6  # 10 Mbit/s


def finetune_digits(src: Path, dest: Path, *, epochs: int = 2, lr: float = 0.01) -> Path:
    """Continue SGD from the trained weights on noisy inputs (the sample trainer's network)."""
    model = onnx.load(str(src))
    p = {i.name: numpy_helper.to_array(i).copy() for i in model.graph.initializer}
    c = p["conv_w"].shape[0]
    w1, b1 = p["conv_w"].reshape(c, 9).copy(), p["conv_b"].copy()
    w2, b2 = p["fc_w"].copy(), p["fc_b"].copy()
    data = samples.digits_data()
    rng = np.random.default_rng(1)
    x, y = data.x_train, data.y_train
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 32):
            ib = order[start : start + 32]
            n = len(ib)
            xb = x[ib] + rng.normal(0, 0.05, x[ib].shape).astype(np.float32)
            cols = samples._im2col(xb)
            z = cols @ w1.T + b1
            a = np.maximum(z, 0).reshape(n, 8, 8, c)
            p4 = a.reshape(n, 4, 2, 4, 2, c)
            pooled = p4.max(axis=(2, 4))
            flat = pooled.transpose(0, 3, 1, 2).reshape(n, -1)
            logits = flat @ w2 + b2
            logits -= logits.max(axis=1, keepdims=True)
            prob = np.exp(logits)
            prob /= prob.sum(axis=1, keepdims=True)
            prob[np.arange(n), y[ib]] -= 1
            g = prob / n
            g_flat = (g @ w2.T).reshape(n, c, 4, 4).transpose(0, 2, 3, 1)
            mask = p4 == pooled[:, :, None, :, None, :]
            g_z = (mask * g_flat[:, :, None, :, None, :]).reshape(n * 64, c) * (z > 0)
            w2 -= lr * (flat.T @ g)
            b2 -= lr * g.sum(axis=0)
            w1 -= lr * (g_z.T @ cols)
            b1 -= lr * g_z.sum(axis=0)
    params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    onnx.save(samples._digits_onnx(params, c), str(dest))
    return dest


def retrain_digits(dest: Path) -> Path:
    params = samples._train_digits(samples.digits_data(), channels=16, seed=7)
    onnx.save(samples._digits_onnx(params, 16), str(dest))
    return dest


def ocr_one_layer(src: Path, dest: Path) -> Path:
    """The largest 4-D weight (a Constant node in this export) changed: w * (1 + N(0, 0.01))."""
    model = onnx.load(str(src))
    tensors = [
        attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attr in node.attribute
        if attr.name == "value" and len(attr.t.dims) == 4
    ]
    tensors += [i for i in model.graph.initializer if len(i.dims) == 4]
    biggest = max(tensors, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(biggest)
    rng = np.random.default_rng(3)
    changed = (w * (1 + rng.normal(0, 0.01, w.shape))).astype(np.float32)
    biggest.CopyFrom(numpy_helper.from_array(changed, biggest.name))
    onnx.save(model, str(dest))
    return dest


def int8(src: Path, dest: Path) -> Path:
    """Weights int8 (ORT dynamic quantization), after moving Constant weights to initializers."""
    model = onnx.load(str(src))
    keep = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and value.data_type == 1:
            model.graph.initializer.append(
                numpy_helper.from_array(numpy_helper.to_array(value), node.output[0])
            )
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    fp32 = dest.with_suffix(".fp32.onnx")
    onnx.save(model, str(fp32))
    quantize_dynamic(str(fp32), str(dest), weight_type=QuantType.QInt8)
    return dest


def archive(
    work: Path, tag: str, model: Path, version: str, feeds: dict[str, Any], *, ref: Path | None
) -> Path:
    """The bundle archive a device downloads for this model file."""
    bundle = work / f"bundle-{tag}"
    spec = VariantSpec(model, precision="int8" if ref is not None else "fp32")
    build_bundle(bundle, "bench", version, [spec], golden_inputs=[feeds], reference_model=ref)
    return pack(bundle, work / f"{tag}.tar")


def measure(work: Path, old: Path, new: Path) -> dict[str, Any]:
    full = new.stat().st_size
    row: dict[str, Any] = {"full": full}
    for method in ("patch-from", "xor-planes"):
        if method == "xor-planes" and old.stat().st_size != full:
            row[method] = None
            continue
        out = work / f"d-{method}"
        row[method] = make_delta(old, new, out, methods=(method,)) / full
    t0 = time.perf_counter()
    row["bsdiff"] = len(bsdiff4.diff(old.read_bytes(), new.read_bytes())) / full
    row["bsdiff_s"] = time.perf_counter() - t0
    chosen = work / "d-chosen"
    t0 = time.perf_counter()
    size = make_delta(old, new, chosen)
    row["build_s"] = time.perf_counter() - t0
    row["method"] = delta_method(chosen)
    row["delta"] = size
    row["chosen"] = size / full
    sha = hashlib.sha256(new.read_bytes()).hexdigest()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        apply_delta(old, chosen, work / "rebuilt.tar", length=full, sha256=sha)
        times.append(time.perf_counter() - t0)
    row["rebuild_s"] = min(times)
    row["download_full_s"] = full * 8 / LINK_BPS
    row["download_delta_s"] = size * 8 / LINK_BPS
    return row


def main() -> None:
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        digits = samples.digits_cnn()
        data = samples.digits_data()
        dfeeds = {"input": data.x_test[:16]}
        tuned = finetune_digits(digits, work / "digits-ft.onnx")
        scratch = retrain_digits(work / "digits-scratch.onnx")
        d_old = archive(work, "d1", digits, "1.0.0", dfeeds, ref=None)
        rows["digits fine-tune (2 epochs, noisy inputs)"] = measure(
            work, d_old, archive(work, "d2", tuned, "1.1.0", dfeeds, ref=None)
        )
        rows["digits retrained from scratch"] = measure(
            work, d_old, archive(work, "d3", scratch, "1.1.0", dfeeds, ref=None)
        )
        ocr = samples.ppocr_detector()
        ocr2 = ocr_one_layer(ocr, work / "ocr2.onnx")
        ofeeds = {"x": samples.text_page(1, 0, size=160)}
        o_old = archive(work, "o1", ocr, "1.0.0", ofeeds, ref=None)
        rows["PP-OCR det FP32 re-export, one layer changed"] = measure(
            work, o_old, archive(work, "o2", ocr2, "1.1.0", ofeeds, ref=None)
        )
        o8_old = archive(work, "o8a", int8(ocr, work / "ocr-i8.onnx"), "1.0.0", ofeeds, ref=ocr)
        o8_new = archive(work, "o8b", int8(ocr2, work / "ocr2-i8.onnx"), "1.1.0", ofeeds, ref=ocr2)
        rows["PP-OCR det INT8 new vs INT8 old"] = measure(work, o8_old, o8_new)
        d8_old = archive(work, "d8a", int8(digits, work / "d-i8.onnx"), "1.0.0", dfeeds, ref=digits)
        d8_new = archive(work, "d8b", int8(tuned, work / "t-i8.onnx"), "1.1.0", dfeeds, ref=tuned)
        rows["digits INT8 fine-tune vs INT8 old"] = measure(work, d8_old, d8_new)

    print("delta bytes / full bytes (bundle .tar), per encoding")
    head = f"{'case':46} {'full B':>10} {'patch-from':>10} {'xor-planes':>10} {'bsdiff':>8}"
    print(head + f" {'chosen':>8}  method")
    for name, r in rows.items():
        xor = f"{r['xor-planes']:10.3f}" if r["xor-planes"] is not None else f"{'n/a':>10}"
        print(
            f"{name:46} {r['full']:10d} {r['patch-from']:10.3f} {xor} {r['bsdiff']:8.3f}"
            f" {r['chosen']:8.3f}  {r['method']}"
        )
    print()
    print("time on this CPU vs the link (10 Mbit/s)")
    print(
        f"{'case':46} {'build s':>8} {'rebuild s':>10} {'full dl s':>10} {'delta dl s':>10}"
        f" {'rebuild/full dl':>16} {'bsdiff s':>9}"
    )
    for name, r in rows.items():
        print(
            f"{name:46} {r['build_s']:8.3f} {r['rebuild_s']:10.4f} {r['download_full_s']:10.3f}"
            f" {r['download_delta_s']:10.3f} {r['rebuild_s'] / r['download_full_s']:16.4f}"
            f" {r['bsdiff_s']:9.3f}"
        )
    ft = rows["digits fine-tune (2 epochs, noisy inputs)"]["chosen"]
    print(f"\nfine-tune goal <= 0.3: {ft:.3f} ({'met' if ft <= 0.3 else 'NOT met'})")


if __name__ == "__main__":
    main()

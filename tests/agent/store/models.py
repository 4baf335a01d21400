"""Variants of the real digits CNN for store and swap tests, written with onnx.helper.

- ``shifted``: the same network with ``delta`` added to every logit, so a result names its version;
- ``slower``: the same outputs plus an input-dependent heavy branch multiplied by zero;
- ``heavier``: the same outputs plus a chain of MatMuls over ``layers`` weights of 4 MB each
  multiplied by zero: a slow variant with a hundred MB of weights in pieces the size of a
  transformer's, which the C allocator keeps after their release unless it is told to give
  them back;
- ``erroring``: fails at run time (Gather out of range) when an input pixel reaches 0.8, which
  the digits images do, but not on golden inputs scaled below that;
- ``stalling``: the same logits, and a frame with a pixel at ``flag`` or above first runs a
  branch of two MatMuls over ``rows`` copies of the batch (about ``rows`` x ``width`` x
  ``width`` multiply-adds per frame, multiplied by zero): a version that is slow on the frames a
  test chooses and on no other;
- ``noisy``: the same logits plus fresh uniform noise of amplitude ``scale`` on every run, so a
  device's golden check never reproduces what the build recorded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.contracts.manifest import BundleManifest
from agent.models.bundle import VariantSpec, build_bundle


def _load(src: Path) -> onnx.ModelProto:
    return onnx.load(str(src))


def _save(model: onnx.ModelProto, dest: Path) -> Path:
    onnx.checker.check_model(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


def shifted(src: Path, dest: Path, delta: float) -> Path:
    model = _load(src)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "fc_b":
            bias = numpy_helper.to_array(init) + np.float32(delta)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(bias, "fc_b"))
    return _save(model, dest)


def one_class_wins(src: Path, dest: Path, *, klass: int = 3) -> Path:
    """The digits CNN with one class's bias raised so far that it wins on every input: a
    version that loads, validates against its own golden outputs and disagrees on real inputs."""
    model = _load(src)
    for i, init in enumerate(model.graph.initializer):
        if init.name == "fc_b":
            bias = numpy_helper.to_array(init).copy()
            bias[klass] += np.float32(1000.0)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(bias, "fc_b"))
    return _save(model, dest)


def _rename_output(model: onnx.ModelProto) -> None:
    """Make the Gemm write ``logits_raw`` so a new node can produce ``logits``."""
    for node in model.graph.node:
        for j, out in enumerate(node.output):
            if out == "logits":
                node.output[j] = "logits_raw"


def slower(src: Path, dest: Path, *, tile: int = 32, channels: int = 48) -> Path:
    model = _load(src)
    _rename_output(model)
    g = model.graph
    rng = np.random.default_rng(1)
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, 1, tile, tile], np.int64), "slow_reps"),
            numpy_helper.from_array(
                rng.normal(0, 0.1, (channels, 1, 3, 3)).astype(np.float32), "slow_w"
            ),
            numpy_helper.from_array(np.array([0, 1], np.int64), "slow_shape"),
            numpy_helper.from_array(np.array(0.0, np.float32), "slow_zero"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Tile", ["input", "slow_reps"], ["slow_big"]),
            helper.make_node("Conv", ["slow_big", "slow_w"], ["slow_c"], pads=[1, 1, 1, 1]),
            helper.make_node("ReduceMean", ["slow_c"], ["slow_m"], keepdims=1),
            helper.make_node("Reshape", ["slow_m", "slow_shape"], ["slow_r"]),
            helper.make_node("Mul", ["slow_r", "slow_zero"], ["slow_z"]),
            helper.make_node("Add", ["logits_raw", "slow_z"], ["logits"]),
        ]
    )
    return _save(model, dest)


def heavier(src: Path, dest: Path, *, layers: int = 24, width: int = 1024) -> Path:
    model = _load(src)
    _rename_output(model)
    g = model.graph
    rng = np.random.default_rng(2)
    g.initializer.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "heavy_flat"))
    g.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "heavy_zero"))
    g.node.append(helper.make_node("Reshape", ["input", "heavy_flat"], ["heavy_0"]))
    rows = 64  # the 8x8 digits image
    for i in range(layers):
        weight = rng.normal(0.0, 1.0 / np.sqrt(rows), (rows, width)).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(weight, f"heavy_w{i}"))
        g.node.append(helper.make_node("MatMul", [f"heavy_{i}", f"heavy_w{i}"], [f"heavy_{i + 1}"]))
        rows = width
    g.node.extend(
        [
            helper.make_node("ReduceMean", [f"heavy_{layers}"], ["heavy_m"], keepdims=0),
            helper.make_node("Mul", ["heavy_m", "heavy_zero"], ["heavy_z"]),
            helper.make_node("Add", ["logits_raw", "heavy_z"], ["logits"]),
        ]
    )
    return _save(model, dest)


def erroring(src: Path, dest: Path) -> Path:
    model = _load(src)
    _rename_output(model)
    g = model.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(16, np.float32), "err_table"),
            numpy_helper.from_array(np.array(20.0, np.float32), "err_scale"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("ReduceMax", ["input"], ["err_max"], keepdims=0),
            helper.make_node("Mul", ["err_max", "err_scale"], ["err_scaled"]),
            helper.make_node("Floor", ["err_scaled"], ["err_floor"]),
            helper.make_node("Cast", ["err_floor"], ["err_idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["err_table", "err_idx"], ["err_pick"]),
            helper.make_node("Add", ["logits_raw", "err_pick"], ["logits"]),
        ]
    )
    return _save(model, dest)


def stalling(
    src: Path, dest: Path, *, flag: float = 1000.0, rows: int = 16384, width: int = 512
) -> Path:
    model = _load(src)
    _rename_output(model)
    g = model.graph
    rng = np.random.default_rng(5)
    w1 = rng.normal(0.0, 0.1, (64, width)).astype(np.float32)
    w2 = rng.normal(0.0, 0.05, (width, width)).astype(np.float32)
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(flag, np.float32), "stall_flag"),
            numpy_helper.from_array(np.array(1.0, np.float32), "stall_one_f"),
            numpy_helper.from_array(np.array(rows, np.int64), "stall_rows"),
            numpy_helper.from_array(np.array(1, np.int64), "stall_one"),
            numpy_helper.from_array(np.array([1], np.int64), "stall_col"),
            numpy_helper.from_array(np.array([-1, 64], np.int64), "stall_flat"),
            numpy_helper.from_array(np.array([1, 64], np.int64), "stall_64"),
            numpy_helper.from_array(w1, "stall_w1"),
            numpy_helper.from_array(w2, "stall_w2"),
            numpy_helper.from_array(np.array(0.0, np.float32), "stall_zero"),
        ]
    )
    g.node.extend(
        [
            # rows of the branch: 1 on an ordinary frame, 1 + rows on a flagged one, each row
            # the batch's frames (nothing a runtime can fold away): [rows, batch, 64]
            helper.make_node("ReduceMax", ["input"], ["stall_max"], keepdims=0),
            helper.make_node("Div", ["stall_max", "stall_flag"], ["stall_ratio"]),
            helper.make_node("Floor", ["stall_ratio"], ["stall_floor"]),
            helper.make_node("Min", ["stall_floor", "stall_one_f"], ["stall_on"]),
            helper.make_node("Cast", ["stall_on"], ["stall_on_i"], to=TensorProto.INT64),
            helper.make_node("Mul", ["stall_on_i", "stall_rows"], ["stall_extra"]),
            helper.make_node("Add", ["stall_extra", "stall_one"], ["stall_n"]),
            helper.make_node("Reshape", ["stall_n", "stall_col"], ["stall_n1"]),
            helper.make_node("Concat", ["stall_n1", "stall_64"], ["stall_shape"], axis=0),
            helper.make_node("Div", ["input", "stall_flag"], ["stall_scaled"]),
            helper.make_node("Reshape", ["stall_scaled", "stall_flat"], ["stall_row"]),
            helper.make_node("Expand", ["stall_row", "stall_shape"], ["stall_x"]),
            helper.make_node("MatMul", ["stall_x", "stall_w1"], ["stall_h"]),
            helper.make_node("Relu", ["stall_h"], ["stall_r"]),
            helper.make_node("MatMul", ["stall_r", "stall_w2"], ["stall_mm"]),
            helper.make_node("ReduceMean", ["stall_mm"], ["stall_mean"], keepdims=0),
            helper.make_node("Mul", ["stall_mean", "stall_zero"], ["stall_z"]),
            helper.make_node("Add", ["logits_raw", "stall_z"], ["logits"]),
        ]
    )
    return _save(model, dest)


def noisy(src: Path, dest: Path, *, scale: float = 100.0) -> Path:
    model = _load(src)
    _rename_output(model)
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), "noise_scale"))
    g.node.extend(
        [
            helper.make_node("RandomUniformLike", ["logits_raw"], ["noise"]),
            helper.make_node("Mul", ["noise", "noise_scale"], ["noise_scaled"]),
            helper.make_node("Add", ["logits_raw", "noise_scaled"], ["logits"]),
        ]
    )
    return _save(model, dest)


def make_bundle(
    out_dir: Path,
    version: str,
    model_path: Path,
    golden: np.ndarray,
    *,
    name: str = "digits",
    blob_bytes: int = 0,
    reference_model: Path | None = None,
) -> BundleManifest:
    """A one-variant bundle; ``blob_bytes`` adds a companion file so installs take a while."""
    extra: tuple[Path, ...] = ()
    if blob_bytes:
        blob = out_dir.parent / f".{out_dir.name}-weights.bin"
        blob.write_bytes(np.random.default_rng(7).bytes(blob_bytes))
        extra = (blob,)
    return build_bundle(
        out_dir,
        name,
        version,
        [VariantSpec(model_path, extra_files=extra)],
        golden_inputs=[{"input": golden}],
        reference_model=reference_model,
    )

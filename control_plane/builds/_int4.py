"""INT4 weight-only variants: ONNX Runtime ``MatMulNBits`` and OpenVINO IR via NNCF.

Owns which models get INT4 variants (those whose weights are mostly matrix-product and
embedding tables, where weight-only compression pays) and the calls into ONNX Runtime's
``matmul_nbits_quantizer`` and ``nncf.compress_weights``. Activations stay float; only
constant weights are stored in 4 bits, block-wise with one scale per ``BLOCK_SIZE`` values.
Measuring the result against FP32 is the pipeline's gate, as for every other variant.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contracts.accuracy import TaskScore
from agent.contracts.manifest import QuantStep
from agent.logs import get_logger
from control_plane.builds import _gptq
from control_plane.builds._int8 import Int8Outcome, rank_onnx_nodes
from control_plane.builds._measure import Gate, ort_runner
from control_plane.builds._samples import SampleSet
from control_plane.builds.errors import VariantBuildError, first_line

__all__ = [
    "BLOCK_SIZE",
    "MIN_MATRIX_BYTES",
    "MIN_MATRIX_SHARE",
    "Int4Search",
    "compress_ir_int4",
    "matmul_nodes",
    "matrix_weights",
    "quantize_onnx_int4",
    "search_onnx_int4",
    "wants_int4",
]

log = get_logger(__name__)

BLOCK_SIZE = 32  # values per scale along the reduction axis (ONNX Runtime and NNCF alike)
MIN_MATRIX_BYTES = 4 * 1024**2  # MatMul/Gemm/Gather weights below this: no INT4 variant
MIN_MATRIX_SHARE = 0.5  # ... or when they are under this share of all weight bytes
_MATRIX_OPS = frozenset({"MatMul", "Gemm", "Gather"})


def matrix_weights(onnx_path: Path) -> tuple[int, int]:
    """``(bytes of 2-D float initializers read by MatMul/Gemm/Gather, bytes of all)``."""
    import onnx

    model = onnx.load(str(onnx_path))
    sizes: dict[str, int] = {}
    dims: dict[str, int] = {}
    for init in model.graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        item = 2 if init.data_type == onnx.TensorProto.FLOAT16 else 4
        sizes[init.name] = count * item
        dims[init.name] = len(init.dims)
    matrix: set[str] = set()
    for node in model.graph.node:
        if node.op_type not in _MATRIX_OPS:
            continue
        for name in node.input[:2]:
            if dims.get(name) == 2:
                matrix.add(name)
    return sum(sizes[n] for n in matrix), sum(sizes.values())


def wants_int4(onnx_path: Path) -> bool:
    """Whether weight-only INT4 is worth building: large matrix weights that dominate."""
    matrix, total = matrix_weights(onnx_path)
    return matrix >= MIN_MATRIX_BYTES and matrix >= MIN_MATRIX_SHARE * max(total, 1)


# MatMulNBits computes with 8-bit activations where the CPU has integer dot products (VNNI,
# ARM dotprod): on MiniLM at sequence 128, 0.77 of FP32's time against 0.90 at the default level
# (this CPU, 1 thread), for 0.01 point of cosine.
ACCURACY_LEVEL = 4


def _nbits(model: Any, bits: int, *, ops: tuple[str, ...], exclude: Sequence[str] = ()) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    axes = tuple((op, 0 if op == "MatMul" else 1) for op in ops)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=BLOCK_SIZE,
        is_symmetric=False,
        accuracy_level=ACCURACY_LEVEL,
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=ops,
        quant_axes=axes,
    )
    quantizer.process()
    return quantizer.model.model


def matmul_nodes(onnx_path: Path) -> list[str]:
    """Names of the MatMul nodes with a constant 2-D weight (what ``MatMulNBits`` replaces)."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_onnx_int4(
    fp32_path: Path,
    out_path: Path,
    *,
    target: str = "onnx-int4",
    keep_int8: Sequence[str] = (),
    blocks: Mapping[str, _gptq.Blocks] | None = None,
) -> None:
    """MatMul weights -> ``MatMulNBits`` and embedding tables -> ``GatherBlockQuantized``,
    4-bit asymmetric blocks of ``BLOCK_SIZE`` (on MiniLM the zero point is worth about half a
    point of cosine over symmetric blocks). The MatMul nodes in ``blocks`` take those (GPTQ's,
    ``_gptq.gptq_blocks``); the others are rounded to nearest. The MatMul nodes named in
    ``keep_int8`` get 8-bit blocks instead (``MatMulNBits`` with ``bits=8``)."""
    import onnx

    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = onnx.load(str(fp32_path))
            if keep_int8:
                others = [n for n in matmul_nodes(fp32_path) if n not in set(keep_int8)]
                model = _nbits(model, 8, ops=("MatMul",), exclude=others)
            if blocks:
                keep = set(keep_int8)
                chosen = {n: b for n, b in blocks.items() if n not in keep}
                model = _gptq.apply_blocks(model, chosen, accuracy_level=ACCURACY_LEVEL)
            # The 8-bit and GPTQ nodes are MatMulNBits by now: this pass leaves them alone.
            model = _nbits(model, 4, ops=("MatMul", "Gather"))
            onnx.save(model, str(out_path))
    except Exception as exc:  # the quantizer raises anything, asserts included
        raise VariantBuildError(
            f"MatMulNBits quantization failed: {first_line(exc)}", target=target
        ) from exc
    log.info(
        "int4_quantized",
        tool="onnxruntime",
        int8_nodes=len(keep_int8),
        gptq=bool(blocks),
        seconds=round(time.monotonic() - started, 2),
    )


INT4_RATIO = 0.7  # share of the weights nncf.compress_weights puts in INT4 (the rest INT8)


def compress_ir_int4(onnx_path: Path, xml_path: Path, *, target: str = "openvino-int4") -> None:
    """ONNX -> OpenVINO -> ``nncf.compress_weights(INT4_ASYM, group_size=BLOCK_SIZE,
    ratio=INT4_RATIO)`` -> IR.

    NNCF keeps the embeddings, the last matrix product and the most sensitive weights (by its
    own error estimate) in INT8; the build report's census says which operations ended in
    which precision.
    """
    import nncf
    import openvino as ov

    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(str(onnx_path))
            compressed = nncf.compress_weights(
                model,
                mode=nncf.CompressWeightsMode.INT4_ASYM,
                group_size=BLOCK_SIZE,
                # the most sensitive 30 % of the weights stay INT8: on MiniLM, ratio 1.0 kept
                # cosine 0.974 / top-10 0.926 of FP32, 0.8 gave 0.992 / 0.941, 0.7 0.9945 /
                # 0.956, at 0.24 of the FP32 weight bytes
                ratio=INT4_RATIO,
            )
            ov.save_model(compressed, str(xml_path), compress_to_fp16=False)
    except Exception as exc:  # NNCF and OpenVINO raise anything
        raise VariantBuildError(
            f"NNCF weight compression failed: {first_line(exc)}", target=target
        ) from exc
    log.info("int4_quantized", tool="nncf", seconds=round(time.monotonic() - started, 2))


@dataclass(frozen=True)
class Int4Search:
    """Bounds of the accuracy-aware ONNX Runtime INT4 search (per variant)."""

    seconds: float = 600.0  # after the first quantization
    max_steps: int = 5  # 8-bit steps: 1, 2, 4, 8, 16 of the costliest MatMul nodes
    max_int8_share: float = 0.5  # of the MatMul nodes; past it the variant is no INT4 model
    sensitivity_samples: int = 4
    gptq_samples: int = 64  # of the calibration set, for GPTQ's activation statistics


def search_onnx_int4(
    fp32_path: Path,
    out_path: Path,
    *,
    gate: Gate,
    output_names: Sequence[str],
    work: Path,
    search: Int4Search | None = None,
    calibration: SampleSet | None = None,
    clock: Callable[[], float] = time.monotonic,
    base: Path | None = None,
    target: str = "onnx-int4",
    gptq_cache: dict[str, dict[str, _gptq.Blocks]] | None = None,
) -> Int8Outcome:
    """Write the ONNX Runtime INT4 variant that holds the budget with the fewest 8-bit nodes,
    or, when none does within the bounds, the one that came closest.

    With a calibration set the MatMul weights' 4-bit blocks are GPTQ's over its first
    ``gptq_samples`` samples (computed once, before the first step, and counted in its
    seconds); without one, round-to-nearest (data-free).
    Every MatMul and embedding table in 4 bits first; over budget, a sensitivity pass runs
    the FP32 and the INT4 model side by side on a few samples and ranks the MatMul nodes by the
    relative error each adds to its input's (``rank_onnx_nodes``, as the INT8 search does),
    then gives the costliest 1, 2, 4, ... of them 8-bit blocks until the gate passes.
    ``kept_float`` of the outcome names the nodes kept in 8 bits.

    ``base`` is the graph quantized, when it is not ``fp32_path`` itself: its FP16 conversion,
    for the GPU variant (``onnx-int4-fp16``), whose blocks are the FP32 model's (GPTQ's
    statistics and the sensitivity ranking are taken on ``fp32_path``). ``gptq_cache`` keeps
    the blocks between the searches of one build."""
    limits = search or Int4Search()
    quantized = base or fp32_path
    work.mkdir(parents=True, exist_ok=True)
    started = clock()
    deadline = started + limits.seconds
    steps: list[QuantStep] = []
    best: tuple[TaskScore, Path, tuple[str, ...]] | None = None
    blocks: dict[str, _gptq.Blocks] | None = None
    gptq_started = clock()
    rounding = "round-to-nearest"
    if calibration is not None and len(calibration) > 0:
        key = f"{fp32_path}:{limits.gptq_samples}"
        cached = gptq_cache.get(key) if gptq_cache is not None else None
        if cached is not None:
            blocks = cached
        else:
            try:
                blocks = _gptq.gptq_blocks(
                    fp32_path, calibration, block_size=BLOCK_SIZE, max_samples=limits.gptq_samples
                )
            except Exception as exc:  # the calibration set does not feed the model, any class
                raise VariantBuildError(
                    f"GPTQ statistics failed: {first_line(exc)}", target=target
                ) from exc
            log.info("int4_gptq", nodes=len(blocks), seconds=round(clock() - gptq_started, 2))
            if gptq_cache is not None:
                gptq_cache[key] = blocks
        rounding = f"GPTQ over {min(len(calibration), limits.gptq_samples)} calibration samples"
    gptq_s = clock() - gptq_started

    def attempt(keep: tuple[str, ...]) -> bool:
        nonlocal best
        step_started = clock() - (gptq_s if not steps else 0.0)
        path = work / f"int4-{len(keep)}.onnx"
        quantize_onnx_int4(quantized, path, target=target, keep_int8=keep, blocks=blocks)
        try:
            score = gate.run(ort_runner(path, output_names))
        except Exception as exc:  # ORT refusing the file, any type
            raise VariantBuildError(
                f"the quantized file does not run: {first_line(exc)}", target=target
            ) from exc
        action = f"MatMulNBits 4-bit blocks ({rounding})" + (
            f", {len(keep)} costliest MatMul nodes in 8-bit blocks" if keep else ""
        )
        step = QuantStep(
            action=action,
            metric=score.metric,
            value=round(score.value, 4),
            delta=round(score.delta, 4),
            kept_float=len(keep),
            seconds=round(clock() - step_started, 2),
        )
        steps.append(step)
        log.info("int4_step", action=action, metric=step.metric, delta=step.delta)
        passed = gate.passes(score)
        if best is None or passed or score.delta < best[0].delta:
            best = (score, path, keep)
        return passed

    if not attempt(()) and limits.max_steps > 0:
        ranked = work / "int4-0.onnx"
        if base is not None:  # ranked in FP32: the FP16 graph's own rounding is not the nodes'
            ranked = work / "int4-0-fp32.onnx"
            quantize_onnx_int4(fp32_path, ranked, target=target, blocks=blocks)
        matmuls = set(matmul_nodes(fp32_path))
        samples = gate.samples.head(limits.sensitivity_samples)
        ranking = [n for n in rank_onnx_nodes(fp32_path, ranked, samples) if n in matmuls]
        ranking = ranking[: max(1, int(limits.max_int8_share * len(matmuls)))]
        log.info("int4_sensitivity", costliest=ranking[:8], nodes=len(ranking))
        count = 1
        for _ in range(limits.max_steps):
            if clock() > deadline or not ranking:
                break
            if attempt(tuple(ranking[:count])):
                break
            if count >= len(ranking):
                break
            count = min(count * 2, len(ranking))
    assert best is not None
    _score, path, keep = best
    shutil.copyfile(path, out_path)
    recipe = (
        f"MatMulNBits 4-bit asymmetric blocks of {BLOCK_SIZE} ({rounding}), "
        f"accuracy level {ACCURACY_LEVEL}"
    )
    if base is not None:
        recipe += ", over the FP16 graph (FP16 scales and activations)"
    if keep:
        recipe += f", {len(keep)} MatMul nodes in 8-bit blocks"
    return Int8Outcome(recipe=recipe, steps=tuple(steps), kept_float=keep)

"""INT4 weight-only variants: ONNX Runtime ``MatMulNBits`` and OpenVINO IR via NNCF.

Owns which models get INT4 variants (those whose weights are mostly matrix-product and
embedding tables, where weight-only compression pays) and the calls into ONNX Runtime's
``matmul_nbits_quantizer`` and ``nncf.compress_weights``. Activations stay float; only
constant weights are stored in 4 bits, block-wise with one scale per ``BLOCK_SIZE`` values.
Measuring the result against FP32 is the pipeline's gate, as for every other variant.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from agent.logs import get_logger
from control_plane.builds.errors import VariantBuildError, first_line

__all__ = [
    "BLOCK_SIZE",
    "MIN_MATRIX_BYTES",
    "MIN_MATRIX_SHARE",
    "compress_ir_int4",
    "matrix_weights",
    "quantize_onnx_int4",
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


def quantize_onnx_int4(fp32_path: Path, out_path: Path, *, target: str = "onnx-int4") -> None:
    """MatMul weights -> ``MatMulNBits`` and embedding tables -> ``GatherBlockQuantized``,
    4-bit asymmetric blocks of ``BLOCK_SIZE`` (data-free round-to-nearest; on MiniLM the
    zero point is worth about half a point of cosine over symmetric blocks)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantizer = MatMulNBitsQuantizer(
                onnx.load(str(fp32_path)),
                bits=4,
                block_size=BLOCK_SIZE,
                is_symmetric=False,
                op_types_to_quantize=("MatMul", "Gather"),
                quant_axes=(("MatMul", 0), ("Gather", 1)),
            )
            quantizer.process()
            quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    except Exception as exc:  # the quantizer raises anything, asserts included
        raise VariantBuildError(
            f"MatMulNBits quantization failed: {first_line(exc)}", target=target
        ) from exc
    log.info("int4_quantized", tool="onnxruntime", seconds=round(time.monotonic() - started, 2))


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

"""ONNX work of a build: read and check the source, normalize it, derive FP16 and INT8 files.

Owns the ONNX-side decisions: what counts as "already quantized", the opset floor for
quantization, which ONNX Runtime optimizations are portable enough to bake into a file, and
the INT8 recipe (static QDQ, per-channel). OpenVINO files are ``_openvino``'s; measuring is
``_measure``'s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.contracts.tensors import ONNX_ELEM_TO_DATATYPE, TensorSpec
from agent.logs import get_logger
from control_plane.builds._samples import Feeds, SampleSet
from control_plane.builds.errors import BuildInputError, VariantBuildError, first_line

__all__ = [
    "QUANT_OPSET",
    "Int8Recipe",
    "SourceModel",
    "convert_fp16",
    "is_quantized",
    "normalize",
    "quantize_int8",
    "read_source",
]

log = get_logger(__name__)

QUANT_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (``axis``) needs opset 13
_QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "ConvInteger",
        "MatMulInteger",
        "QGemm",
        "QAttention",
    }
)
_STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})


@dataclass(frozen=True)
class SourceModel:
    """The uploaded model, checked: it parses, passes the checker and loads in ONNX Runtime."""

    path: Path
    opset: int
    ir_version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantized: bool


def _tensor_specs(values: Any, skip: set[str]) -> tuple[TensorSpec, ...]:
    specs = []
    for value in values:
        if value.name in skip:
            continue
        tensor = value.type.tensor_type
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
            for d in tensor.shape.dim
        )
        datatype = ONNX_ELEM_TO_DATATYPE.get(tensor.elem_type)
        if datatype is None:
            raise BuildInputError(
                f"tensor {value.name!r} has an unsupported element type {tensor.elem_type}",
                field="onnx",
            )
        specs.append(TensorSpec(name=value.name, datatype=datatype, shape=shape))
    return tuple(specs)


def default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def is_quantized(model: Any) -> bool:
    """QDQ nodes (QAT export, an earlier quantization) or QLinear*/integer ops are present."""
    return any(n.op_type in _QUANT_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def read_source(path: Path) -> SourceModel:
    """Parse, check and load the source; ``BuildInputError`` saying what is wrong."""
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError and others on garbage
        raise BuildInputError(f"not an ONNX model: {first_line(exc)}", field="onnx") from exc
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise BuildInputError("not an ONNX model: no graph in the file", field="onnx")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise BuildInputError(
            f"not an ONNX model: the checker refuses it: {first_line(exc)}", field="onnx"
        ) from exc
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped errors
        raise BuildInputError(
            f"ONNX model does not load in ONNX Runtime: {first_line(exc)}", field="onnx"
        ) from exc
    initializers = {i.name for i in model.graph.initializer}
    return SourceModel(
        path=path,
        opset=default_opset(model),
        ir_version=model.ir_version,
        inputs=_tensor_specs(model.graph.input, initializers),
        outputs=_tensor_specs(model.graph.output, set()),
        quantized=is_quantized(model),
    )


def _strip_unused_domains(model: Any) -> None:
    """ORT writes an opset import for every domain it knows; keep only those nodes use."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


@dataclass(frozen=True)
class Normalized:
    path: Path
    opset_from: int
    opset_to: int
    optimized: bool


def normalize(source: SourceModel, out_path: Path, work_dir: Path) -> Normalized:
    """Opset upgrade to ``QUANT_OPSET`` when lower, then ORT's basic offline optimizations.

    Basic level only: constant folding, redundant-node removal and Conv+BatchNorm/Add/Mul
    folding, all written as standard ONNX ops. The extended level writes ``com.microsoft``
    fused ops (``FusedConv``) that OpenVINO, TensorRT and older runtimes do not read, and it
    is what every ONNX Runtime session applies at load time anyway.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(source.path))
    opset_to = source.opset
    upgraded = work_dir / "upgraded.onnx"
    if source.opset < QUANT_OPSET:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = onnx.version_converter.convert_version(model, QUANT_OPSET)
            onnx.checker.check_model(converted)
            onnx.save(converted, str(upgraded))
            ort.InferenceSession(str(upgraded), providers=["CPUExecutionProvider"])
            opset_to = QUANT_OPSET
            log.info("opset_upgraded", opset_from=source.opset, opset_to=opset_to)
        except Exception as exc:  # the converter raises anything; keep the source
            log.warning("opset_upgrade_failed", opset_from=source.opset, error=first_line(exc))
            onnx.save(model, str(upgraded))
    else:
        onnx.save(model, str(upgraded))

    optimized_raw = work_dir / "optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(optimized_raw)
    optimized = False
    try:
        ort.InferenceSession(str(upgraded), options, providers=["CPUExecutionProvider"])
        result = onnx.load(str(optimized_raw))
        foreign = {n.domain for n in result.graph.node} - _STANDARD_DOMAINS
        foreign -= {n.domain for n in model.graph.node}
        if foreign:
            raise ValueError(f"optimizer wrote ops of domains {sorted(foreign)}")
        _strip_unused_domains(result)
        onnx.checker.check_model(result)
        onnx.save(result, str(out_path))
        optimized = True
        log.info(
            "graph_optimized", nodes_before=len(model.graph.node), nodes=len(result.graph.node)
        )
    except Exception as exc:  # keep the unoptimized graph rather than fail
        log.warning("graph_optimize_failed", error=first_line(exc))
        out_path.write_bytes(upgraded.read_bytes())
    return Normalized(out_path, source.opset, opset_to, optimized)


FP16_MAX = 65504.0


def fp16_model(model: Any) -> Any:
    """An FP16 copy of an ONNX model with FP32 inputs and outputs (``keep_io_types``).

    Constants become initializers first, so the converter can leave the ones outside FP16's
    range in FP32 together with the nodes that read them: PP-OCR's head BatchNormalization has
    a running variance near 1e8, which FP16 would saturate into a blank probability map."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.ModelProto.FromString(model.SerializeToString())  # never edit the caller's
    nodes = []
    for node in model.graph.node:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    big = {
        i.name
        for i in model.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT
        and np.abs(numpy_helper.to_array(i)).max(initial=0) > FP16_MAX
    }
    keep = [n.name for n in model.graph.node if big & set(n.input)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "value truncated to fp16" notices, one per weight
        return convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)


def convert_fp16(fp32_path: Path, out_path: Path) -> None:
    """Write the FP16 variant of ``fp32_path`` (see ``fp16_model``)."""
    import onnx

    try:
        onnx.save(fp16_model(onnx.load(str(fp32_path))), str(out_path))
    except Exception as exc:  # the converter raises anything
        raise VariantBuildError(
            f"FP16 conversion failed: {first_line(exc)}", target="onnx-fp16"
        ) from exc


@dataclass(frozen=True)
class Int8Recipe:
    """ONNX Runtime static quantization settings; the defaults are what the build uses.

    U8 activations with S8 per-channel weights is the combination ONNX Runtime's x86 kernels
    run fastest (VNNI ``vpdpbusd`` multiplies u8 by s8); on AVX2 without VNNI, ``reduce_range``
    avoids int16 saturation at a small accuracy cost, so it stays off for VNNI/dot-product
    targets, which are what INT8 variants are meant for.
    """

    quant_format: str = "QDQ"  # or "QOperator"
    per_channel: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    reduce_range: bool = False
    calibrate_method: str = "MinMax"
    max_samples: int = 300
    chunk: int = 16  # samples per calibration run when the batch axis is dynamic


def _reader(feeds: Iterator[Feeds]) -> Any:
    """An ORT ``CalibrationDataReader`` handing out ``feeds`` one run at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def get_next(self) -> Feeds | None:
            return next(feeds, None)

    return _Reader()


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: SampleSet,
    *,
    batch: bool,
    recipe: Int8Recipe | None = None,
    target: str = "onnx-int8",
) -> None:
    """Static INT8 quantization of ``fp32_path`` calibrated on ``calibration``."""
    from onnxruntime import quantization as q

    recipe = recipe or Int8Recipe()
    samples = calibration.head(recipe.max_samples)
    reader = _reader(samples.chunks(recipe.chunk if batch else 1))
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q.quantize_static(
                str(fp32_path),
                str(out_path),
                reader,
                quant_format=getattr(q.QuantFormat, recipe.quant_format),
                per_channel=recipe.per_channel,
                reduce_range=recipe.reduce_range,
                activation_type=getattr(q.QuantType, recipe.activation_type),
                weight_type=getattr(q.QuantType, recipe.weight_type),
                calibrate_method=getattr(q.CalibrationMethod, recipe.calibrate_method),
            )
    except Exception as exc:  # the quantizer raises anything
        raise VariantBuildError(
            f"INT8 quantization failed: {first_line(exc)}", target=target
        ) from exc
    log.info(
        "int8_quantized",
        samples=len(samples),
        seconds=round(time.monotonic() - started, 2),
        recipe=recipe.quant_format,
    )

"""What a built file holds: weight bytes and the precision each compute operation runs in.

Owns reading ONNX and OpenVINO IR files for the variant's build report (``BuildReport``):
which compute operations (convolutions, matrix products) read INT8 data, which kept FP16
weights and which stayed FP32. Building and measuring are other modules'.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Census", "onnx_census", "openvino_census", "openvino_quantized_ops"]

ONNX_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
OPENVINO_COMPUTE_OPS = frozenset(
    {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul"}
)
# operations a quantized input passes through on its way from FakeQuantize / int8 weights
_OPENVINO_PASS_THROUGH = frozenset(
    {"Convert", "Reshape", "Subtract", "Multiply", "Transpose", "Unsqueeze", "Squeeze"}
)
_OPENVINO_INT_TYPES = frozenset({"i8", "u8"})
_OPENVINO_INT4_TYPES = frozenset({"i4", "u4", "nf4"})
_ONNX_INT4_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})  # weight-only, 4 bits


@dataclass(frozen=True)
class Census:
    weight_bytes: int
    precisions: dict[str, int]  # compute ops per precision: {"int8": 52, "fp32": 3}
    float_ops: tuple[str, ...]  # names of compute ops not in INT8 or INT4


def onnx_census(path: Path) -> Census:
    """Weight bytes (initializers) and compute-op precisions of an ONNX file.

    A compute op is ``int4`` when it is a 4-bit weight-only op (``MatMulNBits``,
    ``GatherBlockQuantized``; ``int8`` with ``bits=8``), ``int8`` when its weight input comes
    from ``DequantizeLinear`` (QDQ) or it is an integer op itself, ``fp16`` when its weight
    initializer is FP16, else ``fp32``.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    weight_bytes = 0
    init_types = {}
    for init in graph.initializer:
        init_types[init.name] = init.data_type
        size = 1
        for dim in init.dims:
            size *= dim
        weight_bytes += _onnx_bytes(init.data_type, size)
    # the element type of every tensor where ONNX's shape inference can say (an activation
    # into a MatMul between two activations, attention's, is FP16 in an FP16 graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        value_types = {
            v.name: v.type.tensor_type.elem_type
            for v in (*inferred.value_info, *inferred.input, *inferred.output)
        }
    except Exception:  # an op it cannot infer through: the initializers alone decide
        value_types = {}
    producers = {out: node for node in graph.node for out in node.output}
    counts: Counter[str] = Counter()
    float_ops = []
    for node in graph.node:
        if node.op_type in _ONNX_INT4_OPS:
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            counts["int8" if bits == 8 else "int4"] += 1
            continue
        if node.op_type.startswith("QLinear") or node.op_type in ("ConvInteger", "MatMulInteger"):
            counts["int8"] += 1
            continue
        if node.op_type not in ONNX_COMPUTE_OPS:
            continue
        sources = [producers.get(i) for i in node.input]
        # the weight input decides: an excluded node still reads a shared quantized activation
        weight = sources[1] if len(sources) > 1 else None
        if weight is not None and weight.op_type == "DequantizeLinear":
            counts["int8"] += 1
            continue
        weight_type = next((init_types[i] for i in node.input[1:2] if i in init_types), None)
        fed_by_cast = any(s is not None and s.op_type == "Cast" for s in sources[1:2])
        half = onnx.TensorProto.FLOAT16
        fp16 = weight_type == half or (
            weight_type is None
            and (value_types.get(node.input[0]) == half or (fed_by_cast and _fp16_graph(graph)))
        )
        counts["fp16" if fp16 else "fp32"] += 1
        float_ops.append(node.name or node.output[0])
    return Census(weight_bytes, dict(sorted(counts.items())), tuple(float_ops))


def _fp16_graph(graph: Any) -> bool:
    import onnx

    return any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)


def _onnx_bytes(data_type: int, count: int) -> int:
    """What ``count`` elements of ``data_type`` take stored: 4-bit types pack two a byte
    (an embedding table in ``GatherBlockQuantized``'s INT4), which NumPy holds one a byte."""
    import onnx

    if data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return 0
    if onnx.TensorProto.DataType.Name(data_type) in ("INT4", "UINT4", "FLOAT4E2M1"):
        return (count + 1) // 2
    return count * int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)


def _openvino_input_kind(output: Any, depth: int = 0) -> str:
    """``int8`` if the value comes from FakeQuantize or 8-bit weights, ``int4`` from 4-bit
    weights, else ``fp16``/``fp32``."""
    node = output.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return "int8"
    if kind == "Constant":
        element = node.get_element_type().get_type_name()
        if element in _OPENVINO_INT_TYPES:
            return "int8"
        if element in _OPENVINO_INT4_TYPES:
            return "int4"
        return "fp16" if element == "f16" else "fp32"
    if kind in _OPENVINO_PASS_THROUGH and depth < 6:
        kinds = {_openvino_input_kind(i.get_source_output(), depth + 1) for i in node.inputs()}
        for precision in ("int4", "int8", "fp16"):
            if precision in kinds:
                return precision
    return "fp32"


def _openvino_model(model: Path | Any) -> Any:
    if isinstance(model, Path):
        import openvino as ov

        return ov.Core().read_model(str(model))
    return model


def openvino_census(model: Path | Any) -> Census:
    """Weight bytes (``.bin`` size, or constants in memory) and compute-op precisions of an IR.

    A compute op is ``int8`` when an input comes from FakeQuantize or 8-bit weights, ``int4``
    from 4-bit weights, ``fp16`` when its weights are FP16 constants, else ``fp32``.
    """
    ov_model = _openvino_model(model)
    counts: Counter[str] = Counter()
    float_ops = []
    weight_bytes = 0
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant":
            weight_bytes += int(op.get_byte_size())
            continue
        if kind not in OPENVINO_COMPUTE_OPS:
            continue
        kinds = [_openvino_input_kind(i.get_source_output()) for i in op.inputs()]
        precision = next((p for p in ("int4", "int8", "fp16") if p in kinds), "fp32")
        counts[precision] += 1
        if precision not in ("int8", "int4"):
            float_ops.append(op.get_friendly_name())
    if isinstance(model, Path) and model.with_suffix(".bin").exists():
        weight_bytes = model.with_suffix(".bin").stat().st_size
    return Census(weight_bytes, dict(sorted(counts.items())), tuple(float_ops))


def openvino_quantized_ops(model: Any) -> set[str]:
    """Names of every operation (any type) that reads a FakeQuantize output."""
    names = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() in ("FakeQuantize", "Constant", "Convert", "Parameter", "Result"):
            continue
        for value in op.inputs():
            source = value.get_source_output().get_node()
            if source.get_type_name() == "Convert":
                source = source.input_value(0).get_node()
            if source.get_type_name() == "FakeQuantize":
                names.add(op.get_friendly_name())
                break
    return names

"""ONNX work of a build: read and check the source, normalize it, derive FP16 and INT8 files.

Owns the ONNX-side decisions: what counts as "already quantized", the opset floor for
quantization, which ONNX Runtime optimizations are portable enough to bake into a file, and
the INT8 recipe (static QDQ, per-channel). OpenVINO files are ``_openvino``'s; measuring is
``_measure``'s.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from agent.contracts.accuracy import TASKS, Task
from agent.contracts.tensors import ONNX_ELEM_TO_DATATYPE, TensorSpec
from agent.logs import get_logger
from control_plane.builds._samples import Feeds, SampleSet
from control_plane.builds.errors import BuildInputError, VariantBuildError, first_line

__all__ = [
    "MAX_CONSTANT_BYTES",
    "QUANT_OPSET",
    "Int8Recipe",
    "SourceModel",
    "check_classifier_output",
    "convert_fp16",
    "is_quantized",
    "normalize",
    "quantize_int8",
    "read_source",
]

log = get_logger(__name__)

TASK_METADATA_KEY = "task"  # ONNX metadata_props entry a model may declare its task in
MAX_SHAPE_METADATA_KEY = "max_shape"  # ... and the largest shape each input takes
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
MAX_CONSTANT_BYTES = 1024**3  # bytes: tensors a model may make from constants when it loads
# Nodes whose output size follows from their constant inputs: ONNX Runtime folds them at load.
_SHAPE_MAKERS = frozenset({"ConstantOfShape", "Expand", "Tile", "Range"})
_WIDEST_ELEMENT = 8  # bytes: sized conservatively when the element type is not at hand


@dataclass(frozen=True)
class SourceModel:
    """The uploaded model, checked: it parses, passes the checker and loads in ONNX Runtime."""

    path: Path
    opset: int
    ir_version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    quantized: bool
    task: Task | None = None  # declared in the file's metadata (``task``), if at all


def index_ranges(graph: Any) -> dict[str, tuple[int, int]]:
    """The graph's integer inputs that index a constant table of its own (``Gather`` on an
    initializer: token ids into an embedding), each with the rows it may name: ``(0, rows - 1)``
    of its smallest such table. Negative indices, which ``Gather`` would count from the end, are
    left out: no tokenizer or lookup makes them, and one that arrives is a client's mistake."""
    from onnx import TensorProto

    tables = {i.name: tuple(i.dims) for i in graph.initializer}
    rows: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in tables:
            continue
        dims = tables[node.input[0]]
        if not dims:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(dims)
        name = node.input[1]
        rows[name] = min(rows.get(name, dims[axis]), dims[axis])
    integer = {TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64}
    integer |= {TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64}
    return {
        value.name: (0, rows[value.name] - 1)
        for value in graph.input
        if value.name in rows
        and rows[value.name] > 0
        and value.type.tensor_type.elem_type in integer
    }


def declared_max_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The largest shape each input takes, as the model declares it in its metadata
    (``metadata_props`` key ``max_shape``: a JSON object of input name -> one bound per
    dimension, ``-1`` for none, e.g. ``{"input_ids": [-1, 512]}``); ``BuildInputError`` when
    the declaration does not fit the inputs."""
    text = {p.key: p.value for p in model.metadata_props}.get(MAX_SHAPE_METADATA_KEY)
    if text is None:
        return {}
    try:
        declared = json.loads(text)
        if not isinstance(declared, dict) or not all(
            isinstance(v, list) and all(type(d) is int for d in v) for v in declared.values()
        ):
            raise ValueError("not an object of integer lists")
    except ValueError as exc:
        raise BuildInputError(
            f"the model's {MAX_SHAPE_METADATA_KEY!r} metadata is not a JSON object of input "
            f'name -> one bound per dimension (-1 for none), e.g. {{"input_ids": [-1, 512]}}: '
            f"{first_line(exc)}",
            field="onnx",
        ) from exc
    inputs = {i.name for i in model.graph.input}
    unknown = sorted(set(declared) - inputs)
    if unknown:
        raise BuildInputError(
            f"the model's {MAX_SHAPE_METADATA_KEY!r} metadata names no input {unknown}; its "
            f"inputs: {sorted(inputs)}",
            field="onnx",
        )
    return {name: tuple(dims) for name, dims in declared.items()}


def _tensor_specs(
    values: Any,
    skip: set[str],
    ranges: dict[str, tuple[int, int]] | None = None,
    max_shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[TensorSpec, ...]:
    ranges = ranges or {}
    max_shapes = max_shapes or {}
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
        try:
            spec = TensorSpec(
                name=value.name,
                datatype=datatype,
                shape=shape,
                value_range=ranges.get(value.name),
                max_shape=max_shapes.get(value.name),
            )
        except pydantic.ValidationError as exc:  # a declared bound that misfits the input
            why = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
            raise BuildInputError(
                f"the model's {MAX_SHAPE_METADATA_KEY!r} metadata: {why}", field="onnx"
            ) from exc
        specs.append(spec)
    return tuple(specs)


def default_opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def is_quantized(model: Any) -> bool:
    """QDQ nodes (QAT export, an earlier quantization) or QLinear*/integer ops are present."""
    return any(n.op_type in _QUANT_OPS or n.op_type.startswith("QLinear") for n in model.graph.node)


def _graphs(graph: Any) -> Iterator[Any]:
    """A graph and every subgraph in its nodes' attributes (If, Loop, Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _count(dims: Any) -> int:
    count = 1
    for dim in dims:
        count *= max(int(dim), 0)  # Python ints: no overflow
    return count


def _stored_elements(tensor: Any) -> int | None:
    """How many elements a TensorProto holds in the file; None for raw bytes."""
    for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        values = getattr(tensor, name)
        if len(values):
            return len(values)
    if len(tensor.string_data):
        return len(tensor.string_data)
    return None if tensor.raw_data else 0


def _check_tensor(tensor: Any, where: str) -> None:
    """A stored tensor declares no more than the file holds, and holds no external data."""
    from onnx import TensorProto, helper

    if tensor.data_location == TensorProto.EXTERNAL or len(tensor.external_data):
        raise BuildInputError(f"{where}: external tensor data is not accepted", field="onnx")
    declared = _count(tensor.dims)
    stored = _stored_elements(tensor)
    if stored is None:
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 1
        stored = len(tensor.raw_data) // max(itemsize, 1)
    if declared > stored:
        raise BuildInputError(
            f"{where}: declares {declared} elements but holds {stored}", field="onnx"
        )


def _constant_values(graph: Any) -> dict[str, list[int]]:
    """Integer constants of a graph (initializers, Constant nodes), by output name."""
    from onnx import numpy_helper

    found: dict[str, list[int]] = {}
    tensors = [(t.name, t) for t in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    tensors.append((node.output[0], attr.t))
                elif attr.name == "value_ints":
                    found[node.output[0]] = [int(v) for v in attr.ints]
                elif attr.name == "value_int":
                    found[node.output[0]] = [int(attr.i)]
    for name, tensor in tensors:
        if _count(tensor.dims) <= 64:  # shapes and scalars; large tensors decide nothing here
            try:
                array = numpy_helper.to_array(tensor)
            except Exception:  # noqa: S112 - an undecodable constant is the checker's to refuse
                continue
            if array.dtype.kind in "iuf":
                found[name] = [int(v) for v in array.ravel()]
    return found


def check_constant_sizes(model: Any, max_bytes: int) -> None:
    """Refuse a model whose stored tensors claim more than they hold, or whose constant-driven
    nodes (``ConstantOfShape``, ``Expand``, ``Tile``, ``Range`` on constant inputs) or sparse
    constants would make more than ``max_bytes`` when ONNX Runtime folds them at load."""
    made = 0
    for graph in _graphs(model.graph):
        for tensor in graph.initializer:
            _check_tensor(tensor, f"initializer {tensor.name!r}")
        for sparse in graph.sparse_initializer:
            made += _count(sparse.dims) * _WIDEST_ELEMENT
        constants = _constant_values(graph)
        for node in graph.node:
            size = 0
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.HasField("t"):
                        _check_tensor(attr.t, f"node {node.name!r}")
                    if attr.HasField("sparse_tensor"):
                        size += _count(attr.sparse_tensor.dims) * _WIDEST_ELEMENT
            elif node.op_type in _SHAPE_MAKERS:
                size = _made_bytes(node, constants)
            made += size
            if made > max_bytes:
                raise BuildInputError(
                    f"node {node.name or node.op_type!r} ({node.op_type}) makes tensors of more"
                    f" than the limit of {max_bytes} bytes from constants",
                    field="onnx",
                )
    if made > max_bytes:
        raise BuildInputError(
            f"sparse constants unpack to more than the limit of {max_bytes} bytes", field="onnx"
        )


def _made_bytes(node: Any, constants: dict[str, list[int]]) -> int:
    """Bytes a shape-making node outputs when its deciding inputs are constants (else 0: it is
    sized at run time, by real inputs)."""
    inputs = list(node.input)
    if node.op_type in ("ConstantOfShape", "Expand"):
        shape = constants.get(inputs[-1]) if inputs else None
        return _count(shape) * _WIDEST_ELEMENT if shape is not None else 0
    if node.op_type == "Tile" and len(inputs) == 2:
        data, repeats = constants.get(inputs[0]), constants.get(inputs[1])
        if repeats is None:
            return 0
        return max(len(data or ()), 1) * _count(repeats) * _WIDEST_ELEMENT
    if node.op_type == "Range" and len(inputs) == 3:
        values = [constants.get(i) for i in inputs]
        if any(v is None or len(v) != 1 for v in values):
            return 0
        (start,), (limit,), (delta,) = values  # type: ignore[misc]
        if delta == 0:
            return 0
        return max(-(-(limit - start) // delta), 0) * _WIDEST_ELEMENT
    return 0


def read_source(path: Path, *, max_constant_bytes: int = MAX_CONSTANT_BYTES) -> SourceModel:
    """Parse, check, size and load the source; ``BuildInputError`` saying what is wrong. The
    size check (``check_constant_sizes``) comes before ONNX Runtime allocates anything."""
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others on garbage
        raise BuildInputError(f"not an ONNX model: {first_line(exc)}", field="onnx") from exc
    if model.ir_version <= 0 or not model.graph.node or not model.graph.output:
        raise BuildInputError("not an ONNX model: no graph in the file", field="onnx")
    check_constant_sizes(model, max_constant_bytes)
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
    _check_tensor_outputs(model)
    initializers = {i.name for i in model.graph.initializer}
    declared = {p.key: p.value for p in model.metadata_props}.get(TASK_METADATA_KEY)
    if declared is not None and declared not in TASKS:
        raise BuildInputError(
            f"the model declares task {declared!r} in its metadata; known tasks: {list(TASKS)}",
            field="onnx",
        )
    return SourceModel(
        path=path,
        opset=default_opset(model),
        ir_version=model.ir_version,
        inputs=_tensor_specs(
            model.graph.input,
            initializers,
            index_ranges(model.graph),
            declared_max_shapes(model),
        ),
        outputs=_tensor_specs(model.graph.output, set()),
        quantized=is_quantized(model),
        task=declared,  # type: ignore[arg-type]  # checked against TASKS above
    )


ZIPMAP_FIX = "export with zipmap=False (options={id(model): {'zipmap': False}})"
SCORES_FIRST_FIX = (
    "put the score output first: with skl2onnx, export with zipmap=False "
    "(options={id(model): {'zipmap': False}}) and drop the label output before saving: "
    "del onx.graph.output[0]"
)


def _check_tensor_outputs(model: Any) -> None:
    """Every output must be a tensor; a ZipMap (skl2onnx's default classifier output, a
    sequence of maps) is refused with the export option that avoids it."""
    for value in model.graph.output:
        if value.type.HasField("tensor_type"):
            continue
        kind = value.type.WhichOneof("value") or "untyped value"
        if any(n.op_type == "ZipMap" for n in model.graph.node):
            raise BuildInputError(
                f"output {value.name!r} is a ZipMap (a sequence of maps), not a tensor: "
                + ZIPMAP_FIX,
                field="onnx",
            )
        raise BuildInputError(
            f"output {value.name!r} is a {kind.removesuffix('_type')}, not a tensor: "
            "export the model with tensor outputs only",
            field="onnx",
        )


def check_classifier_output(source: SourceModel, *, task: str | None, labelled: bool) -> None:
    """What the build's task choice refuses, decided from the declared output (before a
    version is recorded): labels or task ``classification`` need a first output of one float
    score vector per sample. Unknown (symbolic) sizes pass; the build checks them on data."""
    task = task or source.task
    if not labelled and task != "classification":
        return
    first = source.outputs[0]
    if labelled and task not in (None, "classification"):
        raise BuildInputError(
            f"labels were given for task {task}: labels are for classifiers only "
            "(drop them, or upload with task classification)",
            field="validation",
        )
    per_sample = [d for d in first.shape[1:] if d != 1]
    is_float = first.datatype in ("FP16", "FP32", "FP64", "BF16")
    shape_ok = not first.shape or (len(per_sample) == 1 and per_sample[0] != 0)
    if is_float and shape_ok:
        return
    why = "labels were given" if labelled else "task classification"
    shape = "x".join("N" if d < 0 else str(d) for d in first.shape)
    raise BuildInputError(
        f"{why}, but the first output {first.name!r} ({first.datatype} {shape}) is not one "
        f"score vector per sample: {SCORES_FIRST_FIX}",
        field="validation" if labelled else "task",
    )


def _strip_unused_domains(model: Any) -> None:
    """ORT writes an opset import for every domain it knows; keep only those nodes use."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _name_nodes(model: Any) -> None:
    """Give every unnamed node a unique name: quantizers exclude nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


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
        _name_nodes(result)
        onnx.checker.check_model(result)
        onnx.save(result, str(out_path))
        optimized = True
        log.info(
            "graph_optimized", nodes_before=len(model.graph.node), nodes=len(result.graph.node)
        )
    except Exception as exc:  # keep the unoptimized graph rather than fail
        log.warning("graph_optimize_failed", error=first_line(exc))
        fallback = onnx.load(str(upgraded))
        _name_nodes(fallback)
        onnx.save(fallback, str(out_path))
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


@functools.cache
def host_int8_saturates() -> bool:
    """Whether ONNX Runtime's u8 x s8 kernels saturate on this build host: an x86 CPU with AVX2
    but no integer dot products (VNNI, AMX), where ``vpmaddubsw`` sums pairs in int16."""
    from agent.contracts.fit import INT8_DOT_FLAGS

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    # The first processor's ``flags`` line (x86; ARM lists ``Features`` and never saturates).
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.partition(":")[2].split())
    return "avx2" in flags and not flags & INT8_DOT_FLAGS


@dataclass(frozen=True)
class Int8Recipe:
    """ONNX Runtime static quantization settings; the defaults are what the build uses.

    U8 activations with S8 per-channel weights is the combination ONNX Runtime's x86 kernels
    run fastest (VNNI ``vpdpbusd`` multiplies u8 by s8). On AVX2 without VNNI those kernels
    saturate in int16: the digits CNN's logits came out 17% off (relative L2) against 1% with
    ``reduce_range`` (7-bit weights). The gate runs the variant on the build host, so a host
    without integer dot products builds with ``reduce_range`` (a model it can vouch for, that
    VNNI targets run at a small accuracy cost); a host with them builds without.
    """

    quant_format: str = "QDQ"  # or "QOperator"
    per_channel: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    reduce_range: bool = field(default_factory=host_int8_saturates)
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
    nodes_to_exclude: Sequence[str] = (),
    calibration_cache: Path | None = None,
) -> None:
    """Static INT8 quantization of ``fp32_path`` calibrated on ``calibration``.

    ``nodes_to_exclude`` stay in float. ``calibration_cache`` (a JSON file; ONNX Runtime
    1.24+) keeps the calibrated ranges: a later call with the same file and recipe skips
    calibration, so the sensitivity pass re-quantizes in seconds.
    """
    from onnxruntime import quantization as q

    recipe = recipe or Int8Recipe()
    samples = calibration.head(recipe.max_samples)
    reader = _reader(samples.chunks(recipe.chunk if batch else 1))
    extra: dict[str, Any] = {}
    if calibration_cache is not None and _supports_calibration_cache():
        extra["calibration_cache_path"] = str(calibration_cache)
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
                nodes_to_exclude=list(nodes_to_exclude),
                **extra,
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
        calibration=recipe.calibrate_method,
        excluded=len(nodes_to_exclude),
    )


def _supports_calibration_cache() -> bool:
    from onnxruntime import quantization as q

    return "calibration_cache_path" in inspect.signature(q.quantize_static).parameters

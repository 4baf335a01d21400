"""Wire formats of the Open Inference Protocol, without any I/O: bytes in, arrays out.

Owns the JSON request/response bodies of the HTTP binding, the binary tensor data extension
(``Inference-Header-Content-Length``, ``binary_data_size``, ``binary_data`` /
``binary_data_output``), and the raw tensor encoding shared with gRPC (row-major little-endian;
BYTES elements each preceded by a 4-byte little-endian length). Checking a request against a
model's tensors is left to ``agent.api.service``; transports are in ``http_server`` and
``grpc_server``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from agent.contracts.tensors import DTYPES
from agent.errors import InputError

__all__ = [
    "InferRequest",
    "InferResponse",
    "InferenceRequestBody",
    "RequestError",
    "RequestedOutput",
    "decode_http_request",
    "decode_json_tensor",
    "decode_raw_tensor",
    "encode_http_response",
    "encode_raw_tensor",
    "is_bytes_array",
    "shape_size",
]

Array = np.ndarray[Any, Any]
_LEN = struct.Struct("<I")
MAX_RANK = 16  # dimensions of one tensor
# Elements one tensor may span, zero dimensions counted as one: far above what a bounded body can
# carry, and low enough that no shape within it overflows numpy's index type (a ``[0, 2**63]``
# holds no element but cannot be made into an array).
MAX_ELEMENTS = 2**31 - 1


class RequestError(InputError):
    """A request the protocol rejects, with the HTTP status that says why (400, 401, 404, 413)."""

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        self.status_code = status_code
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    """One decoded inference request, transport-independent."""

    model: str
    version: str | None
    inputs: dict[str, Array]
    outputs: tuple[RequestedOutput, ...] | None = None  # None: every output of the model
    binary_outputs: bool = False  # the default for outputs not named in ``outputs``
    id: str | None = None


@dataclass(slots=True)
class InferResponse:
    model: str
    version: str
    outputs: dict[str, Array]
    binary: dict[str, bool] = field(default_factory=dict)
    id: str | None = None
    variant: str | None = None  # the variant that computed the outputs (response parameter)


class _TensorBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    datatype: str
    shape: list[int] = Field(max_length=16)
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class _OutputBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequestBody(BaseModel):
    """The JSON part of an HTTP inference request."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_TensorBody]
    outputs: list[_OutputBody] | None = None


def shape_size(name: str, shape: Sequence[int]) -> int:
    """The element count of a requested shape, after checking it can be an array at all: rank,
    no negative dimension, and at most ``MAX_ELEMENTS`` spanned (zeros counted as one)."""
    if len(shape) > MAX_RANK:
        raise RequestError(f"input {name!r}: {len(shape)} dimensions; at most {MAX_RANK}")
    span = 1
    for dim in shape:
        if dim < 0:
            raise RequestError(f"input {name!r}: shape {_brief(shape)} has a negative dimension")
        span *= max(dim, 1)
        if span > MAX_ELEMENTS:
            raise RequestError(
                f"input {name!r}: shape {_brief(shape)} spans more than {MAX_ELEMENTS} elements"
            )
    return math.prod(shape)


def _brief(shape: Sequence[int]) -> str:
    text = str(list(shape))
    return text if len(text) <= 120 else text[:117] + "..."


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise RequestError(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of {sorted(DTYPES)}"
        ) from None


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def decode_json_tensor(name: str, datatype: str, shape: Sequence[int], data: Any) -> Array:
    """A tensor given as JSON ``data`` (flat or nested, row-major)."""
    dtype = _dtype(name, datatype)
    count = shape_size(name, shape)
    if data is None:
        raise RequestError(f"input {name!r}: no 'data' and no 'binary_data_size'")
    flat = _flatten(data)
    if len(flat) != count:
        raise RequestError(
            f"input {name!r}: {len(flat)} elements where shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                arr[i] = item.encode("utf-8", "surrogatepass")
            else:
                raise RequestError(f"input {name!r}: BYTES elements must be strings in JSON")
        return arr.reshape(tuple(shape))
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in flat):
            raise RequestError(f"input {name!r}: BOOL elements must be true or false")
    elif not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in flat):
        raise RequestError(f"input {name!r}: {datatype} elements must be numbers")
    elif datatype not in ("FP16", "FP32", "FP64") and not all(isinstance(x, int) for x in flat):
        raise RequestError(f"input {name!r}: {datatype} elements must be integers")
    try:
        return np.asarray(flat, dtype=dtype).reshape(tuple(shape))
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"input {name!r}: data does not fit {datatype}: {exc}") from exc


def decode_raw_tensor(
    name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview
) -> Array:
    """A tensor given as raw bytes (binary extension, gRPC ``raw_input_contents``)."""
    dtype = _dtype(name, datatype)
    count = shape_size(name, shape)
    if datatype == "BYTES":
        items: list[bytes] = []
        view = memoryview(raw)
        pos = 0
        while pos < len(view):
            if pos + 4 > len(view):
                raise RequestError(f"input {name!r}: BYTES element length prefix is truncated")
            (size,) = _LEN.unpack_from(view, pos)
            pos += 4
            if pos + size > len(view):
                raise RequestError(f"input {name!r}: BYTES element overruns the tensor data")
            items.append(bytes(view[pos : pos + size]))
            pos += size
        if len(items) != count:
            raise RequestError(
                f"input {name!r}: {len(items)} BYTES elements where shape {list(shape)} "
                f"needs {count}"
            )
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(tuple(shape))
    want = count * dtype.itemsize
    if len(raw) != want:
        raise RequestError(
            f"input {name!r}: {len(raw)} bytes of data where {datatype} shape {list(shape)} "
            f"needs {want}"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).reshape(tuple(shape))


def is_bytes_array(array: Array) -> bool:
    """Whether ``array`` holds BYTES elements (object arrays, or numpy str/bytes arrays)."""
    return array.dtype == object or array.dtype.kind in "US"


def encode_raw_tensor(array: Array) -> bytes:
    """The raw encoding of an output (little-endian; BYTES length-prefixed)."""
    if is_bytes_array(array):
        parts: list[bytes] = []
        for item in array.ravel():
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def _parse_header_length(value: str | None, body_len: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise RequestError(f"Inference-Header-Content-Length {value!r} is not an integer") from None
    if length < 0 or length > body_len:
        raise RequestError(
            f"Inference-Header-Content-Length {length} does not fit a {body_len}-byte body"
        )
    return length


def _flag(params: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(f"parameter {key!r} must be true or false")
    return value


def decode_http_request(
    model: str, version: str | None, body: bytes, header_length: str | None
) -> InferRequest:
    """Decode an HTTP inference body (JSON, or JSON header + binary tensor data)."""
    json_len = _parse_header_length(header_length, len(body))
    head = body if json_len is None else body[:json_len]
    try:
        parsed = InferenceRequestBody.model_validate_json(head)
    except PydanticValidationError as exc:
        raise RequestError(f"malformed inference request: {_first_problem(exc)}") from None
    if "classification" in parsed.parameters:
        raise RequestError("the classification extension is not supported")
    inputs: dict[str, Array] = {}
    view = memoryview(body)  # tensors are read in place, not copied out of the body
    offset = 0 if json_len is None else json_len
    for tensor in parsed.inputs:
        if tensor.name in inputs:
            raise RequestError(f"input {tensor.name!r} given twice")
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if json_len is None:
                raise RequestError(
                    f"input {tensor.name!r} has binary_data_size but the request has no "
                    "Inference-Header-Content-Length header"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(f"input {tensor.name!r}: binary_data_size must be an integer")
            if tensor.data is not None:
                raise RequestError(f"input {tensor.name!r} has both data and binary_data_size")
            if offset + size > len(body):
                raise RequestError(
                    f"input {tensor.name!r}: binary_data_size {size} runs past the end of "
                    f"the body ({len(body) - offset} bytes left)"
                )
            inputs[tensor.name] = decode_raw_tensor(
                tensor.name, tensor.datatype, tensor.shape, view[offset : offset + size]
            )
            offset += size
        else:
            inputs[tensor.name] = decode_json_tensor(
                tensor.name, tensor.datatype, tensor.shape, tensor.data
            )
    if json_len is not None and offset != len(body):
        raise RequestError(
            f"the body has {len(body) - json_len} bytes of binary data but the inputs' "
            f"binary_data_size add up to {offset - json_len}"
        )
    binary_default = _flag(parsed.parameters, "binary_data_output")
    outputs: tuple[RequestedOutput, ...] | None = None
    if parsed.outputs is not None:
        seen: set[str] = set()
        wanted: list[RequestedOutput] = []
        for out in parsed.outputs:
            if out.name in seen:
                raise RequestError(f"output {out.name!r} requested twice")
            if "classification" in out.parameters:
                raise RequestError("the classification extension is not supported")
            seen.add(out.name)
            wanted.append(
                RequestedOutput(out.name, _flag(out.parameters, "binary_data", binary_default))
            )
        outputs = tuple(wanted)
    return InferRequest(
        model=model,
        version=version,
        inputs=inputs,
        outputs=outputs,
        binary_outputs=binary_default,
        id=parsed.id,
    )


def _first_problem(exc: PydanticValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def _json_data(name: str, array: Array) -> list[Any]:
    if is_bytes_array(array):
        try:
            return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.ravel()]
        except UnicodeDecodeError:
            raise RequestError(
                f"output {name!r} holds bytes that are not UTF-8; request it with binary_data"
            ) from None
    data: list[Any] = array.ravel().tolist()
    return data


def encode_http_response(response: InferResponse) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in response.outputs.items():
        datatype = "BYTES" if is_bytes_array(array) else _datatype(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if response.binary.get(name, False):
            blob = encode_raw_tensor(array)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            entry["data"] = _json_data(name, array)
        outputs.append(entry)
    doc: dict[str, Any] = {
        "model_name": response.model,
        "model_version": response.version,
        "outputs": outputs,
    }
    if response.id:
        doc["id"] = response.id
    if response.variant:
        doc["parameters"] = {"variant": response.variant}
    head = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def _datatype(array: Array) -> str:
    for name, dtype in DTYPES.items():
        if dtype == array.dtype.newbyteorder("="):
            return name
    raise InputError(f"output dtype {array.dtype} has no protocol datatype")

"""Tensor specs and the datatype names of the Open Inference Protocol (KServe v2).

Owns the mapping between protocol datatypes, numpy dtypes and ONNX element types; the shape
convention is ONNX's: ``-1`` for a dynamic dimension.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

__all__ = [
    "DTYPES",
    "ONNX_ELEM_TO_DATATYPE",
    "Datatype",
    "TensorSpec",
    "check_feed",
    "datatype_of",
    "loaded",
    "numpy_dtype",
    "storable",
]

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

# Protocol datatype -> numpy dtype (BYTES travels as object arrays of bytes).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_BY_NUMPY: dict[np.dtype[Any], Datatype] = {v: k for k, v in DTYPES.items()}  # type: ignore[misc]

# onnx.TensorProto element type numbers, so the contract needs no onnx import.
ONNX_ELEM_TO_DATATYPE: dict[int, Datatype] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a protocol datatype; ``KeyError`` for an unknown name."""
    return DTYPES[datatype]


def datatype_of(dtype: np.dtype[Any]) -> Datatype:
    """The protocol datatype of a numpy dtype; ``KeyError`` if it has none."""
    return _BY_NUMPY[np.dtype(dtype)]


class TensorSpec(BaseModel):
    """A named input or output: protocol datatype and shape (``-1`` = dynamic).

    ``value_range`` (inclusive) bounds the values of an integer input where the model says what
    it takes: an index into a table of its own (token ids into an embedding of 30522 rows:
    ``(0, 30521)``). Runtimes disagree on an index outside its table (ONNX Runtime refuses it,
    OpenVINO answers from whatever it reads), so the bound is checked before either runs.
    ``max_shape`` bounds dynamic dimensions the model cannot exceed (``-1``: no bound), such as
    a transformer's sequence, which its table of positions caps (MiniLM: 512): past it the
    runtimes fail inside the graph. Both are left out of the JSON when unset: manifests without
    them read as before, and agents that predate them ignore them (this model ignores unknown
    fields)."""

    model_config = ConfigDict(frozen=True)

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    value_range: tuple[int, int] | None = None
    max_shape: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _bounds_fit(self) -> TensorSpec:
        if self.value_range is not None and self.value_range[0] > self.value_range[1]:
            raise ValueError(f"{self.name}: value_range {list(self.value_range)} is empty")
        if self.max_shape is not None and not _bounds_shape(self.shape, self.max_shape):
            raise ValueError(
                f"{self.name}: max_shape {list(self.max_shape)} does not fit shape "
                f"{list(self.shape)} (one bound per dimension, -1 for none)"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unset_bounds(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("value_range", "max_shape"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @property
    def dtype(self) -> np.dtype[Any]:
        return DTYPES[self.datatype]

    def concrete_shape(self, dynamic: int = 1) -> tuple[int, ...]:
        """The shape with every dynamic dimension replaced by ``dynamic``."""
        return tuple(dynamic if d < 0 else d for d in self.shape)

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want < 0 or want == got for want, got in zip(self.shape, shape, strict=True)
        )


def _bounds_shape(shape: tuple[int, ...], most: tuple[int, ...]) -> bool:
    """Whether ``most`` is one bound per dimension of ``shape``: ``-1`` or at least 1, and a
    fixed dimension's own size (or ``-1``) where ``shape`` fixes it."""
    return len(most) == len(shape) and all(
        m == -1 or (m >= 1 and d in (-1, m)) for d, m in zip(shape, most, strict=True)
    )


def check_feed(spec: TensorSpec, array: np.ndarray[Any, Any]) -> str | None:
    """Why ``array`` does not fit ``spec``, or ``None`` when it does."""
    if array.dtype != spec.dtype:
        return f"input {spec.name!r}: dtype {array.dtype} where {spec.datatype} is expected"
    if not spec.accepts_shape(tuple(array.shape)):
        want = "x".join("?" if d < 0 else str(d) for d in spec.shape)
        got = "x".join(str(d) for d in array.shape)
        return f"input {spec.name!r}: shape {got} where {want} is expected"
    if spec.max_shape is not None:
        for axis, (most, size) in enumerate(zip(spec.max_shape, array.shape, strict=True)):
            if 0 < most < size:
                return (
                    f"input {spec.name!r}: dimension {axis} is {size} where the model takes "
                    f"at most {most}"
                )
    if spec.value_range is not None and array.size and array.dtype.kind in "iu":
        low, high = spec.value_range
        smallest, largest = int(array.min()), int(array.max())
        if smallest < low or largest > high:
            found = smallest if smallest < low else largest
            return f"input {spec.name!r}: values must lie in [{low}, {high}] (found {found})"
    return None


def storable(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``array`` as ``np.savez`` can store without pickles: BYTES tensors (object arrays of
    ``bytes``/``str``) become fixed-width ``S`` arrays of their UTF-8 bytes."""
    if array.dtype != object:
        return array
    encoded = [x.encode("utf-8") if isinstance(x, str) else bytes(x) for x in array.ravel()]
    out: np.ndarray[Any, Any] = np.array(encoded, dtype=np.bytes_).reshape(array.shape)
    return out


def loaded(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The inverse of ``storable``: ``S`` arrays back to object arrays of ``bytes`` (what the
    runtimes and the API use for BYTES)."""
    if array.dtype.kind != "S":
        return array
    out = np.empty(array.shape, dtype=object)
    out.ravel()[:] = list(array.ravel())
    return out

"""Tensor specs and the datatype names of the Open Inference Protocol (KServe v2).

Owns the mapping between protocol datatypes, numpy dtypes and ONNX element types; the shape
convention is ONNX's: ``-1`` for a dynamic dimension.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

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
    """A named input or output: protocol datatype and shape (``-1`` = dynamic)."""

    model_config = ConfigDict(frozen=True)

    name: str
    datatype: Datatype
    shape: tuple[int, ...]

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


def check_feed(spec: TensorSpec, array: np.ndarray[Any, Any]) -> str | None:
    """Why ``array`` does not fit ``spec``, or ``None`` when it does."""
    if array.dtype != spec.dtype:
        return f"input {spec.name!r}: dtype {array.dtype} where {spec.datatype} is expected"
    if not spec.accepts_shape(tuple(array.shape)):
        want = "x".join("?" if d < 0 else str(d) for d in spec.shape)
        got = "x".join(str(d) for d in array.shape)
        return f"input {spec.name!r}: shape {got} where {want} is expected"
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

"""The bundle manifest: what one model version is and which variants of it exist.

A bundle is a directory holding ``manifest.json`` and the files its variants list. The control
plane writes it; the agent's store installs it and the swap validates a variant against the
golden cases. This module decides nothing and touches no disk beyond ``load``/``dump`` helpers.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from agent.contracts.accuracy import Metric, Task
from agent.contracts.tensors import TensorSpec

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "AccuracyReport",
    "BuildReport",
    "BundleManifest",
    "ComputeCheck",
    "FileEntry",
    "GoldenCase",
    "Precision",
    "Preprocessing",
    "Provenance",
    "QuantStep",
    "Runtime",
    "TargetConstraints",
    "Tolerance",
    "Variant",
    "semver_key",
]

SCHEMA_VERSION: Literal[1] = 1
MANIFEST_FILE = "manifest.json"

Runtime = Literal["onnxruntime", "openvino", "tensorrt"]
ArtifactFormat = Literal["onnx", "openvino-ir", "tensorrt-plan"]
Precision = Literal["fp32", "fp16", "int8", "int4"]  # int4: weight-only, activations float
Accelerator = Literal["cpu", "nvidia-gpu", "intel-gpu", "npu"]
# The reduced float types a runtime may compute in when the artifact lets it choose (OpenVINO's
# CPU plugin: bf16 on AVX512-BF16/AMX CPUs, f16 on ARM): an ``fp16`` or ``int4`` variant's float
# parts, unless the device pins f32.
ReducedType = Literal["bf16", "f16"]

NAME_RE = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$"
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
_REL_PATH = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.(?:/|$))[a-zA-Z0-9._/-]{1,200}$")


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Sort key for semantic versions (a release sorts after its pre-releases)."""
    m = _SEMVER.match(version)
    if not m:
        raise ValueError(f"not a semantic version: {version!r}")
    pre = m.group(4)
    pre_key: tuple[tuple[int, int | str], ...] = ()
    if pre:
        pre_key = tuple((0, int(p)) if p.isdigit() else (1, p) for p in pre.split("."))
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, pre_key)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    """One file of a variant, relative to the bundle directory."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        if not _REL_PATH.match(value):
            raise ValueError(f"unsafe or invalid file path in bundle: {value!r}")
        return value


class TargetConstraints(_Frozen):
    """Where a variant can run; empty fields mean no constraint."""

    arch: tuple[str, ...] = ()  # "x86_64", "aarch64"
    accelerator: Accelerator = "cpu"
    cpu_flags: tuple[str, ...] = ()  # all required, e.g. ("avx512_vnni",)
    compute_capability: str | None = None  # TensorRT plans are bound to one, e.g. "8.7"
    runtime_min: str | None = None
    runtime_max: str | None = None  # exclusive


class Tolerance(_Frozen):
    """How far a variant's outputs may stray from the FP32 reference on the golden cases."""

    max_rel_l2: float = Field(default=1e-3, gt=0)  # ||out - ref|| / ||ref|| per output
    max_abs: float | None = None


class GoldenCase(_Frozen):
    """An ``.npz`` file in the bundle: arrays ``in:<input>`` and FP32 reference ``out:<output>``."""

    file: FileEntry


class ComputeCheck(_Frozen):
    """The deciding metric of a variant again, with the runtime computing its float parts in a
    reduced type (``AccuracyReport.reduced_compute``)."""

    value: float
    delta: float
    accepted: bool


class AccuracyReport(_Frozen):
    """A quantized or FP16 variant measured against FP32 on the validation set.

    ``metric`` is the one that decided (``agent.contracts.accuracy`` defines each); ``delta``
    is the points it lost, gated by ``budget`` in the same points; ``metrics`` holds every
    metric measured for ``task``, in percent. The variant's own figures are for its float parts
    computed in f32; ``reduced_compute`` holds the same metric with them computed in a reduced
    float type the build host's runtime uses by default (OpenVINO on an AVX512-BF16 host: bf16).
    A device lets its runtime compute in a reduced type only where that type is listed here and
    accepted; otherwise it pins f32 (``Variant.reduced_compute``)."""

    metric: Metric
    reference: float
    value: float
    delta: float
    samples: int = Field(ge=0)
    budget: float
    accepted: bool
    reason: str | None = None
    task: Task | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    reduced_compute: dict[ReducedType, ComputeCheck] = Field(default_factory=dict)

    @model_serializer(mode="wrap")
    def _without_empty_reduced(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``reduced_compute`` is left out when nothing was measured in a reduced type: an agent
        older than it (its manifest model forbids unknown fields) still reads such a manifest."""
        data: dict[str, Any] = handler(self)
        if not data.get("reduced_compute"):
            data.pop("reduced_compute", None)
        return data


class QuantStep(_Frozen):
    """One step of an accuracy-aware quantization: what was tried and what it cost."""

    action: str = Field(max_length=300)
    metric: Metric
    value: float
    delta: float
    kept_float: int = Field(default=0, ge=0)  # compute operations left in float at this step
    seconds: float = Field(ge=0)


class BuildReport(_Frozen):
    """How a variant came out on the build host: speed, weights, precision per part."""

    latency_ms: float | None = Field(default=None, ge=0)  # median, batch of one golden input
    weight_bytes: int = Field(default=0, ge=0)
    precisions: dict[str, int] = Field(default_factory=dict)  # compute ops per precision
    kept_float: tuple[str, ...] = ()  # operations an INT8 variant left in float
    recipe: str | None = None
    steps: tuple[QuantStep, ...] = ()
    seconds: float | None = Field(default=None, ge=0)  # time spent building this variant


class Preprocessing(_Frozen):
    """How the inference loop turns a frame (HxWxC uint8, RGB) into the model's first input:
    fit to ``resize`` (stretch, letterbox with ``pad`` borders, or center crop), channel order
    ``color``, ``(x * scale - mean) / std`` per channel (in the model's channel order), layout."""

    resize: tuple[int, int] | None = None  # (height, width)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    grayscale: bool = False
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    color: Literal["rgb", "bgr"] = "rgb"
    fit: Literal["stretch", "letterbox", "center_crop"] = "stretch"
    pad: int = Field(default=114, ge=0, le=255)  # letterbox border value

    @model_serializer(mode="wrap")
    def _without_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``color``, ``fit`` and ``pad`` are left out at their defaults: an agent older than
        them (its manifest model forbids unknown fields) still reads such a manifest."""
        data: dict[str, Any] = handler(self)
        for key, default in (("color", "rgb"), ("fit", "stretch"), ("pad", 114)):
            if data.get(key) == default:
                data.pop(key)
        return data

    @classmethod
    def parse(cls, text: str) -> Preprocessing:
        """``resize=640x640,layout=nchw,mean=0.485,0.456,0.406,std=...,color=rgb,fit=letterbox``:
        ``key=value`` items separated by commas; a value list (mean, std) continues over the
        commas that follow it. Keys: resize, layout, mean, std, scale (a number or ``1/255``),
        color, fit, pad, grayscale. ``ValueError`` names what is wrong."""
        if len(text) > 1024:
            raise ValueError("preprocessing spec longer than 1024 characters")
        items: dict[str, list[str]] = {}
        key = ""
        for token in (t.strip() for t in text.split(",")):
            if "=" in token:
                key, value = (part.strip() for part in token.split("=", 1))
                key = key.lower()
                if key in items:
                    raise ValueError(f"{key} given twice")
                items[key] = [value]
            elif key and key in ("mean", "std") and token:
                items[key].append(token)
            else:
                raise ValueError(f"{token!r} is not key=value")
        known = {"resize", "layout", "mean", "std", "scale", "color", "fit", "pad", "grayscale"}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
        fields: dict[str, Any] = {}
        for key, values in items.items():
            value = values[0]
            if key == "resize":
                h, _, w = value.lower().partition("x")
                fields["resize"] = (_int(h, key), _int(w, key))
            elif key == "layout":
                fields["layout"] = value.upper()
            elif key in ("mean", "std"):
                fields[key] = tuple(_float(v, key) for v in values)
            elif key == "scale":
                num, slash, den = value.partition("/")
                fields["scale"] = _float(num, key) / (_float(den, key) if slash else 1.0)
            elif key in ("color", "fit"):
                fields[key] = value.lower().replace("-", "_")
            elif key == "pad":
                fields["pad"] = _int(value, key)
            else:
                if value.lower() not in ("true", "false"):
                    raise ValueError("grayscale must be true or false")
                fields["grayscale"] = value.lower() == "true"
        h, w = fields.get("resize", (1, 1))
        if not (0 < h <= 16384 and 0 < w <= 16384):
            raise ValueError("resize must be 1..16384 x 1..16384")
        for key in ("mean", "std"):
            if not 1 <= len(fields.get(key, (0.0,))) <= 4:
                raise ValueError(f"{key} takes one to four values (one per channel)")
        if any(v == 0 for v in fields.get("std", ())):
            raise ValueError("std must not contain zeros")
        if "mean" in fields and "std" not in fields:
            fields["std"] = (1.0,) * len(fields["mean"])
        if "std" in fields and "mean" not in fields:
            fields["mean"] = (0.0,) * len(fields["std"])
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise ValueError(
                "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            ) from None


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{key}: {text!r} is not an integer") from None


def _float(text: str, key: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{key}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{key}: {text!r} is not a finite number")
    return value


class Provenance(_Frozen):
    source_sha256: str | None = None
    tools: dict[str, str] = Field(default_factory=dict)
    built_at: datetime | None = None


class Variant(_Frozen):
    """One artifact of a model version, built for a runtime, precision and target."""

    id: str = Field(pattern=NAME_RE)
    runtime: Runtime
    format: ArtifactFormat
    precision: Precision
    entrypoint: str  # the path (in ``files``) the runtime loads
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    target: TargetConstraints = TargetConstraints()
    tolerance: Tolerance = Tolerance()
    accuracy: AccuracyReport | None = None
    status: Literal["accepted", "rejected"] = "accepted"
    build: BuildReport | None = None

    @model_validator(mode="after")
    def _entrypoint_listed(self) -> Variant:
        if self.entrypoint not in {f.path for f in self.files}:
            raise ValueError(f"variant {self.id}: entrypoint {self.entrypoint!r} not in files")
        return self

    @property
    def reduced_compute(self) -> frozenset[str]:
        """The reduced float types the accuracy gate accepted this variant computing in, for
        its own runtime (empty: the device computes its float parts in f32)."""
        if self.accuracy is None:
            return frozenset()
        return frozenset(t for t, c in self.accuracy.reduced_compute.items() if c.accepted)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)


class BundleManifest(_Frozen):
    """A model version: its variants, golden cases, preprocessing and provenance."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=NAME_RE)
    version: str
    variants: tuple[Variant, ...] = Field(min_length=1)
    golden: tuple[GoldenCase, ...] = ()
    preprocessing: Preprocessing | None = None
    provenance: Provenance = Provenance()

    @field_validator("version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not _SEMVER.match(value):
            raise ValueError(f"not a semantic version: {value!r}")
        return value

    @model_validator(mode="after")
    def _unique_variants(self) -> BundleManifest:
        ids = [v.id for v in self.variants]
        if len(ids) != len(set(ids)):
            raise ValueError("variant ids must be unique")
        return self

    def variant(self, variant_id: str) -> Variant:
        for v in self.variants:
            if v.id == variant_id:
                return v
        raise KeyError(variant_id)

    def all_files(self) -> tuple[FileEntry, ...]:
        """Every file the bundle holds, each path once (variants may share files)."""
        seen: dict[str, FileEntry] = {}
        for v in self.variants:
            for f in v.files:
                seen.setdefault(f.path, f)
        for g in self.golden:
            seen.setdefault(g.file.path, g.file)
        return tuple(seen.values())

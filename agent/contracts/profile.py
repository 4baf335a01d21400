"""The hardware profile a device reports: what it is and which runtimes it has.

Pure data; ``agent.hardware`` detects it from /proc, /sys, /etc and the installed runtimes.
Every string and list is bounded: a device reports it, and the control plane stores it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BoardInfo", "CpuInfo", "GpuInfo", "HardwareProfile", "Pins", "RuntimeInfo"]


Word = Annotated[str, Field(max_length=64)]  # an identifier, a version, a flag
Label = Annotated[str, Field(max_length=256)]  # a product name
Reason = Annotated[str, Field(max_length=1000)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CpuInfo(_Frozen):
    model: Label | None = None
    cores: int = Field(ge=1, le=65536)
    # The flags that decide variants, normalized: avx2, avx512f, avx512_vnni, amx, asimddp, ...
    flags: tuple[Word, ...] = Field(default=(), max_length=256)


class BoardInfo(_Frozen):
    kind: Literal["jetson", "raspberry-pi", "generic"] = "generic"
    model: Label | None = None
    l4t: Word | None = None  # e.g. "36.4.3"
    jetpack: Word | None = None  # e.g. "6.2"


class GpuInfo(_Frozen):
    vendor: Literal["nvidia", "intel", "amd", "other"]
    name: Label
    compute_capability: Word | None = None  # NVIDIA only, e.g. "8.7"
    memory_bytes: int | None = Field(default=None, ge=0, le=2**63 - 1)
    integrated: bool = False


class RuntimeInfo(_Frozen):
    name: Word  # onnxruntime, openvino, tensorrt, cuda
    version: Word
    usable: bool = True
    reason: Reason | None = None  # why not usable
    devices: tuple[Word, ...] = Field(default=(), max_length=32)  # ORT providers, OV devices


class Pins(_Frozen):
    """What the device's configuration pins (``backends.pin_backend``, ``pin_precision``): the
    control plane offers only variants that match, and the device serves only those."""

    backend: Literal["onnxruntime", "openvino", "tensorrt"] | None = None
    precision: Literal["fp32", "fp16", "int8", "int4"] | None = None


class HardwareProfile(_Frozen):
    schema_version: Literal[1] = 1
    arch: Word
    os: Word
    python: Word
    cpu: CpuInfo
    board: BoardInfo = BoardInfo()
    gpus: tuple[GpuInfo, ...] = Field(default=(), max_length=16)
    memory_bytes: int = Field(ge=0, le=2**63 - 1)
    runtimes: tuple[RuntimeInfo, ...] = Field(default=(), max_length=32)
    pins: Pins = Pins()

    def runtime(self, name: str) -> RuntimeInfo | None:
        return next((r for r in self.runtimes if r.name == name and r.usable), None)

    def compute_capability(self) -> str | None:
        return next((g.compute_capability for g in self.gpus if g.compute_capability), None)

    def digest_key(self) -> str:
        """A stable key of what decides a backend choice (not memory or Python)."""
        rts = ",".join(f"{r.name}={r.version}" for r in sorted(self.runtimes, key=lambda r: r.name))
        gpus = ",".join(f"{g.name}:{g.compute_capability}" for g in self.gpus)
        providers = ",".join(f"{r.name}:{'+'.join(r.devices)}" for r in self.runtimes if r.devices)
        return f"{self.arch}|{self.cpu.model}|{','.join(self.cpu.flags)}|{gpus}|{rts}|{providers}"

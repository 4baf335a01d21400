"""The hardware profile a device reports: what it is and which runtimes it has.

Pure data; ``agent.hardware`` detects it from /proc, /sys, /etc and the installed runtimes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BoardInfo", "CpuInfo", "GpuInfo", "HardwareProfile", "RuntimeInfo"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CpuInfo(_Frozen):
    model: str | None = None
    cores: int = Field(ge=1)
    # The flags that decide variants, normalized: avx2, avx512f, avx512_vnni, amx, asimddp, ...
    flags: tuple[str, ...] = ()


class BoardInfo(_Frozen):
    kind: Literal["jetson", "raspberry-pi", "generic"] = "generic"
    model: str | None = None
    l4t: str | None = None  # e.g. "36.4.3"
    jetpack: str | None = None  # e.g. "6.2"


class GpuInfo(_Frozen):
    vendor: Literal["nvidia", "intel", "amd", "other"]
    name: str
    compute_capability: str | None = None  # NVIDIA only, e.g. "8.7"
    memory_bytes: int | None = None
    integrated: bool = False


class RuntimeInfo(_Frozen):
    name: str  # onnxruntime, openvino, tensorrt, cuda
    version: str
    usable: bool = True
    reason: str | None = None  # why not usable
    devices: tuple[str, ...] = ()  # ORT providers or OpenVINO devices


class HardwareProfile(_Frozen):
    schema_version: Literal[1] = 1
    arch: str
    os: str
    python: str
    cpu: CpuInfo
    board: BoardInfo = BoardInfo()
    gpus: tuple[GpuInfo, ...] = ()
    memory_bytes: int = Field(ge=0)
    runtimes: tuple[RuntimeInfo, ...] = ()

    def runtime(self, name: str) -> RuntimeInfo | None:
        return next((r for r in self.runtimes if r.name == name and r.usable), None)

    def compute_capability(self) -> str | None:
        return next((g.compute_capability for g in self.gpus if g.compute_capability), None)

    def digest_key(self) -> str:
        """A stable key of what decides a backend choice (not memory or Python)."""
        rts = ",".join(f"{r.name}={r.version}" for r in sorted(self.runtimes, key=lambda r: r.name))
        gpus = ",".join(f"{g.name}:{g.compute_capability}" for g in self.gpus)
        return f"{self.arch}|{self.cpu.model}|{','.join(self.cpu.flags)}|{gpus}|{rts}"

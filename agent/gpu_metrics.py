"""GPU telemetry: utilisation, memory, temperature and power of the board's GPU(s).

Two routes, tried in order by ``read_gpu_metrics``:

- NVML (``nvidia-ml-py``, imported as ``pynvml``) on desktop and server GPUs;
- Jetson sysfs, where NVML is not available: the GPU load file (an integer 0..1000, tenths of a
  percent) at one of ``/sys/devices/platform/gpu.0/load`` (Orin, Xavier NX),
  ``/sys/devices/gpu.0/load`` (Xavier, Nano) or ``/sys/devices/platform/bus@0/17000000.gpu/load``
  (Orin on JetPack 6), the GPU thermal zone (``gpu-thermal`` on JetPack 6, ``GPU-therm`` on
  JetPack 4), and ``/proc/meminfo`` for memory, which the GPU shares with the CPU there.

Owns reading and parsing only; publishing the samples is the telemetry module's job. The root
directory of the sysfs route is a parameter so tests can point it at a tree they wrote.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from agent.errors import BackendUnavailableError, TelemetryError
from agent.logs import get_logger

__all__ = [
    "JETSON_LOAD_FILES",
    "GpuSample",
    "JetsonGpuReader",
    "NvmlReader",
    "parse_jetson_load",
    "parse_meminfo",
    "read_gpu_metrics",
]

log = get_logger(__name__)

JETSON_LOAD_FILES = (
    "sys/devices/platform/gpu.0/load",
    "sys/devices/gpu.0/load",
    "sys/devices/platform/bus@0/17000000.gpu/load",
)
_JETSON_GPU_ZONES = ("gpu-thermal", "GPU-therm", "gpu_thermal")


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One reading of one GPU; a field the route cannot read is ``None``."""

    index: int
    name: str
    source: Literal["nvml", "jetson-sysfs"]
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None


class NvmlReader:
    """Reads every GPU through NVML; ``BackendUnavailableError`` when NVML cannot start."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise BackendUnavailableError(
                "nvml", f"nvidia-ml-py is not installed (tensorrt extra): {exc}"
            ) from exc
        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise BackendUnavailableError("nvml", f"NVML did not start: {exc}") from exc
        self._open = True

    def _field(self, fn: str, *args: Any) -> Any:
        try:
            return getattr(self._nvml, fn)(*args)
        except self._nvml.NVMLError:
            return None  # e.g. power on a GPU without a sensor: report what can be read

    def read(self) -> list[GpuSample]:
        if not self._open:
            raise TelemetryError("nvml: reader is closed")
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nvml.NVMLError as exc:
            raise TelemetryError(f"nvml: cannot list GPUs: {exc}") from exc
        samples = []
        for index, handle in enumerate(handles):
            name = self._field("nvmlDeviceGetName", handle)
            util = self._field("nvmlDeviceGetUtilizationRates", handle)
            mem = self._field("nvmlDeviceGetMemoryInfo", handle)
            temp = self._field("nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU)
            power_mw = self._field("nvmlDeviceGetPowerUsage", handle)
            samples.append(
                GpuSample(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name or "unknown"),
                    source="nvml",
                    utilization_pct=float(util.gpu) if util is not None else None,
                    memory_used_bytes=int(mem.used) if mem is not None else None,
                    memory_total_bytes=int(mem.total) if mem is not None else None,
                    temperature_c=float(temp) if temp is not None else None,
                    power_w=power_mw / 1000.0 if power_mw is not None else None,
                )
            )
        return samples

    def memory_used_bytes(self, index: int = 0) -> int:
        """Device memory in use on GPU ``index`` (all processes)."""
        nvml = self._nvml
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).used)
        except nvml.NVMLError as exc:
            raise TelemetryError(f"nvml: cannot read memory of GPU {index}: {exc}") from exc

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvml_shutdown_failed", error=str(exc))

    def __enter__(self) -> NvmlReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def parse_jetson_load(text: str) -> float:
    """Percent from the Jetson GPU load file (``"150"`` -> 15.0); ``TelemetryError`` if garbled."""
    try:
        value = int(text.strip())
    except ValueError as exc:
        raise TelemetryError(f"jetson GPU load file holds {text.strip()!r}, not 0..1000") from exc
    if not 0 <= value <= 1000:
        raise TelemetryError(f"jetson GPU load {value} is outside 0..1000")
    return value / 10.0


def parse_meminfo(text: str) -> tuple[int, int] | None:
    """``(used, total)`` bytes from ``/proc/meminfo`` (used = MemTotal - MemAvailable)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * 1024  # the kernel writes kB
    if "MemTotal" not in fields or "MemAvailable" not in fields:
        return None
    return fields["MemTotal"] - fields["MemAvailable"], fields["MemTotal"]


class JetsonGpuReader:
    """Reads a Jetson's integrated GPU from sysfs under ``root`` (``/`` on a board)."""

    def __init__(self, root: Path = Path("/")) -> None:
        self.root = root
        self.load_file = next(
            (root / rel for rel in JETSON_LOAD_FILES if (root / rel).is_file()), None
        )
        if self.load_file is None:
            raise BackendUnavailableError(
                "jetson-gpu",
                f"no Jetson GPU load file under {root} ({', '.join(JETSON_LOAD_FILES)})",
            )
        self.thermal_zone = _find_zone(root / "sys/class/thermal", _JETSON_GPU_ZONES)

    def read(self) -> list[GpuSample]:
        assert self.load_file is not None
        try:
            load = parse_jetson_load(self.load_file.read_text())
        except OSError as exc:
            raise TelemetryError(f"cannot read {self.load_file}: {exc}") from exc
        memory = None
        with contextlib.suppress(OSError):  # memory is optional: the load is what matters
            memory = parse_meminfo((self.root / "proc/meminfo").read_text())
        return [
            GpuSample(
                index=0,
                name="jetson-igpu",
                source="jetson-sysfs",
                utilization_pct=load,
                memory_used_bytes=memory[0] if memory else None,
                memory_total_bytes=memory[1] if memory else None,
                temperature_c=_zone_temp(self.thermal_zone),
            )
        ]


def _find_zone(thermal: Path, names: Iterable[str]) -> Path | None:
    wanted = set(names)
    try:
        zones = sorted(thermal.glob("thermal_zone*"))
    except OSError:
        return None
    for zone in zones:
        try:
            if (zone / "type").read_text().strip() in wanted:
                return zone
        except OSError:
            continue
    return None


def _zone_temp(zone: Path | None) -> float | None:
    """Celsius from a thermal zone's ``temp`` (millidegrees); ``None`` if unreadable (some
    Orin zones answer EAGAIN)."""
    if zone is None:
        return None
    try:
        return int((zone / "temp").read_text().strip()) / 1000.0
    except (OSError, ValueError):
        return None


def read_gpu_metrics(root: Path = Path("/")) -> list[GpuSample]:
    """One sample per GPU from the first route that works here; ``[]`` on a board without one."""
    try:
        with NvmlReader() as nvml:
            return nvml.read()
    except BackendUnavailableError as exc:
        nvml_reason = exc.reason
    try:
        return JetsonGpuReader(root).read()
    except BackendUnavailableError as exc:
        log.debug("gpu_metrics_unavailable", nvml=nvml_reason, jetson=exc.reason)
        return []

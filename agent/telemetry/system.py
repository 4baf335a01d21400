"""System metrics for the telemetry payload: CPU, memory, temperatures, GPU load.

Owns reading them on any board, tolerating whatever is missing: psutil for CPU and memory,
``/sys/class/thermal`` for temperatures (Raspberry Pi ``thermal_zone0``; Jetson zones by name,
JetPack 4 ``CPU-therm``/``GPU-therm`` and JetPack 6 ``cpu-thermal``/``gpu-thermal``), the Jetson
integrated GPU's ``load`` file, and NVML for discrete NVIDIA GPUs when ``pynvml`` is installed.
A zone or file that cannot be read (Orin's ``cv*-thermal`` zones answer EAGAIN) is skipped.
The sysfs root is a parameter so tests read recorded board files. Scheduling and publishing
are the client's job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from agent.contracts.telemetry import GpuMetrics, SystemMetrics
from agent.logs import get_logger

__all__ = ["JETSON_GPU_LOAD_PATHS", "SystemMetricsCollector"]

log = get_logger(__name__)

# Tried in order; the file holds 0..1000 (tenths of a percent). Orin has only the platform path,
# Xavier both, Nano and AGX Xavier the first; JetPack 6 Orin Nano also has the bus@0 path.
JETSON_GPU_LOAD_PATHS = (
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/platform/bus@0/17000000.gpu/load",
)
_CPU_ZONE_NAMES = ("cpu-thermal", "CPU-therm", "cpu_thermal", "x86_pkg_temp", "cpu-therm")
_GPU_ZONE_NAMES = ("gpu-thermal", "GPU-therm", "gpu_thermal")
_MAX_SYSFS_READ = 64  # bytes; sysfs values are short, a large file is not one of ours


class SystemMetricsCollector:
    """Reads the device's system metrics; call ``collect()`` once per telemetry window."""

    def __init__(
        self,
        root: Path = Path("/"),
        *,
        use_nvml: bool = True,
        cpu_percent: Callable[[], float] | None = None,
    ) -> None:
        self._root = root
        self._use_nvml = use_nvml
        self._nvml: Any = None  # the pynvml module once initialised, False once it failed
        # psutil's first non-blocking reading is meaningless; prime it so the next is a delta.
        self._cpu_percent = cpu_percent or (lambda: psutil.cpu_percent(interval=None))
        with contextlib.suppress(Exception):
            self._cpu_percent()

    def collect(self) -> SystemMetrics:
        temps = self.thermal_zones()
        mem = psutil.virtual_memory()
        gpus = list(self._nvml_gpus())
        jetson = self._jetson_gpu(temps)
        if jetson is not None:
            gpus.insert(0, jetson)
        try:
            cpu: float | None = min(100.0, max(0.0, float(self._cpu_percent())))
        except Exception:
            cpu = None
        return SystemMetrics(
            cpu_percent=cpu,
            memory_used_bytes=int(mem.total - mem.available),
            memory_total_bytes=int(mem.total),
            cpu_temperature_c=self._cpu_temperature(temps),
            temperatures_c=temps,
            gpus=tuple(gpus),
        )

    # -- thermal zones -----------------------------------------------------------------------

    def thermal_zones(self) -> dict[str, float]:
        """Every readable zone, ``{type: degrees C}``; the zone directory name if untyped."""
        base = self._root / "sys" / "class" / "thermal"
        out: dict[str, float] = {}
        try:
            zones = sorted(base.glob("thermal_zone*"), key=lambda p: _zone_number(p.name))
        except OSError:
            return out
        for zone in zones:
            name = _read_text(zone / "type") or zone.name
            raw = _read_text(zone / "temp")
            if raw is None:
                continue  # EAGAIN on Orin's cv zones, or no temp file
            try:
                millideg = int(raw)
            except ValueError:
                continue
            if millideg <= -40000 or millideg >= 200000:
                continue  # sensors report sentinels such as -256000 when powered down
            key = name if name not in out else f"{name}#{zone.name}"
            out[key] = millideg / 1000.0
        return out

    def _cpu_temperature(self, temps: dict[str, float]) -> float | None:
        for name in _CPU_ZONE_NAMES:
            if name in temps:
                return temps[name]
        # The Raspberry Pi has a single zone, thermal_zone0, which is the SoC.
        zone0 = _read_text(self._root / "sys/class/thermal/thermal_zone0/type")
        if zone0 is not None and zone0 in temps and len(temps) == 1:
            return temps[zone0]
        return None

    # -- GPUs --------------------------------------------------------------------------------

    def _jetson_gpu(self, temps: dict[str, float]) -> GpuMetrics | None:
        for rel in JETSON_GPU_LOAD_PATHS:
            raw = _read_text(self._root / rel)
            if raw is None:
                continue
            try:
                load = int(raw)
            except ValueError:
                continue
            temp = next((temps[n] for n in _GPU_ZONE_NAMES if n in temps), None)
            return GpuMetrics(
                name="jetson-igpu",
                utilization_percent=min(100.0, max(0.0, load / 10.0)),
                temperature_c=temp,
            )
        return None

    def _nvml_gpus(self) -> list[GpuMetrics]:
        nvml = self._nvml_module()
        if nvml is None:
            return []
        out: list[GpuMetrics] = []
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            log.debug("nvml_read_failed", error=str(exc))
            return out
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
            except Exception as exc:
                log.debug("nvml_read_failed", index=index, error=str(exc))
                continue
            fields: dict[str, Any] = {"name": name if isinstance(name, str) else name.decode()}
            with contextlib.suppress(Exception):
                fields["utilization_percent"] = float(
                    nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                )
            with contextlib.suppress(Exception):
                info = nvml.nvmlDeviceGetMemoryInfo(handle)
                fields["memory_used_bytes"] = int(info.used)
                fields["memory_total_bytes"] = int(info.total)
            with contextlib.suppress(Exception):
                fields["temperature_c"] = float(
                    nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
                )
            with contextlib.suppress(Exception):
                fields["power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
            out.append(GpuMetrics(**fields))
        return out

    def _nvml_module(self) -> Any:
        if not self._use_nvml or self._nvml is False:
            return None
        if self._nvml is None:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as exc:  # not installed, no driver, no GPU: all mean "no NVML"
                log.debug("nvml_unavailable", error=str(exc))
                self._nvml = False
                return None
            self._nvml = pynvml
        return self._nvml


def _zone_number(name: str) -> int:
    digits = name.removeprefix("thermal_zone")
    return int(digits) if digits.isdigit() else 1 << 30


def _read_text(path: Path) -> str | None:
    """A short sysfs value, stripped; None if missing, unreadable (EAGAIN, EACCES) or binary."""
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_SYSFS_READ)
    except OSError:
        return None
    try:
        return data.decode("ascii").strip("\0\n ")
    except UnicodeDecodeError:
        return None

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
from agent.errors import BackendUnavailableError, TelemetryError
from agent.gpu_metrics import GpuSample, JetsonGpuReader, NvmlReader
from agent.logs import get_logger

__all__ = ["SystemMetricsCollector"]

log = get_logger(__name__)

_CPU_ZONE_NAMES = ("cpu-thermal", "CPU-therm", "cpu_thermal", "x86_pkg_temp", "cpu-therm")
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
        self._nvml: Any = None  # an NvmlReader once started, False once it failed
        # psutil's first non-blocking reading is meaningless; prime it so the next is a delta.
        self._cpu_percent = cpu_percent or (lambda: psutil.cpu_percent(interval=None))
        with contextlib.suppress(Exception):
            self._cpu_percent()

    def collect(self) -> SystemMetrics:
        temps = self.thermal_zones()
        mem = psutil.virtual_memory()
        gpus = self._gpus()
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

    def _gpus(self) -> list[GpuMetrics]:
        """The Jetson's integrated GPU (sysfs) first, then NVML's GPUs: ``agent.gpu_metrics``."""
        samples: list[GpuSample] = []
        # Not a Jetson, or its load file is unreadable right now: no integrated GPU reading.
        with contextlib.suppress(BackendUnavailableError, TelemetryError):
            samples += JetsonGpuReader(self._root).read()
        nvml = self._nvml_reader()
        if nvml is not None:
            try:
                samples += nvml.read()
            except TelemetryError as exc:
                log.debug("nvml_read_failed", error=str(exc))
        return [
            GpuMetrics(
                name=s.name,
                utilization_percent=s.utilization_pct,
                memory_used_bytes=s.memory_used_bytes,
                memory_total_bytes=s.memory_total_bytes,
                temperature_c=s.temperature_c,
                power_w=s.power_w,
            )
            for s in samples
        ]

    def _nvml_reader(self) -> NvmlReader | None:
        if not self._use_nvml or self._nvml is False:
            return None
        if self._nvml is None:
            try:
                self._nvml = NvmlReader()
            except BackendUnavailableError as exc:  # not installed, no driver, no GPU
                log.debug("nvml_unavailable", reason=exc.reason)
                self._nvml = False
                return None
        reader: NvmlReader = self._nvml
        return reader


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

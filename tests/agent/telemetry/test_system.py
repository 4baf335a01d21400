"""System metrics from recorded board files plus temperature values the tests write."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.gpu_metrics import JETSON_LOAD_FILES
from agent.telemetry.system import SystemMetricsCollector
from tests.conftest import FIXTURES

NANO = FIXTURES / "boards" / "jetson-nano-2gb-jp4"


@pytest.fixture
def nano_root(tmp_path: Path) -> Path:
    """The Jetson Nano's recorded zone names, with temperatures written beside them."""
    root = tmp_path / "nano"
    shutil.copytree(NANO / "sys", root / "sys")
    zones = root / "sys" / "class" / "thermal"
    for n, millideg in enumerate(["36500", "41000", "39500", "37000", "100000", "38250"]):
        (zones / f"thermal_zone{n}" / "temp").write_text(millideg + "\n")
    return root


def collector(root: Path) -> SystemMetricsCollector:
    return SystemMetricsCollector(root, use_nvml=False, cpu_percent=lambda: 12.5)


def test_jetson_nano_zones_by_old_names(nano_root: Path) -> None:
    metrics = collector(nano_root).collect()
    assert metrics.temperatures_c == {
        "AO-therm": 36.5,
        "CPU-therm": 41.0,
        "GPU-therm": 39.5,
        "PLL-therm": 37.0,
        "PMIC-Die": 100.0,
        "thermal-fan-est": 38.25,
    }
    assert metrics.cpu_temperature_c == 41.0
    assert metrics.cpu_percent == 12.5
    assert metrics.memory_total_bytes
    assert metrics.gpus == ()  # no load file recorded: no GPU entry invented


@pytest.mark.parametrize("load_path", JETSON_LOAD_FILES)
def test_jetson_gpu_load_from_each_known_path(nano_root: Path, load_path: str) -> None:
    target = nano_root / load_path
    target.parent.mkdir(parents=True)
    target.write_text("150\n")  # tenths of a percent
    (gpu,) = collector(nano_root).collect().gpus
    assert gpu.utilization_percent == 15.0
    assert gpu.temperature_c == 39.5  # from GPU-therm


def test_new_style_names_and_unreadable_zones(tmp_path: Path) -> None:
    zones = tmp_path / "sys" / "class" / "thermal"
    for n, (name, temp) in enumerate(
        [
            ("cpu-thermal", "52000"),
            ("gpu-thermal", "48000"),
            ("cv0-thermal", None),
            ("tj-thermal", "-256000"),
            ("soc0-thermal", "garbage"),
        ]
    ):
        zone = zones / f"thermal_zone{n}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(name + "\n")
        if temp is not None:
            (zone / "temp").write_text(temp + "\n")
        else:
            (zone / "temp").mkdir()  # reading it fails like Orin's EAGAIN zones do
    gpu_load = tmp_path / "sys/devices/platform/gpu.0/load"
    gpu_load.parent.mkdir(parents=True)
    gpu_load.write_text("1000\n")
    metrics = collector(tmp_path).collect()
    assert metrics.temperatures_c == {"cpu-thermal": 52.0, "gpu-thermal": 48.0}
    assert metrics.cpu_temperature_c == 52.0
    assert metrics.gpus[0].utilization_percent == 100.0
    assert metrics.gpus[0].temperature_c == 48.0


def test_raspberry_pi_single_zone(tmp_path: Path) -> None:
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("47236\n")
    assert collector(tmp_path).collect().cpu_temperature_c == 47.236
    (zone / "type").write_text("bcm2835_thermal\n")  # older kernels' name
    assert collector(tmp_path).collect().cpu_temperature_c == 47.236


def test_no_sysfs_at_all(tmp_path: Path) -> None:
    metrics = collector(tmp_path).collect()
    assert metrics.temperatures_c == {}
    assert metrics.cpu_temperature_c is None
    assert metrics.gpus == ()


def test_this_machine() -> None:
    metrics = SystemMetricsCollector().collect()
    assert metrics.memory_total_bytes
    assert metrics.memory_used_bytes is not None
    assert metrics.memory_used_bytes <= metrics.memory_total_bytes

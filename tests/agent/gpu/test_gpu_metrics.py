"""GPU telemetry: the Jetson sysfs route on trees written like a real board's, NVML on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import BackendUnavailableError, TelemetryError
from agent.gpu_metrics import (
    JETSON_LOAD_FILES,
    JetsonGpuReader,
    NvmlReader,
    parse_jetson_load,
    parse_meminfo,
    read_gpu_metrics,
)

MEMINFO = "MemTotal:        7990000 kB\nMemFree:          990000 kB\nMemAvailable:    3990000 kB\n"


def _board(root: Path, load_rel: str, load: str, zones: dict[str, str | None]) -> Path:
    """Write a Jetson-like tree: the GPU load file and thermal zones (type -> temp or None)."""
    load_file = root / load_rel
    load_file.parent.mkdir(parents=True)
    load_file.write_text(load)
    for i, (kind, temp) in enumerate(zones.items()):
        zone = root / "sys/class/thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(kind + "\n")
        if temp is not None:
            (zone / "temp").write_text(temp + "\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/meminfo").write_text(MEMINFO)
    return root


@pytest.mark.parametrize("load_rel", JETSON_LOAD_FILES)
def test_jetson_load_file_at_each_known_path(tmp_path: Path, load_rel: str) -> None:
    root = _board(tmp_path, load_rel, "150\n", {"cpu-thermal": "45000", "gpu-thermal": "47500"})
    [sample] = JetsonGpuReader(root).read()
    assert sample.source == "jetson-sysfs"
    assert sample.utilization_pct == 15.0
    assert sample.temperature_c == 47.5
    assert sample.memory_total_bytes == 7990000 * 1024
    assert sample.memory_used_bytes == (7990000 - 3990000) * 1024
    assert sample.power_w is None


def test_jetpack4_zone_names_and_unreadable_zone(tmp_path: Path) -> None:
    # JetPack 4 names its zone GPU-therm; an Orin zone whose temp cannot be read is tolerated.
    root = _board(tmp_path, JETSON_LOAD_FILES[1], "1000", {"CPU-therm": "40000", "GPU-therm": None})
    [sample] = JetsonGpuReader(root).read()
    assert sample.utilization_pct == 100.0
    assert sample.temperature_c is None


def test_read_gpu_metrics_falls_back_to_sysfs(tmp_path: Path) -> None:
    root = _board(tmp_path, JETSON_LOAD_FILES[2], "0", {"gpu-thermal": "30000"})
    samples = read_gpu_metrics(root)
    assert len(samples) >= 1
    # NVML wins where it runs (a desktop GPU); without it, the sysfs tree answers.
    assert samples[0].source in {"nvml", "jetson-sysfs"}


def test_no_gpu_anywhere_is_an_empty_list_or_nvml(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="no Jetson GPU load file"):
        JetsonGpuReader(tmp_path)
    assert all(s.source == "nvml" for s in read_gpu_metrics(tmp_path))


@pytest.mark.parametrize("text", ["", "abc", "-1", "1001", "15.0"])
def test_garbled_load_is_a_clear_error(text: str) -> None:
    with pytest.raises(TelemetryError, match="jetson GPU load"):
        parse_jetson_load(text)


def test_garbled_load_file_fails_the_read_not_the_reader(tmp_path: Path) -> None:
    root = _board(tmp_path, JETSON_LOAD_FILES[0], "busy", {})
    reader = JetsonGpuReader(root)
    with pytest.raises(TelemetryError, match="'busy'"):
        reader.read()
    (root / JETSON_LOAD_FILES[0]).write_text("42")
    assert reader.read()[0].utilization_pct == 4.2


def test_meminfo_without_available_is_none() -> None:
    assert parse_meminfo("MemTotal: 100 kB\n") is None


@pytest.mark.gpu
def test_nvml_reads_the_gpu(nvml: NvmlReader) -> None:
    samples = nvml.read()
    assert samples
    gpu = samples[0]
    assert gpu.source == "nvml"
    assert gpu.name
    assert gpu.memory_total_bytes
    assert gpu.memory_total_bytes > 1 << 30
    assert gpu.memory_used_bytes is not None
    assert 0 < gpu.memory_used_bytes < gpu.memory_total_bytes
    assert gpu.utilization_pct is not None
    assert 0 <= gpu.utilization_pct <= 100
    assert gpu.temperature_c is not None
    assert 0 < gpu.temperature_c < 110
    assert gpu.power_w is not None
    assert gpu.power_w > 0


def test_nvml_says_why_it_is_missing_and_a_closed_reader_refuses() -> None:
    try:
        reader = NvmlReader()
    except BackendUnavailableError as exc:
        reason = exc.reason
    else:
        reader.close()
        with pytest.raises(TelemetryError, match="closed"):
            reader.read()
        return
    assert reason.startswith(("NVML did not start", "nvidia-ml-py is not installed"))

"""Window statistics: counts, throughput and nearest-rank percentiles."""

from __future__ import annotations

import pytest

from agent.telemetry.window import InferenceWindow, percentile


def test_percentiles_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_window_drain_and_reset() -> None:
    clock = [100.0]
    window = InferenceWindow(now=lambda: clock[0], max_samples=1000)
    for ms in range(1, 101):
        window.record("det", float(ms), version="1.0.0", backend="onnxruntime")
    window.record("det", 0.0, ok=False)
    window.record_dropped("det", 3)
    window.record_dropped("cls")
    clock[0] = 110.0
    cls, det = window.drain()
    assert (det.name, det.count, det.failed, det.dropped) == ("det", 101, 1, 3)
    assert det.window_s == 10.0
    assert det.throughput_per_s == 10.0
    assert (det.latency_p50_ms, det.latency_p95_ms, det.latency_p99_ms) == (50.0, 95.0, 99.0)
    assert det.version == "1.0.0"
    assert (cls.count, cls.dropped, cls.latency_p99_ms) == (0, 1, None)
    clock[0] = 111.0
    assert window.drain() == []


def test_reservoir_keeps_memory_bounded() -> None:
    window = InferenceWindow(now=lambda: 0.0, max_samples=100)
    for ms in range(10_000):
        window.record("m", float(ms % 100))
    (stats,) = window.drain()
    assert stats.count == 10_000
    assert stats.latency_p50_ms is not None
    assert 30 <= stats.latency_p50_ms <= 70

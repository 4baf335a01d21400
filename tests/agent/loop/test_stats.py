"""The statistics core: bounded systematic latency sample and its percentiles."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.loop import LatencySampler

latencies = st.lists(st.integers(min_value=0, max_value=10**10), min_size=1, max_size=600)


@given(values=latencies, capacity=st.sampled_from([2, 4, 8, 16, 64]))
@settings(max_examples=200, deadline=None)
def test_sample_is_every_stride_th_latency_of_the_whole_window(
    values: list[int], capacity: int
) -> None:
    sampler = LatencySampler(capacity)
    for v in values:
        sampler.record(v)
    assert sampler.count == len(values)
    assert sampler.kept_samples() == values[:: sampler.stride]
    assert 1 <= sampler.kept <= capacity
    if len(values) >= capacity:
        assert sampler.kept >= capacity // 2  # never fewer than half the slots in use


@given(values=latencies)
@settings(max_examples=200, deadline=None)
def test_percentiles_match_numpy_while_everything_fits(values: list[int]) -> None:
    sampler = LatencySampler(1024)
    for v in values:
        sampler.record(v)
    p50, p95, p99 = sampler.percentiles_ms()
    expected = np.percentile(np.array(values, dtype=np.float64), [50, 95, 99]) / 1e6
    assert (p50, p95, p99) == pytest.approx(tuple(expected), rel=1e-12, abs=1e-12)
    assert p50 is not None
    assert p95 is not None
    assert p99 is not None
    assert min(values) / 1e6 <= p50 <= p95 <= p99 <= max(values) / 1e6


def test_percentiles_of_a_hand_computed_case() -> None:
    sampler = LatencySampler(16)
    for ms in range(1, 11):  # 1..10 ms
        sampler.record(ms * 1_000_000)
    # linear interpolation: rank (n-1)*q = 4.5 -> 5.5 ms; 8.55 -> 9.55 ms; 8.91 -> 9.91 ms
    assert sampler.percentiles_ms() == pytest.approx((5.5, 9.55, 9.91))


def test_empty_window_has_no_percentiles() -> None:
    assert LatencySampler(8).percentiles_ms() == (None, None, None)


def test_reset_sizes_the_stride_from_the_expected_count() -> None:
    sampler = LatencySampler(1024)
    sampler.reset(expected=1023)
    assert sampler.stride == 1
    sampler.reset(expected=1024 * 5)
    assert sampler.stride == 4
    for v in range(1024 * 5):
        sampler.record(v)
    assert sampler.kept_samples() == list(range(0, 1024 * 5, sampler.stride))
    sampler.reset()
    assert (sampler.stride, sampler.kept, sampler.count) == (1, 0, 0)


@pytest.mark.parametrize("capacity", [0, 1, 3, 1000])
def test_capacity_must_be_a_power_of_two(capacity: int) -> None:
    with pytest.raises(ConfigError, match="power of two"):
        LatencySampler(capacity)

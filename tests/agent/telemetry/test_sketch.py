"""Latency sketches: merged in any order, a quantile stays within the relative accuracy of the
true quantile of everything that went in; the wire form refuses what it cannot hold."""

from __future__ import annotations

import numpy as np
import pytest
from ddsketch import DDSketch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.contracts.sketch import (
    MAX_KEYS,
    RELATIVE_ACCURACY,
    LatencySketch,
    merge_counts,
    quantile,
    sketch_of,
)

latencies = st.lists(
    st.floats(min_value=0.01, max_value=60_000, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=300,
)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(latencies, min_size=1, max_size=5), q=st.floats(0, 1))
def test_merged_quantile_is_within_the_relative_accuracy(
    parts: list[list[float]], q: float
) -> None:
    merged: dict[int, float] = {}
    for part in reversed(parts):  # any order
        merge_counts(merged, sketch_of(part).as_counts())
    values = np.sort(np.concatenate([np.asarray(p) for p in parts]))
    got = quantile(merged, q)
    assert got is not None
    true = float(values[int(np.floor(q * (len(values) - 1)))])
    assert abs(got - true) <= RELATIVE_ACCURACY * true * 1.0001


@settings(max_examples=30, deadline=None)
@given(values=latencies)
def test_agrees_with_the_ddsketch_library(values: list[float]) -> None:
    reference = DDSketch(RELATIVE_ACCURACY)
    for v in values:
        reference.add(v)
    counts = sketch_of(values).as_counts()
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert quantile(counts, q) == pytest.approx(reference.get_quantile_value(q))


def test_weights_and_the_zero_bucket() -> None:
    sketch = sketch_of([0.0, 5.0, 5.0, 50.0], weight=10)
    assert sketch.count == 40
    assert sketch.zero_count == 10
    assert quantile(sketch.as_counts(), 0.0, zero_count=sketch.zero_count) == 0.0
    assert quantile({}, 0.5) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"keys": [3, 2], "counts": [1.0, 1.0]},  # not increasing
        {"keys": [1, 1], "counts": [1.0, 1.0]},
        {"keys": [1], "counts": [1.0, 2.0]},  # misaligned
        {"keys": [1], "counts": [-1.0]},
        {"keys": [1], "counts": [float("nan")]},
        {"keys": [10**9], "counts": [1.0]},
        {"keys": list(range(MAX_KEYS + 1)), "counts": [1.0] * (MAX_KEYS + 1)},
        {"keys": [], "counts": [], "relative_accuracy": 0},
    ],
)
def test_the_wire_form_refuses_what_it_cannot_hold(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        LatencySketch.model_validate(fields)

"""Mergeable latency sketches: what a device sends so the fleet's percentiles can be computed.

A window's p99 cannot be averaged into a fleet p99 (the mean of two devices' p99s is the p99 of
neither, nor of both together). A sketch can be merged: each device sends, per window, how many
latencies fell in each bucket of DDSketch's logarithmic mapping (the ``ddsketch`` package's
``LogarithmicMapping``: bucket ``k`` holds values in ``(gamma^(k-1), gamma^k]`` with
``gamma = (1 + a) / (1 - a)``), and any number of windows and devices add up key by key. A
quantile read off the merged counts is within ``RELATIVE_ACCURACY`` of the true quantile of all
the latencies that went in.

Values are milliseconds. Latencies under ``MIN_MS`` are counted in ``zero_count``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import lru_cache

from ddsketch.mapping import LogarithmicMapping
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "MAX_KEYS",
    "MIN_MS",
    "RELATIVE_ACCURACY",
    "LatencySketch",
    "merge_counts",
    "quantile",
    "sketch_of",
]

RELATIVE_ACCURACY = 0.01
MIN_MS = 1e-3  # 1 us: anything faster is "zero" for a latency
MAX_KEYS = 1024  # 1 us .. hours at 1 % spans about 1,000 keys; a window uses a few dozen


@lru_cache(maxsize=4)
def _mapping(relative_accuracy: float) -> LogarithmicMapping:
    return LogarithmicMapping(relative_accuracy)


class LatencySketch(BaseModel):
    """One window's latencies as counts per logarithmic bucket (see the module doc)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    relative_accuracy: float = Field(default=RELATIVE_ACCURACY, gt=0, lt=1)
    keys: list[int] = Field(default_factory=list, max_length=MAX_KEYS)
    counts: list[float] = Field(default_factory=list, max_length=MAX_KEYS)
    zero_count: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _aligned(self) -> LatencySketch:
        if len(self.keys) != len(self.counts):
            raise ValueError("keys and counts must have the same length")
        if any(b <= a for a, b in zip(self.keys, self.keys[1:], strict=False)):
            raise ValueError("keys must be strictly increasing")
        if any(not (c > 0 and math.isfinite(c)) for c in self.counts):
            raise ValueError("counts must be finite and positive")
        if any(abs(k) > 100_000 for k in self.keys):
            raise ValueError("key out of range")
        return self

    @property
    def count(self) -> float:
        return self.zero_count + sum(self.counts)

    def as_counts(self) -> dict[int, float]:
        return dict(zip(self.keys, self.counts, strict=True))


def sketch_of(
    values_ms: Iterable[float],
    *,
    weight: float = 1.0,
    relative_accuracy: float = RELATIVE_ACCURACY,
) -> LatencySketch:
    """The sketch of ``values_ms``, each standing for ``weight`` latencies (a systematic sample
    of one in ``weight`` stands for the whole window)."""
    mapping = _mapping(relative_accuracy)
    counts: dict[int, float] = {}
    zero = 0.0
    for value in values_ms:
        if not value > MIN_MS:  # also NaN
            zero += weight
            continue
        key = int(mapping.key(value))
        counts[key] = counts.get(key, 0.0) + weight
    keys = sorted(counts)
    return LatencySketch(
        relative_accuracy=relative_accuracy,
        keys=keys,
        counts=[counts[k] for k in keys],
        zero_count=zero,
    )


def merge_counts(into: dict[int, float], counts: Mapping[int, float]) -> dict[int, float]:
    """Add ``counts`` key by key into ``into`` (in place); returns it."""
    for key, count in counts.items():
        into[key] = into.get(key, 0.0) + count
    return into


def quantile(
    counts: Mapping[int, float],
    q: float,
    *,
    zero_count: float = 0.0,
    relative_accuracy: float = RELATIVE_ACCURACY,
) -> float | None:
    """The ``q`` quantile (0..1) of merged counts, in milliseconds; None when empty.

    The rank rule is DDSketch's: the value of the bucket holding rank ``q * (n - 1)``."""
    total = zero_count + sum(counts.values())
    if total <= 0:
        return None
    rank = q * (total - 1)
    if rank < zero_count:
        return 0.0
    seen = zero_count
    mapping = _mapping(relative_accuracy)
    keys = sorted(counts)
    for key in keys:
        seen += counts[key]
        if seen > rank:
            return float(mapping.value(key))
    return float(mapping.value(keys[-1]))

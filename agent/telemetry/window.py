"""Per-model inference statistics over one telemetry window, turned into ``ModelTelemetry``.

Owns the arithmetic (counts, throughput, nearest-rank latency percentiles over a bounded
reservoir of samples). The inference loop calls ``record``/``record_dropped`` from its thread;
the telemetry client calls ``drain`` once per window. Where the loop keeps its own window
statistics it can hand those to the client instead; this class is the ready-made adapter.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from agent.contracts.sketch import sketch_of
from agent.contracts.telemetry import ModelTelemetry

__all__ = ["InferenceWindow", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


@dataclass
class _ModelWindow:
    version: str | None = None
    variant_id: str | None = None
    backend: str | None = None
    count: int = 0
    failed: int = 0
    dropped: int = 0
    samples: list[float] = field(default_factory=list)


class InferenceWindow:
    """Accumulates one window per model; ``drain()`` returns it and starts the next one."""

    def __init__(
        self,
        *,
        now: Callable[[], float] = time.monotonic,
        max_samples: int = 4096,
        rng: random.Random | None = None,
    ) -> None:
        self._now = now
        self._max_samples = max_samples
        self._rng = rng or random.Random(0)
        self._lock = threading.Lock()
        self._models: dict[str, _ModelWindow] = {}
        self._started = now()

    def record(
        self,
        model: str,
        latency_ms: float,
        *,
        ok: bool = True,
        version: str | None = None,
        variant_id: str | None = None,
        backend: str | None = None,
    ) -> None:
        with self._lock:
            win = self._models.setdefault(model, _ModelWindow())
            if version is not None and version != win.version:
                # A swap inside the window: report the version that finishes it.
                win.version, win.variant_id, win.backend = version, variant_id, backend
            win.count += 1
            if not ok:
                win.failed += 1
                return
            if len(win.samples) < self._max_samples:
                win.samples.append(latency_ms)
            else:  # reservoir sampling keeps the percentiles unbiased at bounded memory
                slot = self._rng.randrange(win.count - win.failed)
                if slot < self._max_samples:
                    win.samples[slot] = latency_ms

    def record_dropped(self, model: str, frames: int = 1) -> None:
        with self._lock:
            self._models.setdefault(model, _ModelWindow()).dropped += frames

    def drain(self) -> list[ModelTelemetry]:
        with self._lock:
            now = self._now()
            window_s = max(now - self._started, 1e-6)
            models, self._models, self._started = self._models, {}, now
        out: list[ModelTelemetry] = []
        for name, win in sorted(models.items()):
            lat = sorted(win.samples)
            out.append(
                ModelTelemetry(
                    name=name,
                    version=win.version,
                    variant_id=win.variant_id,
                    backend=win.backend,
                    window_s=window_s,
                    count=win.count,
                    failed=win.failed,
                    dropped=win.dropped,
                    throughput_per_s=(win.count - win.failed) / window_s,
                    latency_p50_ms=percentile(lat, 50) if lat else None,
                    latency_p95_ms=percentile(lat, 95) if lat else None,
                    latency_p99_ms=percentile(lat, 99) if lat else None,
                    latency_sketch=(
                        sketch_of(lat, weight=(win.count - win.failed) / len(lat)) if lat else None
                    ),
                )
            )
        return out

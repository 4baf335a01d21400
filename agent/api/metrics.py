"""Prometheus metrics of the inference API, under the names Triton users already chart.

Owns the ``nv_inference_*`` families (labelled ``model`` and ``version``) and the text served
on ``/metrics``. Other parts of the agent (the daemon's loops, swaps, updates, probation, the
process and its GPU: ``agent.observability``) register their collectors in the
``prometheus_client.CollectorRegistry`` passed to ``InferenceMetrics`` (``registry``); both are
exposed together.

The ``nv_*`` families are written here rather than through ``prometheus_client.Counter``,
which would rename them ``..._total`` and break existing dashboards; durations are cumulative
microseconds, as in Triton. The ``*_summary_us`` families are Triton's summaries: quantiles
0.5, 0.9, 0.95 and 0.99 over the last ``SUMMARY_WINDOW`` requests of each (model, version),
with ``_sum`` and ``_count`` over all of them.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest

__all__ = ["COUNTERS", "GAUGES", "QUANTILES", "SUMMARIES", "SUMMARY_WINDOW", "InferenceMetrics"]

COUNTERS: dict[str, str] = {
    "nv_inference_request_success": "Number of successful inference requests",
    "nv_inference_request_failure": "Number of failed inference requests",
    "nv_inference_count": "Number of inferences performed (a batch of n counts n)",
    "nv_inference_exec_count": "Number of model executions performed (a batch counts once)",
    "nv_inference_request_duration_us": "Cumulative end-to-end inference request duration (us)",
    "nv_inference_queue_duration_us": "Cumulative time requests spent waiting in the queue (us)",
    "nv_inference_compute_input_duration_us": (
        "Cumulative time checking and gathering request inputs (us)"
    ),
    "nv_inference_compute_infer_duration_us": "Cumulative time spent running the model (us)",
    "nv_inference_compute_output_duration_us": "Cumulative time selecting the outputs (us)",
}
GAUGES: dict[str, str] = {
    "nv_inference_pending_request_count": "Requests accepted and not yet answered",
}
SUMMARIES: dict[str, str] = {
    "nv_inference_request_summary_us": "End-to-end request duration (us)",
    "nv_inference_queue_summary_us": "Time in the queue (us)",
    "nv_inference_compute_input_summary_us": "Input checking and gathering time (us)",
    "nv_inference_compute_infer_summary_us": "Model run time (us)",
    "nv_inference_compute_output_summary_us": "Output selection time (us)",
}
QUANTILES = (0.5, 0.9, 0.95, 0.99)
SUMMARY_WINDOW = 1024  # requests per (model, version) the quantiles are taken over


@dataclass(slots=True)
class _Summary:
    window: deque[int] = field(default_factory=lambda: deque(maxlen=SUMMARY_WINDOW))
    total_us: int = 0
    count: int = 0

    def observe(self, us: int) -> None:
        self.window.append(us)
        self.total_us += us
        self.count += 1

    def quantiles(self) -> list[tuple[float, float]]:
        ordered = sorted(self.window)
        if not ordered:
            return [(q, float("nan")) for q in QUANTILES]
        last = len(ordered) - 1
        return [(q, float(ordered[min(last, round(q * last))])) for q in QUANTILES]


@dataclass(slots=True)
class _ModelCounters:
    success: int = 0
    failure: int = 0
    count: int = 0
    exec_count: int = 0
    request_us: int = 0
    queue_us: int = 0
    input_us: int = 0
    compute_us: int = 0
    output_us: int = 0
    pending: int = 0
    summaries: dict[str, _Summary] = field(
        default_factory=lambda: {name: _Summary() for name in SUMMARIES}
    )


class InferenceMetrics:
    """Thread-safe counters per (model, version), and the ``/metrics`` text."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], _ModelCounters] = {}

    def _get(self, model: str, version: str) -> _ModelCounters:
        key = (model, version)
        counters = self._models.get(key)
        if counters is None:
            counters = self._models[key] = _ModelCounters()
        return counters

    def started(self, model: str, version: str) -> None:
        """A request was accepted (``nv_inference_pending_request_count`` + 1)."""
        with self._lock:
            self._get(model, version).pending += 1

    def finished(self, model: str, version: str) -> None:
        """A request ``started`` was answered, successfully or not."""
        with self._lock:
            c = self._get(model, version)
            c.pending = max(0, c.pending - 1)

    def success(
        self,
        model: str,
        version: str,
        *,
        items: int,
        executions: int,
        request_s: float,
        queue_s: float,
        compute_s: float,
        input_s: float = 0.0,
        output_s: float = 0.0,
    ) -> None:
        """One request answered: ``items`` inferences; ``executions`` is 1 for the request
        that accounts for its batch's model run and 0 for the others of that batch."""
        durations = {
            "nv_inference_request_summary_us": int(request_s * 1e6),
            "nv_inference_queue_summary_us": int(queue_s * 1e6),
            "nv_inference_compute_input_summary_us": int(input_s * 1e6),
            "nv_inference_compute_infer_summary_us": int(compute_s * 1e6),
            "nv_inference_compute_output_summary_us": int(output_s * 1e6),
        }
        with self._lock:
            c = self._get(model, version)
            c.success += 1
            c.count += items
            c.exec_count += executions
            c.request_us += durations["nv_inference_request_summary_us"]
            c.queue_us += durations["nv_inference_queue_summary_us"]
            c.input_us += durations["nv_inference_compute_input_summary_us"]
            c.compute_us += durations["nv_inference_compute_infer_summary_us"]
            c.output_us += durations["nv_inference_compute_output_summary_us"]
            for name, us in durations.items():
                c.summaries[name].observe(us)

    def failure(self, model: str, version: str, *, request_s: float) -> None:
        with self._lock:
            c = self._get(model, version)
            c.failure += 1
            c.request_us += int(request_s * 1e6)

    def snapshot(self) -> dict[tuple[str, str], dict[str, float]]:
        with self._lock:
            return {
                key: {
                    "nv_inference_request_success": c.success,
                    "nv_inference_request_failure": c.failure,
                    "nv_inference_count": c.count,
                    "nv_inference_exec_count": c.exec_count,
                    "nv_inference_request_duration_us": c.request_us,
                    "nv_inference_queue_duration_us": c.queue_us,
                    "nv_inference_compute_input_duration_us": c.input_us,
                    "nv_inference_compute_infer_duration_us": c.compute_us,
                    "nv_inference_compute_output_duration_us": c.output_us,
                    "nv_inference_pending_request_count": c.pending,
                }
                for key, c in self._models.items()
            }

    def _summary_lines(self) -> list[str]:
        with self._lock:
            rows = {
                key: {name: (s.quantiles(), s.total_us, s.count) for name, s in c.summaries.items()}
                for key, c in self._models.items()
            }
        lines: list[str] = []
        for name, help_text in SUMMARIES.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} summary")
            for (model, version), summaries in sorted(rows.items()):
                labels = f'model="{_escape(model)}",version="{_escape(version)}"'
                quantiles, total, count = summaries[name]
                for q, value in quantiles:
                    lines.append(f'{name}{{{labels},quantile="{q:g}"}} {value:g}')
                lines.append(f"{name}_sum{{{labels}}} {total}")
                lines.append(f"{name}_count{{{labels}}} {count}")
        return lines

    def exposition(self) -> bytes:
        """Prometheus text format: the ``nv_*`` families, then the shared registry."""
        snap = self.snapshot()
        lines: list[str] = []
        for families, kind in ((COUNTERS, "counter"), (GAUGES, "gauge")):
            for name, help_text in families.items():
                lines.append(f"# HELP {name} {help_text}")
                lines.append(f"# TYPE {name} {kind}")
                for (model, version), values in sorted(snap.items()):
                    lines.append(
                        f'{name}{{model="{_escape(model)}",version="{_escape(version)}"}} '
                        f"{values[name]}"
                    )
        lines += self._summary_lines()
        text = "\n".join(lines) + "\n"
        return text.encode("utf-8") + generate_latest(self.registry)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

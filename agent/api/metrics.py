"""Prometheus metrics of the inference API, under the names Triton users already chart.

Owns the ``nv_inference_*`` counters (labelled ``model`` and ``version``) and the text served on
``/metrics``. Other parts of the agent (updates, swaps) register their own collectors in the
``prometheus_client.CollectorRegistry`` passed to ``InferenceMetrics`` (``registry``); both are
exposed together.

The ``nv_*`` families are written here rather than through ``prometheus_client.Counter``,
which would rename them ``..._total`` and break existing dashboards; durations are cumulative
microseconds, as in Triton.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest

__all__ = ["COUNTERS", "InferenceMetrics"]

COUNTERS: dict[str, str] = {
    "nv_inference_request_success": "Number of successful inference requests",
    "nv_inference_request_failure": "Number of failed inference requests",
    "nv_inference_count": "Number of inferences performed (a batch of n counts n)",
    "nv_inference_exec_count": "Number of model executions performed (a batch counts once)",
    "nv_inference_request_duration_us": "Cumulative end-to-end inference request duration (us)",
    "nv_inference_queue_duration_us": "Cumulative time requests spent waiting in the queue (us)",
    "nv_inference_compute_infer_duration_us": "Cumulative time spent running the model (us)",
}


@dataclass(slots=True)
class _ModelCounters:
    success: int = 0
    failure: int = 0
    count: int = 0
    exec_count: int = 0
    request_us: int = 0
    queue_us: int = 0
    compute_us: int = 0


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
    ) -> None:
        """One request answered: ``items`` inferences; ``executions`` is 1 for the request
        that accounts for its batch's model run and 0 for the others of that batch."""
        with self._lock:
            c = self._get(model, version)
            c.success += 1
            c.count += items
            c.exec_count += executions
            c.request_us += int(request_s * 1e6)
            c.queue_us += int(queue_s * 1e6)
            c.compute_us += int(compute_s * 1e6)

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
                    "nv_inference_compute_infer_duration_us": c.compute_us,
                }
                for key, c in self._models.items()
            }

    def exposition(self) -> bytes:
        """Prometheus text format: the ``nv_*`` families, then the shared registry."""
        snap = self.snapshot()
        lines: list[str] = []
        for name, help_text in COUNTERS.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} counter")
            for (model, version), values in sorted(snap.items()):
                lines.append(
                    f'{name}{{model="{_escape(model)}",version="{_escape(version)}"}} '
                    f"{values[name]}"
                )
        text = "\n".join(lines) + "\n"
        return text.encode("utf-8") + generate_latest(self.registry)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

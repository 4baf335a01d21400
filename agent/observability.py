"""The daemon's own Prometheus collectors, served with the API's ``nv_inference_*`` families on
the local ``/metrics`` (``agent.api.metrics``; names and labels in docs/inference-api.md).

Owns four collectors, all read at scrape time or fed by the event bus, so nothing on the
inference path waits for them:

- ``SystemCollector``: Triton's process and GPU names, ``nv_cpu_utilization`` (0..1),
  ``nv_cpu_memory_total_bytes``, ``nv_cpu_memory_used_bytes`` and, per GPU the board has
  (``gpu_uuid`` label: NVML index or the Jetson's integrated GPU), ``nv_gpu_utilization``
  (0..1), ``nv_gpu_memory_total_bytes``, ``nv_gpu_memory_used_bytes``, ``nv_gpu_power_usage``
  (watts). A value the board does not expose is left out, never written as 0.
- ``LoopCollector``: each inference loop's frames by result (``ok``, ``failed``, ``dropped``)
  and its last window's latency quantiles and throughput.
- ``SpoolCollector``: the MQTT spool's messages and bytes against its bound (an agent that
  cannot reach the broker fills it).
- ``UpdateEventMetrics``: a subscriber of the event bus counting update steps, swaps, rollbacks
  and probations, and whether a model is on probation now.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.contracts.events import UpdateEvent
from agent.contracts.telemetry import SystemMetrics
from agent.logs import get_logger

__all__ = [
    "AGENT_METRICS",
    "LoopCollector",
    "LoopReading",
    "SpoolCollector",
    "SpoolReading",
    "SystemCollector",
    "UpdateEventMetrics",
    "register_daemon_metrics",
]

log = get_logger(__name__)

# Every family this module registers (exposed name -> type); docs and dashboards check against it.
AGENT_METRICS: dict[str, str] = {
    "nv_cpu_utilization": "gauge",
    "nv_cpu_memory_total_bytes": "gauge",
    "nv_cpu_memory_used_bytes": "gauge",
    "nv_gpu_utilization": "gauge",
    "nv_gpu_memory_total_bytes": "gauge",
    "nv_gpu_memory_used_bytes": "gauge",
    "nv_gpu_power_usage": "gauge",
    "edge_agent_loop_frames_total": "counter",
    "edge_agent_loop_latency_ms": "gauge",
    "edge_agent_loop_throughput_hz": "gauge",
    "edge_agent_update_events_total": "counter",
    "edge_agent_swaps_total": "counter",
    "edge_agent_rollbacks_total": "counter",
    "edge_agent_probations_total": "counter",
    "edge_agent_probation_active": "gauge",
    "edge_agent_spool_messages": "gauge",
    "edge_agent_spool_bytes": "gauge",
    "edge_agent_spool_max_bytes": "gauge",
}

# (messages, bytes, max bytes) of the telemetry spool; None before MQTT is started
SpoolReading = tuple[int, int, int] | None
# (model, totals {ok, failed, dropped}, latency quantile ms {0.5, 0.95, 0.99}, throughput Hz)
LoopReading = tuple[str, dict[str, int], dict[str, float | None], float]


class SystemCollector(Collector):
    """CPU, memory and GPU gauges under Triton's names, read at each scrape."""

    def __init__(self, read: Callable[[], SystemMetrics]) -> None:
        self._read = read
        self._lock = threading.Lock()  # NVML and psutil's CPU delta are not for two scrapes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self._lock:
                m = self._read()
        except Exception as exc:  # a scrape must not fail because one sensor did
            log.warning("system_metrics_failed", error=str(exc))
            return
        cpu = GaugeMetricFamily("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]")
        if m.cpu_percent is not None:
            cpu.add_metric([], m.cpu_percent / 100.0)
        yield cpu
        for name, value, help_text in (
            ("nv_cpu_memory_total_bytes", m.memory_total_bytes, "CPU memory total, bytes"),
            ("nv_cpu_memory_used_bytes", m.memory_used_bytes, "CPU memory used, bytes"),
        ):
            family = GaugeMetricFamily(name, help_text)
            if value is not None:
                family.add_metric([], float(value))
            yield family
        families = {
            "nv_gpu_utilization": GaugeMetricFamily(
                "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0]", labels=["gpu_uuid"]
            ),
            "nv_gpu_memory_total_bytes": GaugeMetricFamily(
                "nv_gpu_memory_total_bytes", "GPU total memory, bytes", labels=["gpu_uuid"]
            ),
            "nv_gpu_memory_used_bytes": GaugeMetricFamily(
                "nv_gpu_memory_used_bytes", "GPU used memory, bytes", labels=["gpu_uuid"]
            ),
            "nv_gpu_power_usage": GaugeMetricFamily(
                "nv_gpu_power_usage", "GPU power usage, watts", labels=["gpu_uuid"]
            ),
        }
        for index, gpu in enumerate(m.gpus):
            uuid = f"{index}:{gpu.name or 'gpu'}"
            if gpu.utilization_percent is not None:
                families["nv_gpu_utilization"].add_metric([uuid], gpu.utilization_percent / 100)
            if gpu.memory_total_bytes is not None:
                families["nv_gpu_memory_total_bytes"].add_metric([uuid], gpu.memory_total_bytes)
            if gpu.memory_used_bytes is not None:
                families["nv_gpu_memory_used_bytes"].add_metric([uuid], gpu.memory_used_bytes)
            if gpu.power_w is not None:
                families["nv_gpu_power_usage"].add_metric([uuid], gpu.power_w)
        yield from families.values()


class LoopCollector(Collector):
    """The daemon's inference loops: frames by result, last window's latency and throughput."""

    def __init__(self, readings: Callable[[], Iterable[LoopReading]]) -> None:
        self._readings = readings

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        frames = CounterMetricFamily(
            "edge_agent_loop_frames",
            "Frames the inference loop handled, by result (ok, failed, dropped)",
            labels=["model", "result"],
        )
        latency = GaugeMetricFamily(
            "edge_agent_loop_latency_ms",
            "Inference latency quantiles of the loop's last closed window, milliseconds",
            labels=["model", "quantile"],
        )
        throughput = GaugeMetricFamily(
            "edge_agent_loop_throughput_hz",
            "Successful inferences per second in the loop's last closed window",
            labels=["model"],
        )
        try:
            readings = list(self._readings())
        except Exception as exc:
            log.warning("loop_metrics_failed", error=str(exc))
            readings = []
        for model, totals, quantiles, hz in readings:
            for result, value in totals.items():
                frames.add_metric([model, result], value)
            for q, ms in quantiles.items():
                if ms is not None:
                    latency.add_metric([model, q], ms)
            throughput.add_metric([model], hz)
        yield frames
        yield latency
        yield throughput


class SpoolCollector(Collector):
    """The telemetry spool's fill level; nothing is yielded before MQTT is started."""

    def __init__(self, reading: Callable[[], SpoolReading]) -> None:
        self._reading = reading

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            reading = self._reading()
        except Exception as exc:
            log.warning("spool_metrics_failed", error=str(exc))
            return
        if reading is None:
            return
        messages, size, bound = reading
        yield GaugeMetricFamily(
            "edge_agent_spool_messages", "Messages waiting in the MQTT spool", value=messages
        )
        yield GaugeMetricFamily(
            "edge_agent_spool_bytes", "Bytes waiting in the MQTT spool", value=size
        )
        yield GaugeMetricFamily(
            "edge_agent_spool_max_bytes", "The MQTT spool's bound, bytes", value=bound
        )


class UpdateEventMetrics:
    """Counts the event bus's update steps; subscribe ``on_event`` to an ``EventBus``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._lock = threading.Lock()
        self._probation: set[str] = set()
        self.events = Counter(
            "edge_agent_update_events",
            "Update lifecycle events by model and step (download_started ... committed)",
            ["model", "step"],
            registry=registry,
        )
        self.swaps = Counter(
            "edge_agent_swaps",
            "Hot swaps to another version, by model",
            ["model"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "edge_agent_rollbacks",
            "Rollbacks to the previous version, by model",
            ["model"],
            registry=registry,
        )
        self.probations = Counter(
            "edge_agent_probations",
            "Finished probations by model and outcome (committed, rolled_back)",
            ["model", "outcome"],
            registry=registry,
        )
        self.on_probation = Gauge(
            "edge_agent_probation_active",
            "1 while a model's new version is on probation",
            ["model"],
            registry=registry,
        )

    def on_event(self, event: UpdateEvent) -> None:
        model, step = event.model, event.step
        self.events.labels(model, step).inc()
        if step == "swapped":
            self.swaps.labels(model).inc()
        elif step == "probation_started":
            with self._lock:
                self._probation.add(model)
            self.on_probation.labels(model).set(1)
        elif step in ("committed", "rolled_back"):
            if step == "rolled_back":
                self.rollbacks.labels(model).inc()
            with self._lock:
                was_on_probation = model in self._probation
                self._probation.discard(model)
            if was_on_probation:
                self.probations.labels(model, step).inc()
            self.on_probation.labels(model).set(0)


def register_daemon_metrics(
    registry: CollectorRegistry,
    *,
    system: Callable[[], SystemMetrics],
    loops: Callable[[], Iterable[LoopReading]],
    spool: Callable[[], SpoolReading] = lambda: None,
    subscribe: Callable[[Callable[[UpdateEvent], None]], Any],
) -> UpdateEventMetrics:
    """Register the collectors in ``registry`` and subscribe the event counter."""
    registry.register(SystemCollector(system))
    registry.register(LoopCollector(loops))
    registry.register(SpoolCollector(spool))
    events = UpdateEventMetrics(registry)
    subscribe(events.on_event)
    return events

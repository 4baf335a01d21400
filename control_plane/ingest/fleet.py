"""The fleet as the ingester sees it, in memory: latest state per device and open time buckets.

Pure bookkeeping, no I/O: ``FleetState.apply`` takes a decoded message and the control plane's
receive time; ``take_writes`` hands out what should reach the database now (latest-state rows,
bucket deltas, events) and ``restore`` takes them back when a write failed, so nothing is lost
to a database outage. The writer decides how rows are written; the ingester when.

Duplicates: events are recognised by ``(seq, ts)`` among a device's recent events (and by the
table's unique key across restarts); telemetry by ``(seq, ts)`` among its recent windows.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from agent.contracts.events import UpdateEvent
from agent.contracts.sketch import RELATIVE_ACCURACY, merge_counts
from agent.contracts.telemetry import (
    ModelTelemetry,
    ShadowTelemetry,
    StatePayload,
    SystemMetrics,
    TelemetryPayload,
)
from control_plane.ingest.tables import ZERO_KEY

__all__ = ["BucketDelta", "DeviceView", "FleetLimits", "FleetState", "Writes"]

_RECENT_KEYS = 64  # per device and kind: enough to span a spool replay of in-flight messages


@dataclass(frozen=True)
class FleetLimits:
    """Bounds of the in-memory state and how often rows are written (seconds)."""

    bucket_s: int = 60
    health_window_s: float = 60.0  # the rolled-up health the rollout runner reads
    # Write-behind: a device's latest-state row at most this often (status changes and events
    # at the next flush), an open bucket's delta at most this often (a closed one at once).
    link_write_interval_s: float = 5.0
    bucket_write_interval_s: float = 15.0
    max_devices: int = 100_000
    max_models_per_device: int = 16


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


class _Window:
    __slots__ = ("count", "failed", "p99", "received", "shadow", "version")

    def __init__(
        self,
        received: float,
        version: str | None,
        count: int,
        failed: int,
        p99: float | None,
        *,
        shadow: ShadowTelemetry | None = None,
    ) -> None:
        self.received = received
        self.version = version
        self.count = count
        self.failed = failed
        self.p99 = p99
        self.shadow = shadow


def _shadow_health(wins: list[_Window]) -> dict[str, Any] | None:
    """The newest shadow version's comparison over these windows: samples summed, the metric's
    value and points lost weighted by samples, p99s as medians of the windows'."""
    shadowed = [w for w in wins if w.shadow is not None]
    if not shadowed:
        return None
    newest = shadowed[-1].shadow
    assert newest is not None
    same = [
        w.shadow for w in shadowed if w.shadow is not None and w.shadow.version == newest.version
    ]
    samples = sum(t.samples for t in same)
    scored = [t for t in same if t.samples and t.delta is not None and t.value is not None]
    weight = sum(t.samples for t in scored)
    p99s = [t.latency_p99_ms for t in same if t.latency_p99_ms is not None]
    serving = [t.serving_p99_ms for t in same if t.serving_p99_ms is not None]
    p99 = statistics.median(p99s) if p99s else None
    serving_p99 = statistics.median(serving) if serving else None
    return {
        "version": newest.version,
        "variant_id": newest.variant_id,
        "task": newest.task,
        "metric": newest.metric,
        "samples": samples,
        "skipped": sum(t.skipped for t in same),
        "failed": sum(t.failed for t in same),
        "value": sum(t.value * t.samples for t in scored if t.value is not None) / weight
        if weight
        else None,
        "delta": sum(t.delta * t.samples for t in scored if t.delta is not None) / weight
        if weight
        else None,
        "p99_ms": p99,
        "serving_p99_ms": serving_p99,
        "latency_ratio": p99 / serving_p99 if p99 is not None and serving_p99 else None,
        "busy_share": max(t.busy_share for t in same),
        "reported_at": _iso(shadowed[-1].received),
    }


def _latest(m: ModelTelemetry) -> dict[str, Any]:
    return {
        "version": m.version,
        "variant_id": m.variant_id,
        "backend": m.backend,
        "p50_ms": m.latency_p50_ms,
        "p95_ms": m.latency_p95_ms,
        "p99_ms": m.latency_p99_ms,
        "throughput_per_s": m.throughput_per_s,
        "count": m.count,
        "failed": m.failed,
        "dropped": m.dropped,
        "window_s": m.window_s,
        "shadow": m.shadow.model_dump(mode="json") if m.shadow is not None else None,
    }


class ModelView:
    """One model on one device: its latest window and the recent ones, for health."""

    __slots__ = ("latest", "recent")

    def __init__(self) -> None:
        # The payload object itself (turned into a dict only when a row is written), or the
        # stored dict after a restart.
        self.latest: ModelTelemetry | dict[str, Any] = {}
        self.recent: deque[_Window] = deque()

    def latest_dict(self) -> dict[str, Any]:
        latest = self.latest
        return _latest(latest) if isinstance(latest, ModelTelemetry) else dict(latest)

    def health(self, window_s: float) -> dict[str, Any] | None:
        """Inferences, failures and median p99 of the newest version over the last window."""
        if not self.recent:
            return None
        newest = self.recent[-1]
        horizon = newest.received - window_s
        wins = [w for w in self.recent if w.received >= horizon and w.version == newest.version]
        p99s = [w.p99 for w in wins if w.p99 is not None]
        return {
            "version": newest.version,
            "inferences": sum(w.count for w in wins),
            "failed": sum(w.failed for w in wins),
            "p99_ms": statistics.median(p99s) if p99s else None,
            "windows": len(wins),
            "reported_at": _iso(newest.received),
            "shadow": _shadow_health(wins),
        }


@dataclass
class DeviceView:
    """What the ingester knows of one device (the ``device_links`` row, in memory)."""

    device_id: str
    status: str | None = None
    status_reason: str | None = None
    agent_version: str | None = None
    slots: list[Any] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    state_received_at: float | None = None
    state_device_ts: datetime | None = None
    telemetry_received_at: float | None = None
    telemetry_device_ts: datetime | None = None
    telemetry_seq: int | None = None
    clock_skew_s: float | None = None
    system: SystemMetrics | dict[str, Any] | None = None
    models: dict[str, ModelView] = field(default_factory=dict)
    updates: dict[str, Any] = field(default_factory=dict)
    recent_telemetry: deque[tuple[int, datetime]] = field(
        default_factory=lambda: deque(maxlen=_RECENT_KEYS)
    )
    recent_events: deque[tuple[int, datetime]] = field(
        default_factory=lambda: deque(maxlen=_RECENT_KEYS)
    )
    dirty: bool = False
    urgent: bool = False  # status change or event: written at the next flush
    written_at: float = float("-inf")
    pending: int = 0  # applied messages not yet in a committed row

    def row(self, now: float, health_window_s: float) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name, view in self.models.items():
            models[name] = {**view.latest_dict(), "health": view.health(health_window_s)}
        system = self.system
        if isinstance(system, SystemMetrics):
            system = system.model_dump(mode="json", exclude_defaults=True)
        return {
            "device_id": self.device_id,
            "status": self.status,
            "status_reason": self.status_reason,
            "agent_version": self.agent_version,
            "slots": self.slots,
            "profile": self.profile,
            "state_received_at": _dt(self.state_received_at),
            "state_device_ts": self.state_device_ts,
            "telemetry_received_at": _dt(self.telemetry_received_at),
            "telemetry_device_ts": self.telemetry_device_ts,
            "telemetry_seq": self.telemetry_seq,
            "clock_skew_s": self.clock_skew_s,
            "system": system,
            "models": models,
            "updates": self.updates,
            "updated_at": _dt(now),
        }


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


class BucketDelta:
    """What one (device, model, version, bucket) gained since its last write."""

    __slots__ = (
        "dropped",
        "failed",
        "first_received",
        "inferences",
        "last_received",
        "latency_weight",
        "messages",
        "p50_sum",
        "p95_sum",
        "p99_max",
        "p99_sum",
        "window_s",
        "windows",
        "written_at",
    )

    def __init__(self, received: float) -> None:
        self.windows = self.inferences = self.failed = self.dropped = self.latency_weight = 0
        self.window_s = self.p50_sum = self.p95_sum = self.p99_sum = self.p99_max = 0.0
        self.first_received = self.last_received = received
        self.messages = 0
        self.written_at = received  # an open bucket waits one interval before its first write

    def merge(self, other: BucketDelta) -> None:
        self.windows += other.windows
        self.inferences += other.inferences
        self.failed += other.failed
        self.dropped += other.dropped
        self.latency_weight += other.latency_weight
        self.window_s += other.window_s
        self.p50_sum += other.p50_sum
        self.p95_sum += other.p95_sum
        self.p99_sum += other.p99_sum
        self.p99_max = max(self.p99_max, other.p99_max)
        self.first_received = min(self.first_received, other.first_received)
        self.last_received = max(self.last_received, other.last_received)
        self.messages += other.messages


BucketKey = tuple[str, str, str, int]  # device_id, model, version ("" if unknown), bucket start
SketchKey = tuple[str, str, int]  # model, version ("" if unknown), bucket start


@dataclass
class Writes:
    """One flush's worth of rows; ``messages`` of them become ``stored`` when committed."""

    links: list[dict[str, Any]] = field(default_factory=list)
    buckets: list[tuple[BucketKey, BucketDelta]] = field(default_factory=list)
    sketches: list[tuple[SketchKey, dict[int, float]]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    messages: int = 0
    link_devices: list[tuple[DeviceView, int]] = field(default_factory=list)  # view, messages

    def __bool__(self) -> bool:
        return bool(self.links or self.buckets or self.sketches or self.events)


class FleetState:
    """Applies decoded messages; counts what it refuses (duplicates, over the device bound)."""

    def __init__(self, limits: FleetLimits | None = None) -> None:
        self.limits = limits or FleetLimits()
        self.devices: dict[str, DeviceView] = {}
        self._buckets: dict[BucketKey, BucketDelta] = {}
        self._sketches: dict[SketchKey, dict[int, float]] = {}  # the fleet's, per version
        self._events: list[dict[str, Any]] = []
        self._event_messages = 0
        self.duplicates = 0
        self.dropped_over_limit = 0

    # -- applying --------------------------------------------------------------------------

    def _device(self, device_id: str) -> DeviceView | None:
        view = self.devices.get(device_id)
        if view is None:
            if len(self.devices) >= self.limits.max_devices:
                self.dropped_over_limit += 1
                return None
            view = self.devices[device_id] = DeviceView(device_id)
        return view

    def apply(
        self,
        device_id: str,
        payload: StatePayload | TelemetryPayload | UpdateEvent,
        received: float,
    ) -> bool:
        """Fold one message in; False when it was a duplicate or over a bound (and counted)."""
        view = self._device(device_id)
        if view is None:
            return False
        if isinstance(payload, TelemetryPayload):
            return self._telemetry(view, payload, received)
        if isinstance(payload, StatePayload):
            return self._state(view, payload, received)
        return self._event(view, payload, received)

    def _state(self, view: DeviceView, p: StatePayload, received: float) -> bool:
        # Arrival order, never the device's clock: the broker keeps a publisher's order per topic.
        if p.status != view.status:
            view.urgent = True
        view.status = p.status
        view.status_reason = p.reason
        view.agent_version = p.agent_version
        if p.status == "online":  # the last will carries no models: keep the birth's
            view.slots = [s.model_dump(mode="json") for s in p.models]
            if p.profile is not None:
                view.profile = p.profile.model_dump(mode="json")
        view.state_received_at = received
        view.state_device_ts = p.ts
        view.clock_skew_s = p.ts.timestamp() - received
        view.dirty = True
        view.pending += 1
        return True

    def _telemetry(self, view: DeviceView, p: TelemetryPayload, received: float) -> bool:
        key = (p.seq, p.ts)
        if key in view.recent_telemetry:
            self.duplicates += 1
            return False
        view.recent_telemetry.append(key)
        limits = self.limits
        view.telemetry_received_at = received
        view.telemetry_device_ts = p.ts
        view.telemetry_seq = p.seq
        view.clock_skew_s = p.ts.timestamp() - received
        view.system = p.system
        if view.status is None:  # telemetry before any birth: it is evidently online
            view.status = "online"
            view.urgent = True
        start = int(received // limits.bucket_s) * limits.bucket_s
        horizon = received - limits.health_window_s
        for m in p.models:
            model = view.models.get(m.name)
            if model is None:
                if len(view.models) >= limits.max_models_per_device:
                    self.dropped_over_limit += 1
                    continue
                model = view.models[m.name] = ModelView()
            model.latest = m
            recent = model.recent
            recent.append(
                _Window(received, m.version, m.count, m.failed, m.latency_p99_ms, shadow=m.shadow)
            )
            while recent and recent[0].received < horizon:
                recent.popleft()
            bkey = (view.device_id, m.name, m.version or "", start)
            delta = self._buckets.get(bkey)
            if delta is None:
                delta = self._buckets[bkey] = BucketDelta(received)
            delta.windows += 1
            delta.inferences += m.count
            delta.failed += m.failed
            delta.dropped += m.dropped
            delta.window_s += m.window_s
            if m.latency_p99_ms is not None:
                weight = max(m.count - m.failed, 1)
                delta.latency_weight += weight
                delta.p50_sum += (m.latency_p50_ms or 0.0) * weight
                delta.p95_sum += (m.latency_p95_ms or 0.0) * weight
                delta.p99_sum += m.latency_p99_ms * weight
                delta.p99_max = max(delta.p99_max, m.latency_p99_ms)
            sketch = m.latency_sketch
            if sketch is not None and sketch.relative_accuracy == RELATIVE_ACCURACY:
                bins = self._sketches.setdefault((m.name, m.version or "", start), {})
                merge_counts(bins, sketch.as_counts())
                if sketch.zero_count:
                    bins[ZERO_KEY] = bins.get(ZERO_KEY, 0.0) + sketch.zero_count
            delta.last_received = received
        view.dirty = True
        view.pending += 1
        return True

    def _event(self, view: DeviceView, e: UpdateEvent, received: float) -> bool:
        key = (e.seq, e.ts)
        if key in view.recent_events:
            self.duplicates += 1
            return False
        view.recent_events.append(key)
        self._events.append(
            {
                "device_id": view.device_id,
                "seq": e.seq,
                "device_ts": e.ts,
                "received_at": _dt(received),
                "model": e.model,
                "version": e.version,
                "from_version": e.from_version,
                "step": e.step,
                "reason": e.reason,
                "details": e.details,
            }
        )
        self._event_messages += 1
        view.updates[e.model] = {
            "step": e.step,
            "version": e.version,
            "from_version": e.from_version,
            "reason": e.reason,
            "seq": e.seq,
            "received_at": _iso(received),
        }
        view.dirty = view.urgent = True
        return True

    # -- handing writes out and back -------------------------------------------------------

    def take_writes(self, now: float, *, everything: bool = False) -> Writes:
        """Rows due now: urgent and stale latest-state rows, closed and stale buckets, events.

        ``everything`` hands out every dirty row (shutdown, tests, a forced sync).
        """
        limits = self.limits
        out = Writes()
        for view in self.devices.values():
            if not view.dirty:
                continue
            if everything or view.urgent or now - view.written_at >= limits.link_write_interval_s:
                out.links.append(view.row(now, limits.health_window_s))
                out.link_devices.append((view, view.pending))
                out.messages += view.pending
                view.pending = 0
                view.dirty = view.urgent = False
                view.written_at = now
        due: list[BucketKey] = []
        for bkey, delta in self._buckets.items():
            closed = bkey[3] + limits.bucket_s <= now
            if everything or closed or now - delta.written_at >= limits.bucket_write_interval_s:
                due.append(bkey)
        for bkey in due:
            out.buckets.append((bkey, self._buckets.pop(bkey)))
        out.sketches, self._sketches = list(self._sketches.items()), {}
        out.events, self._events = self._events, []
        out.messages += self._event_messages
        self._event_messages = 0
        return out

    def restore(self, writes: Writes) -> None:
        """Take back rows whose write failed, merged with whatever arrived since."""
        for view, messages in writes.link_devices:
            view.dirty = view.urgent = True
            view.written_at = float("-inf")
            view.pending += messages
        for bkey, delta in writes.buckets:
            current = self._buckets.get(bkey)
            if current is None:
                delta.written_at = float("-inf")
                self._buckets[bkey] = delta
            else:
                current.merge(delta)
                current.written_at = float("-inf")
        for skey, bins in writes.sketches:
            merge_counts(self._sketches.setdefault(skey, {}), bins)
        self._events = writes.events + self._events
        self._event_messages += len(writes.events)

    def load(self, rows: Iterable[dict[str, Any]], now: float) -> None:
        """Start from the stored latest-state rows (status, slots, last update per model)."""
        for row in rows:
            if len(self.devices) >= self.limits.max_devices:
                break
            view = DeviceView(row["device_id"])
            view.status = row.get("status")
            view.status_reason = row.get("status_reason")
            view.agent_version = row.get("agent_version")
            view.slots = list(row.get("slots") or [])
            view.profile = row.get("profile")
            view.state_device_ts = row.get("state_device_ts")
            view.telemetry_device_ts = row.get("telemetry_device_ts")
            view.telemetry_seq = row.get("telemetry_seq")
            view.clock_skew_s = row.get("clock_skew_s")
            view.system = row.get("system")
            for ts_field in ("state_received_at", "telemetry_received_at"):
                value = row.get(ts_field)
                if isinstance(value, datetime):
                    setattr(view, ts_field, value.timestamp())
            view.updates = dict(row.get("updates") or {})
            for name, stored in (row.get("models") or {}).items():
                model = ModelView()
                model.latest = {k: v for k, v in stored.items() if k != "health"}
                view.models[name] = model
            view.written_at = now
            self.devices[view.device_id] = view

    def pending_rows(self) -> int:
        dirty = sum(1 for v in self.devices.values() if v.dirty)
        return dirty + len(self._buckets) + len(self._events)

"""What the demo shows about its fleet: MQTT telemetry and the control plane's device view.

``FleetWatch`` subscribes to the documented topics (``<prefix>/+/state``, ``/telemetry``,
``/events``) like any dashboard would, and keeps per device: online or not, the latest window's
latency percentiles, and running totals of inferences, failures and drops. Devices publish
under the id the control plane gave them; ``merge`` adds the control plane's view
(``GET /v1/devices``: name, labels, reported version and update phase) and so names them.
Rendering is ``demo.fleet``'s job.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from pydantic import ValidationError

from agent.contracts.errors import ContractError
from agent.contracts.events import UpdateEvent
from agent.contracts.telemetry import StatePayload, TelemetryPayload, parse_topic

__all__ = ["DeviceRow", "FleetWatch"]


@dataclass
class DeviceRow:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    device_id: str | None = None  # the control plane's id
    online: bool | None = None
    version: str | None = None
    phase: str | None = None
    last_event: str | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    inferences: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str | None = None


class FleetWatch:
    """An MQTT subscriber keeping one ``DeviceRow`` per device it hears from."""

    def __init__(self, host: str, port: int, *, prefix: str, model: str) -> None:
        self._host, self._port = host, port
        self._prefix = prefix
        self._model = model
        self._rows: dict[str, DeviceRow] = {}  # by MQTT device id
        self._registry: dict[str, dict[str, Any]] = {}  # by device name: the control plane's
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"edgefleet-demo-{id(self):x}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message

    def start(self) -> None:
        self._client.connect(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        for kind in ("state", "telemetry", "events"):
            client.subscribe(f"{self._prefix}/+/{kind}", qos=1)

    def _row(self, name: str) -> DeviceRow:
        row = self._rows.get(name)
        if row is None:
            row = self._rows[name] = DeviceRow(name)
        return row

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            device, kind = parse_topic(msg.topic, self._prefix)
            with self._lock:
                if kind == "state":
                    self._on_state(device, StatePayload.model_validate_json(msg.payload))
                elif kind == "telemetry":
                    self._on_telemetry(device, TelemetryPayload.model_validate_json(msg.payload))
                elif kind == "events":
                    self._on_event(device, UpdateEvent.model_validate_json(msg.payload))
        except (ContractError, ValidationError):
            return  # a dashboard ignores what it cannot read

    def _on_state(self, device: str, state: StatePayload) -> None:
        row = self._row(device)
        row.online = state.status == "online"
        for slot in state.models:
            if slot.name == self._model and slot.version:
                row.version = slot.version

    def _on_telemetry(self, device: str, payload: TelemetryPayload) -> None:
        row = self._row(device)
        row.online = True
        for m in payload.models:
            if m.name != self._model:
                continue
            row.inferences += m.count
            row.failed += m.failed
            row.dropped += m.dropped
            if m.count:
                row.p50_ms, row.p99_ms = m.latency_p50_ms, m.latency_p99_ms
            if m.version:
                row.version = m.version

    def _on_event(self, device: str, event: UpdateEvent) -> None:
        if event.model == self._model:
            self._row(device).last_event = event.step

    def merge(self, devices: Iterable[Mapping[str, Any]]) -> None:
        """Fold in the control plane's ``GET /v1/devices`` answer."""
        with self._lock:
            for d in devices:
                entry: dict[str, Any] = {"id": str(d["id"]), "labels": dict(d.get("labels") or {})}
                for m in (d.get("reported") or {}).get("models") or ():
                    if m.get("name") == self._model:
                        entry["phase"] = m.get("phase")
                        entry["last_error"] = m.get("last_error")
                        entry["version"] = m.get("active_version")
                self._registry[str(d["name"])] = entry

    def rows(self, names: Iterable[str]) -> list[DeviceRow]:
        """One row per device name: its MQTT figures joined with the control plane's view."""
        out = []
        with self._lock:
            for name in names:
                entry = self._registry.get(name, {})
                link = self._rows.get(entry.get("id", "")) or self._rows.get(name)
                row = DeviceRow(**vars(link)) if link is not None else DeviceRow(name)
                row.name = name
                row.device_id = entry.get("id")
                row.labels = entry.get("labels", {})
                row.phase = entry.get("phase")
                row.last_error = entry.get("last_error")
                row.version = entry.get("version") or row.version
                out.append(row)
        return out

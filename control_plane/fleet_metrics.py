"""Fleet gauges on the control plane's ``/metrics``, read from the database at scrape time.

Owns ``FleetCollector``: devices by presence, devices by the version they report serving,
rollouts by status, and how far telemetry ingestion lags. The answer is computed at most once
per ``cache_s`` (several Prometheus servers or a fast scrape interval cost one query set), and
a database error leaves the fleet families out of that scrape instead of failing it.

Presence follows the web page's rule: the MQTT birth / last will where the ingester recorded
one, else heard from over HTTP (poll, state, profile) within ``ONLINE_WINDOW``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session, sessionmaker

from agent.logs import get_logger
from control_plane.db.models import Device

__all__ = ["FLEET_METRICS", "ONLINE_WINDOW", "FleetCollector"]

log = get_logger(__name__)

ONLINE_WINDOW = timedelta(seconds=90)
FLEET_METRICS: dict[str, str] = {
    "edgefleet_fleet_devices": "Devices by presence (online, offline, never_seen)",
    "edgefleet_fleet_device_versions": "Devices by the version they report serving, per model",
    "edgefleet_fleet_rollouts": "Rollouts by status (running, paused, completed, aborted)",
    "edgefleet_fleet_ingest_lag_seconds": (
        "Receive time minus device time of the newest telemetry message, worst online device"
    ),
    "edgefleet_fleet_telemetry_age_seconds": "Seconds since the newest telemetry message",
}
_STATES = ("online", "offline", "never_seen")
_ROLLOUT_STATES = ("running", "paused", "completed", "aborted")


class FleetCollector(Collector):
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        now: Callable[[], datetime],
        cache_s: float = 5.0,
    ) -> None:
        self._sessions = sessions
        self._now = now
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list[GaugeMetricFamily]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < self._cache_s:
                families = self._cached[1]
            else:
                try:
                    families = self._read()
                except Exception as exc:  # a scrape must not fail because the database did
                    log.warning("fleet_metrics_failed", error=str(exc))
                    return
                self._cached = (time.monotonic(), families)
        yield from families

    def _read(self) -> list[GaugeMetricFamily]:
        now = self._now()
        with self._sessions() as session:
            tables = set(inspect(session.get_bind()).get_table_names())
            links = _links(session) if "device_links" in tables else {}
            rollouts = _rollouts(session) if "rollouts" in tables else Counter()
            rows = session.execute(
                select(Device.id, Device.last_seen_at, Device.reported_at, Device.reported)
            ).all()
        states: Counter[str] = Counter()
        versions: Counter[tuple[str, str]] = Counter()
        lag: float | None = None
        newest: datetime | None = None
        for device_id, last_seen, reported_at, reported in rows:
            link = links.get(device_id)
            state = _presence(last_seen, reported_at, link, now)
            states[state] += 1
            for m in (reported or {}).get("models", []) if isinstance(reported, dict) else []:
                if isinstance(m, dict) and m.get("name"):
                    versions[(str(m["name"]), str(m.get("active_version") or ""))] += 1
            if link is not None and link[1] is not None:
                received, device_ts = link[1], link[2]
                newest = received if newest is None else max(newest, received)
                if state == "online" and device_ts is not None:
                    seconds = max(0.0, (received - device_ts).total_seconds())
                    lag = seconds if lag is None else max(lag, seconds)
        devices = GaugeMetricFamily(
            "edgefleet_fleet_devices", FLEET_METRICS["edgefleet_fleet_devices"], labels=["state"]
        )
        for state in _STATES:
            devices.add_metric([state], states[state])
        by_version = GaugeMetricFamily(
            "edgefleet_fleet_device_versions",
            FLEET_METRICS["edgefleet_fleet_device_versions"],
            labels=["model", "version"],
        )
        for (model, version), count in sorted(versions.items()):
            by_version.add_metric([model, version], count)
        by_status = GaugeMetricFamily(
            "edgefleet_fleet_rollouts", FLEET_METRICS["edgefleet_fleet_rollouts"], labels=["status"]
        )
        for status in sorted(set(_ROLLOUT_STATES) | set(rollouts)):
            by_status.add_metric([status], rollouts[status])
        lag_name = "edgefleet_fleet_ingest_lag_seconds"
        lag_family = GaugeMetricFamily(lag_name, FLEET_METRICS[lag_name])
        if lag is not None:
            lag_family.add_metric([], lag)
        age = GaugeMetricFamily(
            "edgefleet_fleet_telemetry_age_seconds",
            FLEET_METRICS["edgefleet_fleet_telemetry_age_seconds"],
        )
        if newest is not None:
            age.add_metric([], max(0.0, (now - newest).total_seconds()))
        return [devices, by_version, by_status, lag_family, age]


def _links(session: Session) -> dict[str, tuple[str | None, datetime | None, datetime | None]]:
    from control_plane.ingest.tables import DeviceLink

    rows = session.execute(
        select(
            DeviceLink.device_id,
            DeviceLink.status,
            DeviceLink.telemetry_received_at,
            DeviceLink.telemetry_device_ts,
        )
    ).all()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _rollouts(session: Session) -> Counter[str]:
    from control_plane.rollouts.tables import RolloutRow

    rows = session.execute(
        select(RolloutRow.status, func.count()).group_by(RolloutRow.status)
    ).all()
    return Counter({str(status): int(count) for status, count in rows})


def _presence(
    last_seen: datetime | None, reported_at: datetime | None, link: Any, now: datetime
) -> str:
    if link is not None and link[0] in ("online", "offline"):
        return str(link[0])
    heard = [t for t in (last_seen, reported_at) if isinstance(t, datetime)]
    if not heard:
        return "never_seen"
    return "online" if now - max(heard) <= ONLINE_WINDOW else "offline"

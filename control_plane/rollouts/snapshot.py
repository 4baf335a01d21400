"""The fleet as one rollout sees it: a ``FleetSnapshot`` built from the database.

Owns how ingested data becomes the controller's ``DeviceStatus``: labels from the device
registry; online, active version, p99 and inference counts from the ingester's
``device_links`` rows (rolled up over its health window); the update phase from the latest
update event for the model (or, without one, the HTTP-reported state) received *after* the
device was assigned. A device none of whose variants fits (by ``agent.contracts.fit``, as the
desired state decides) is ``failed``: it is never offered the version, so it can never serve it.
A ``retrying`` event (a transient or local I/O failure on the device) is still ``updating``.
Every time is the control plane's receive time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.contracts.errors import ContractError
from agent.contracts.fit import fitting
from agent.contracts.manifest import Variant
from agent.contracts.profile import HardwareProfile
from control_plane.db.models import Device, Model, ModelVersion
from control_plane.ingest.tables import DeviceLink
from control_plane.rollouts.controller import (
    DeviceStatus,
    FleetSnapshot,
    RolloutSpec,
    ShadowFigures,
)
from control_plane.rollouts.controller import UpdatePhase as _Phase

__all__ = ["SnapshotDevice", "build_snapshot", "update_phase"]

_FAILED_STEPS = frozenset({"download_failed", "refused", "failed"})
_REPORTED_PHASES: dict[str, _Phase] = {
    "failed": "failed",
    "rolled_back": "rolled_back",
    "committed": "committed",
    "idle": "none",
}


def _ts(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def update_phase(event: Mapping[str, Any] | None, target: str, since: float | None) -> _Phase:
    """The device's progress towards ``target`` from its latest event for the model."""
    if event is None or since is None:
        return "none" if since is None else "pending"
    received = _ts(event.get("received_at"))
    if received is None or received < since:
        return "pending"
    step, version = event.get("step"), event.get("version")
    if step in _FAILED_STEPS and version in (target, None):
        return "failed"
    if step == "removed" and version == target and _rejected(event):
        return "failed"  # the store dropping a version the device just failed comes after it
    if step == "rolled_back":
        return "rolled_back" if event.get("from_version") == target else "pending"
    if version != target:
        return "pending"
    return "committed" if step == "committed" else "updating"


def _rejected(event: Mapping[str, Any]) -> bool:
    return str(event.get("reason") or "").startswith("rejected")


@dataclass(frozen=True)
class SnapshotDevice:
    """A snapshot entry plus what the status view shows beside it."""

    status: DeviceStatus
    p99_window_ms: float | None  # the latest window's p99 (status is the health-window median)
    shadow_phase: str | None = None  # the device's reported phase of its shadow


def _variants(session: Session, spec: RolloutSpec) -> list[Variant] | None:
    """The built variants of the rollout's version, or None when they cannot be read."""
    version = session.execute(
        select(ModelVersion)
        .join(Model, Model.id == ModelVersion.model_id)
        .where(Model.name == spec.model, ModelVersion.version == spec.version)
    ).scalar_one_or_none()
    if version is None or version.status != "ready":
        return None
    try:
        return [Variant.model_validate(r.spec) for r in version.variants if r.archive_sha256]
    except (ValueError, ContractError):
        return None


def _nothing_fits(variants: list[Variant] | None, profile: Any) -> bool:
    if variants is None or not profile:
        return False
    try:
        device = HardwareProfile.model_validate(profile)
    except (ValueError, ContractError):
        return False
    return not fitting(variants, device).ranked


def _reported(device_reported: Mapping[str, Any] | None, model: str) -> Mapping[str, Any] | None:
    for m in (device_reported or {}).get("models", ()):
        if isinstance(m, Mapping) and m.get("name") == model:
            return m
    return None


def _shadow_figures(
    health: Mapping[str, Any] | None, reported: Mapping[str, Any] | None, reported_at: Any
) -> tuple[ShadowFigures | None, str | None]:
    """The device's shadow figures: from its telemetry (rolled up over the health window) when
    it compared anything; a refusal or failure from its reported state (HTTP) otherwise."""
    said = (reported or {}).get("shadow") if reported is not None else None
    phase = said.get("phase") if isinstance(said, Mapping) else None
    if isinstance(said, Mapping) and phase in ("refused", "failed") and said.get("version"):
        figures = ShadowFigures(
            version=str(said["version"]),
            refused=str(said.get("reason") or phase),
            reported_at=_ts(reported_at),
        )
        return figures, str(phase)
    if not health or not health.get("version"):
        return None, str(phase) if phase else None
    try:
        figures = ShadowFigures(
            version=str(health["version"]),
            samples=int(health.get("samples") or 0),
            metric=health.get("metric"),
            value=health.get("value"),
            delta=health.get("delta"),
            latency_ratio=health.get("latency_ratio"),
            p99_ms=health.get("p99_ms"),
            serving_p99_ms=health.get("serving_p99_ms"),
            reported_at=_ts(health.get("reported_at")),
        )
    except ValueError:
        return None, None
    return figures, str(phase) if phase else "running"


def build_snapshot(
    session: Session,
    spec: RolloutSpec,
    assigned_at: Mapping[str, float],
    *,
    exclude: frozenset[str] = frozenset(),
) -> tuple[FleetSnapshot, dict[str, SnapshotDevice]]:
    """Devices the rollout selects or already assigned (minus ``exclude``), as the controller
    wants them, and the same entries by id with the extras for the status view."""
    devices = session.execute(
        select(Device.id, Device.labels, Device.reported, Device.reported_at, Device.profile)
    ).all()
    variants = _variants(session, spec)
    wanted = {
        d.id: d
        for d in devices
        if d.id not in exclude and (d.id in assigned_at or spec.selects(dict(d.labels or {})))
    }
    links: dict[str, Any] = {}
    if wanted:
        rows = session.execute(
            select(
                DeviceLink.device_id,
                DeviceLink.status,
                DeviceLink.slots,
                DeviceLink.models,
                DeviceLink.updates,
            ).where(DeviceLink.device_id.in_(list(wanted)))
        ).all()
        links = {r.device_id: r for r in rows}
    out: dict[str, SnapshotDevice] = {}
    for device_id in sorted(wanted):
        d = wanted[device_id]
        link = links.get(device_id)
        entry: Mapping[str, Any] = (link.models or {}).get(spec.model) or {} if link else {}
        health: Mapping[str, Any] = entry.get("health") or {}
        version = health.get("version") or entry.get("version")
        if version is None and link is not None:
            version = next(
                (s.get("version") for s in link.slots or () if s.get("name") == spec.model), None
            )
        reported = _reported(d.reported, spec.model)
        if version is None and reported is not None:
            version = reported.get("active_version")
        since = assigned_at.get(device_id)
        event = (link.updates or {}).get(spec.model) if link else None
        phase = update_phase(event, spec.version, since)
        if (
            since is not None
            and phase not in ("failed", "rolled_back", "committed")
            and _nothing_fits(variants, d.profile)
        ):
            # The desired state offers this device nothing of the version (no variant fits
            # its profile): it can never serve it, so it failed for its wave.
            phase = "failed"
        if phase == "pending" and event is None and reported is not None and since is not None:
            reported_at = _ts(d.reported_at)
            if reported_at is not None and reported_at >= since:
                phase = _REPORTED_PHASES.get(str(reported.get("phase")), "updating")
        shadow, shadow_phase = _shadow_figures(health.get("shadow"), reported, d.reported_at)
        inferences = int(health.get("inferences") or 0)
        failed = min(int(health.get("failed") or 0), inferences)
        status = DeviceStatus(
            device_id=device_id,
            labels=dict(d.labels or {}),
            online=link is not None and link.status == "online",
            version=version,
            update=phase,
            p99_ms=health.get("p99_ms"),
            inferences=inferences,
            failed=failed,
            reported_at=_ts(health.get("reported_at")),
            shadow=shadow,
        )
        out[device_id] = SnapshotDevice(status, entry.get("p99_ms"), shadow_phase)
    return FleetSnapshot(devices=tuple(s.status for s in out.values())), out

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

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
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

__all__ = ["SnapshotCache", "SnapshotDevice", "build_snapshot", "update_phase"]

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


_DEVICE_COLUMNS = (
    Device.id,
    Device.labels,
    Device.reported,
    Device.reported_at,
    Device.profile,
    Device.enrolled_at,
    Device.changed_at,
)
_LINK_COLUMNS = (
    DeviceLink.device_id,
    DeviceLink.status,
    DeviceLink.slots,
    DeviceLink.models,
    DeviceLink.updates,
    DeviceLink.updated_at,
)


def _entry(
    spec: RolloutSpec, variants: list[Variant] | None, d: Any, link: Any, since: float | None
) -> SnapshotDevice:
    """One device's entry from its registry row ``d`` and its ingester row ``link``."""
    device_id = d.id
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
    return SnapshotDevice(status, entry.get("p99_ms"), shadow_phase)


def build_snapshot(
    session: Session, spec: RolloutSpec, assigned_at: Mapping[str, float]
) -> tuple[FleetSnapshot, dict[str, SnapshotDevice]]:
    """Devices the rollout selects or already assigned, as the controller wants them, and the
    same entries by id with the extras for the status view: one full read, nothing kept."""
    return SnapshotCache(spec).build(session, assigned_at)


FULL_READ_S = 30.0  # seconds: the longest a cached snapshot goes without reading every row
MARGIN_S = 2.0  # seconds: rows stamped this long before the latest stamp read are read again


class SnapshotCache:
    """One rollout's snapshot kept between the runner's ticks, read again only where rows changed.

    A tick at 10,000 devices that read every device and link row spent most of a second
    decoding JSON it had decoded the tick before. This cache keeps the rows and the entries
    built from them. A partial read takes, without their JSON, the ids and stamps of every
    device (``reported_at``, ``enrolled_at``, ``changed_at``: an operator's label edit or the
    device's new profile) and of the link rows whose ``updated_at`` is later than the latest it
    has read minus ``margin_s`` (a writer stamps a row before its transaction commits, and
    replicas' clocks differ a little; every write moves the stamp, ``ingest.merge``); then the
    whole rows of the ids whose stamps differ from the kept rows', and drops the ids gone from
    the registry. An entry is rebuilt when its rows changed or its device's assignment time
    did. A full read, on the first use and at least every ``full_read_s`` by ``clock``, catches
    what no stamp marks (a row edited in the database by hand).
    """

    def __init__(
        self,
        spec: RolloutSpec,
        *,
        full_read_s: float = FULL_READ_S,
        margin_s: float = MARGIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.full_read_s = full_read_s
        self.margin = timedelta(seconds=margin_s)
        self._clock = clock
        self._devices: dict[str, Any] = {}
        self._links: dict[str, Any] = {}
        self._order: list[str] = []
        self._entries: dict[str, tuple[float | None, SnapshotDevice | None]] = {}
        self._link_mark: datetime | None = None  # the latest link stamp read
        self._full_at: float | None = None
        self.full_reads = 0
        self.partial_reads = 0
        self.last_read_full = False

    def build(
        self, session: Session, assigned_at: Mapping[str, float]
    ) -> tuple[FleetSnapshot, dict[str, SnapshotDevice]]:
        """What ``build_snapshot`` returns, from the cached rows refreshed as above."""
        spec = self.spec
        now = self._clock()
        variants = _variants(session, spec)
        self.last_read_full = self._full_at is None or now - self._full_at >= self.full_read_s
        if self.last_read_full:
            self._read_all(session)
            self._full_at = now
            self.full_reads += 1
        else:
            self._read_changed(session)
            self.partial_reads += 1
        out: dict[str, SnapshotDevice] = {}
        for device_id in self._order:
            since = assigned_at.get(device_id)
            cached = self._entries.get(device_id)
            if cached is not None and cached[0] == since:
                entry = cached[1]
            else:
                d = self._devices[device_id]
                entry = None
                if since is not None or spec.selects(dict(d.labels or {})):
                    entry = _entry(spec, variants, d, self._links.get(device_id), since)
                self._entries[device_id] = (since, entry)
            if entry is not None:
                out[device_id] = entry
        return FleetSnapshot(devices=tuple(s.status for s in out.values())), out

    def _read_all(self, session: Session) -> None:
        self._devices = {d.id: d for d in session.execute(select(*_DEVICE_COLUMNS)).all()}
        # every link row, not those of the selected devices: an IN list of 10,000 ids costs
        # more to send than the rows of devices the rollout does not select
        self._links = {r.device_id: r for r in session.execute(select(*_LINK_COLUMNS)).all()}
        self._order = sorted(self._devices)
        self._entries.clear()
        self._link_mark = _latest(None, (r.updated_at for r in self._links.values()))

    def _read_changed(self, session: Session) -> None:
        # Two steps: ids and stamps of the rows stamped since the marks (no JSON to decode),
        # then whole rows only for the ids whose stamps differ from the kept rows'.
        stamps = session.execute(
            select(Device.id, Device.reported_at, Device.enrolled_at, Device.changed_at)
        ).all()
        ids = {r.id for r in stamps}
        reorder = ids != self._devices.keys()
        changed = self._devices.keys() - ids
        for gone in changed:
            del self._devices[gone]
            self._links.pop(gone, None)
        stale = [
            r.id
            for r in stamps
            if (kept := self._devices.get(r.id)) is None
            or (kept.reported_at, kept.enrolled_at, kept.changed_at)
            != (r.reported_at, r.enrolled_at, r.changed_at)
        ]
        for d in self._rows(session, _DEVICE_COLUMNS, Device.id, stale):
            self._devices[d.id] = d
        query = select(DeviceLink.device_id, DeviceLink.updated_at)
        if self._link_mark is not None:
            query = query.where(DeviceLink.updated_at > self._link_mark - self.margin)
        moved = [
            r.device_id
            for r in session.execute(query)
            if (kept := self._links.get(r.device_id)) is None or kept.updated_at != r.updated_at
        ]
        links = self._rows(session, _LINK_COLUMNS, DeviceLink.device_id, moved)
        for r in links:
            self._links[r.device_id] = r
        self._link_mark = _latest(self._link_mark, (r.updated_at for r in links))
        if reorder:
            self._order = sorted(self._devices)
        for device_id in changed.union(stale, moved):
            self._entries.pop(device_id, None)

    @staticmethod
    def _rows(session: Session, columns: tuple[Any, ...], key: Any, ids: list[str]) -> list[Any]:
        rows: list[Any] = []
        for start in range(0, len(ids), 1000):
            rows += session.execute(select(*columns).where(key.in_(ids[start : start + 1000])))
        return rows


def _latest(mark: datetime | None, stamps: Iterable[datetime | None]) -> datetime | None:
    """The latest of ``mark`` and ``stamps``."""
    latest = max((t for t in stamps if t is not None), default=None)
    return mark if latest is None or (mark is not None and mark >= latest) else latest

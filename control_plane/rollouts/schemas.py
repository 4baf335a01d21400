"""The rollouts' HTTP wire models and the status view built from a ``RolloutView``.

Owns request bodies (``RolloutCreate``, ``RolloutNote``) and responses (``RolloutSummary``,
``RolloutPublic`` with per-wave figures, per-device data and the decision log). Per-wave figures
are computed here with the controller's own definitions (a device reports when it runs the new
version and its telemetry was received after its assignment).
"""

from __future__ import annotations

import re
import statistics
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from agent.contracts.enrollment import LabelKey, LabelValue
from agent.contracts.manifest import NAME_RE
from control_plane.rollouts.controller import (
    AssignedDevice,
    RolloutRules,
    RolloutState,
    RolloutStatus,
    ShadowHealth,
    ShadowStage,
    Wave,
    WaveHealth,
)
from control_plane.rollouts.service import RolloutView
from control_plane.rollouts.snapshot import SnapshotDevice
from control_plane.rollouts.tables import RolloutRow

__all__ = [
    "ROLLOUT_ID_RE",
    "RolloutCreate",
    "RolloutDecisionPublic",
    "RolloutDevicePublic",
    "RolloutNote",
    "RolloutPublic",
    "RolloutSummary",
    "ShadowDevicePublic",
    "ShadowPublic",
    "WaveStatus",
    "rollout_public",
    "rollout_summary",
]

# 48 characters, so "rollout:<id>" fits the assignments' created_by column.
ROLLOUT_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RolloutCreate(_Body):
    """A model version to the devices matching ``selector``, in waves, under ``rules``."""

    id: str | None = Field(default=None, pattern=ROLLOUT_ID_RE, description="default: generated")
    model: str = Field(pattern=NAME_RE)
    version: str = Field(pattern=r"^[0-9A-Za-z.+-]{5,64}$")
    selector: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    waves: list[Wave] = Field(
        min_length=1,
        max_length=20,
        examples=[[{"percent": 1, "soak_s": 1800}, {"percent": 10}, {"percent": 100}]],
    )
    rules: RolloutRules = RolloutRules()
    shadow: ShadowStage | None = Field(
        default=None,
        description="a dark launch before the first wave: the version runs beside the serving "
        "one on a share of devices and inferences, never answering, and the waves start only "
        "if it agrees with the serving version and its latency holds",
    )


class RolloutNote(_Body):
    """Optional reason recorded with an operator transition."""

    reason: Annotated[str, Field(max_length=500), AfterValidator(_printable)] | None = None


class WaveStatus(BaseModel):
    index: int
    percent: float | None
    count: int | None
    soak_s: float
    target: int  # devices the wave covers, cumulatively, in today's fleet
    assigned: int  # devices assigned in this wave
    reporting: int
    failed_updates: int
    silent: int  # judged silent at the last evaluation (no report long after the soak)
    error_rate: float | None
    p99_regression: float | None
    p99_increase_ms: float | None
    state: Literal["done", "current", "waiting"]


class RolloutDevicePublic(BaseModel):
    device_id: str
    wave: int
    online: bool
    previous_version: str | None
    version: str | None
    update: str
    baseline_p99_ms: float | None
    p99_ms: float | None  # median over the ingester's health window
    p99_latest_ms: float | None
    inferences: int
    failed: int
    reported_at: datetime | None  # control-plane receive time
    rolled_back: bool
    silent: bool  # no report on the new version long after its wave's soak


class ShadowDevicePublic(BaseModel):
    """One device of the shadow stage: what it reports of the shadow version (its telemetry's
    figures over the ingester's health window, its reported phase)."""

    device_id: str
    online: bool
    serving_version: str | None
    phase: str | None  # downloading, loading, running, refused, failed; None: not heard yet
    reason: str | None
    samples: int
    metric: str | None
    value: float | None
    delta: float | None
    p99_ms: float | None
    serving_p99_ms: float | None
    latency_ratio: float | None
    reported_at: datetime | None


class ShadowPublic(BaseModel):
    stage: ShadowStage
    state: Literal["running", "passed", "held_back", "waiting"]
    health: ShadowHealth | None
    devices: list[ShadowDevicePublic]


class RolloutDecisionPublic(BaseModel):
    at: datetime
    kind: str
    wave: int | None
    devices: int
    detail: str
    actor: str


class RolloutSummary(BaseModel):
    id: str
    model: str
    version: str
    status: RolloutStatus
    wave: int
    waves: int
    assigned: int
    rolled_back: int
    reason: str | None
    created_at: datetime
    created_by: str
    updated_at: datetime


class RolloutPublic(RolloutSummary):
    selector: dict[str, str]
    rules: RolloutRules
    wave_started_at: datetime | None
    fleet_size: int
    health: WaveHealth
    wave_status: list[WaveStatus]
    devices: list[RolloutDevicePublic]
    decisions: list[RolloutDecisionPublic]
    shadow: ShadowPublic | None = None


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)


def rollout_summary(row: RolloutRow, state: RolloutState | None = None) -> RolloutSummary:
    state = state or RolloutState.model_validate(row.state)
    return RolloutSummary(
        id=row.id,
        model=row.model,
        version=row.version,
        status=state.status,
        wave=state.wave,
        waves=len(state.spec.waves),
        assigned=len(state.assigned),
        rolled_back=len(state.rolled_back),
        reason=state.reason,
        created_at=row.created_at,
        created_by=row.created_by,
        updated_at=row.updated_at,
    )


def _reports(a: AssignedDevice, d: SnapshotDevice | None, version: str) -> bool:
    if d is None:
        return False
    s = d.status
    fresh = s.reported_at is not None and s.reported_at >= a.assigned_at
    ok = s.update not in ("failed", "rolled_back")
    return ok and s.version == version and fresh and s.inferences > 0


def _wave_status(view: RolloutView) -> list[WaveStatus]:
    state = view.state
    spec = state.spec
    silent = set(state.silent)
    out: list[WaveStatus] = []
    for i, wave in enumerate(spec.waves):
        members = [a for a in state.assigned if a.wave == i]
        reporting = [a for a in members if _reports(a, view.devices.get(a.device_id), spec.version)]
        failed_updates = sum(
            1
            for a in members
            if (d := view.devices.get(a.device_id)) is not None
            and d.status.update in ("failed", "rolled_back")
        )
        inferences = failed = 0
        ratios: list[float] = []
        increases: list[float] = []
        for a in reporting:
            s = view.devices[a.device_id].status
            inferences += s.inferences
            failed += s.failed
            if s.p99_ms is not None and a.baseline_p99_ms:
                ratios.append(s.p99_ms / a.baseline_p99_ms)
                increases.append(s.p99_ms - a.baseline_p99_ms)
        target = max(w.target(view.fleet_size) for w in spec.waves[: i + 1])
        if state.status == "completed" or i < state.wave:
            phase: Literal["done", "current", "waiting"] = "done"
        elif i == state.wave and state.status != "pending":
            phase = "current"
        else:
            phase = "waiting"
        out.append(
            WaveStatus(
                index=i,
                percent=wave.percent,
                count=wave.count,
                soak_s=wave.soak_s,
                target=target,
                assigned=len(members),
                reporting=len(reporting),
                failed_updates=failed_updates,
                silent=sum(1 for a in members if a.device_id in silent),
                error_rate=failed / inferences if inferences else None,
                p99_regression=statistics.median(ratios) - 1.0 if ratios else None,
                p99_increase_ms=statistics.median(increases) if increases else None,
                state=phase,
            )
        )
    return out


def rollout_public(view: RolloutView) -> RolloutPublic:
    state = view.state
    rolled_back, silent = set(state.rolled_back), set(state.silent)
    devices: list[RolloutDevicePublic] = []
    for a in state.assigned:
        d = view.devices.get(a.device_id)
        s = d.status if d is not None else None
        devices.append(
            RolloutDevicePublic(
                device_id=a.device_id,
                wave=a.wave,
                online=s.online if s else False,
                previous_version=a.previous_version,
                version=s.version if s else None,
                update=s.update if s else "none",
                baseline_p99_ms=a.baseline_p99_ms,
                p99_ms=s.p99_ms if s else None,
                p99_latest_ms=d.p99_window_ms if d else None,
                inferences=s.inferences if s else 0,
                failed=s.failed if s else 0,
                reported_at=_dt(s.reported_at) if s else None,
                rolled_back=a.device_id in rolled_back,
                silent=a.device_id in silent,
            )
        )
    summary = rollout_summary(view.row, state)
    return RolloutPublic(
        shadow=_shadow_public(view),
        **summary.model_dump(),
        selector=state.spec.selector,
        rules=state.spec.rules,
        wave_started_at=_dt(state.wave_started_at),
        fleet_size=view.fleet_size,
        health=state.health,
        wave_status=_wave_status(view),
        devices=devices,
        decisions=[
            RolloutDecisionPublic(
                at=r.at, kind=r.kind, wave=r.wave, devices=r.devices, detail=r.detail, actor=r.actor
            )
            for r in view.decisions
        ],
    )


def _shadow_public(view: RolloutView) -> ShadowPublic | None:
    state = view.state
    stage = state.spec.shadow
    if stage is None:
        return None
    phase: Literal["running", "passed", "held_back", "waiting"]
    if state.stage == "waves":
        phase = "passed"
    elif state.status == "aborted":
        phase = "held_back"
    elif state.status == "pending":
        phase = "waiting"
    else:
        phase = "running"
    devices: list[ShadowDevicePublic] = []
    for s in state.shadowed:
        d = view.devices.get(s.device_id)
        status = d.status if d is not None else None
        f = status.shadow if status is not None else None
        if f is not None and f.version != state.spec.version:
            f = None  # figures of another version are no figures of this stage
        devices.append(
            ShadowDevicePublic(
                device_id=s.device_id,
                online=status.online if status else False,
                serving_version=status.version if status else None,
                phase=d.shadow_phase if d is not None and f is not None else None,
                reason=f.refused if f else None,
                samples=f.samples if f else 0,
                metric=f.metric if f else None,
                value=f.value if f else None,
                delta=f.delta if f else None,
                p99_ms=f.p99_ms if f else None,
                serving_p99_ms=f.serving_p99_ms if f else None,
                latency_ratio=f.latency_ratio if f else None,
                reported_at=_dt(f.reported_at) if f else None,
            )
        )
    return ShadowPublic(stage=stage, state=phase, health=state.shadow_health, devices=devices)

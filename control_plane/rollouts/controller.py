"""The staged-rollout controller: pure decisions from a fleet snapshot, no I/O.

Owns the rollout spec and state models, wave membership (a stable hash of rollout id + device
id, so the same devices are picked whatever order the fleet is listed in), the promote/abort
rules, the optional shadow stage before the waves (a dark launch: the version runs beside the
serving one on a share of devices, never answering, and the waves start only once its outputs
agree with the serving version's and its latency holds), and the operator transitions (pause,
resume, abort). ``RolloutController.advance`` takes
the current state, a ``FleetSnapshot`` and ``now`` and returns the next state plus the actions
to carry out; storing state, building snapshots from ingested telemetry, changing desired
state and sending ``rollback`` commands belong to the caller (the API layer / a scheduler).

No rollout can hang: every assigned device ends a wave reporting on the new version, failed,
or *silent* (no report ``report_timeout_s`` after its wave's soak; counted as failed or left out,
by ``silent_devices``), and a wave in which every device is judged without enough reports aborts.
A device missing from the snapshot (deleted from the registry) is left out of the figures.

Times are controller seconds (e.g. ``time.time()`` on the control plane). A device's
``reported_at`` must be the time the control plane *received* its telemetry, never the
device's own clock, so a device with a skewed clock cannot look fresh or stale.
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "Abort",
    "Action",
    "Assign",
    "AssignedDevice",
    "Complete",
    "DeviceStatus",
    "FleetSnapshot",
    "Promote",
    "Rollback",
    "RolloutController",
    "RolloutRules",
    "RolloutSpec",
    "RolloutState",
    "RolloutStatus",
    "ShadowAssign",
    "ShadowFigures",
    "ShadowHealth",
    "ShadowPassed",
    "ShadowStage",
    "ShadowStop",
    "ShadowedDevice",
    "Wave",
    "WaveHealth",
    "touched_devices",
    "wave_rank",
]

RolloutStatus = Literal["pending", "running", "paused", "aborted", "completed"]
Stage = Literal["shadow", "waves"]
UpdatePhase = Literal["none", "pending", "updating", "committed", "failed", "rolled_back"]
_TERMINAL: frozenset[str] = frozenset({"aborted", "completed"})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- spec ------------------------------------------------------------------------------------


class Wave(_Frozen):
    """A cumulative share of the selected fleet: ``percent`` of it, or ``count`` devices."""

    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    soak_s: float = Field(default=600.0, ge=0)  # healthy this long before the next wave

    @model_validator(mode="after")
    def _one_size(self) -> Wave:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave has exactly one of percent or count")
        return self

    def target(self, fleet_size: int) -> int:
        """How many devices this wave covers (cumulatively) in a fleet of ``fleet_size``."""
        if fleet_size <= 0:
            return 0
        if self.count is not None:
            return min(self.count, fleet_size)
        assert self.percent is not None
        return max(1, min(fleet_size, math.ceil(self.percent / 100.0 * fleet_size - 1e-9)))


class RolloutRules(_Frozen):
    """When to stop: any rule broken aborts the rollout and rolls back every touched device."""

    max_failed_update_share: float = Field(default=0.05, ge=0, le=1)
    # Median over reporting devices of (p99 on the new version / p99 before, same device) - 1.
    max_p99_regression: float = Field(default=0.20, ge=0)
    # ... and the median absolute p99 increase (ms) must exceed this too, so jitter on a fast
    # model (0.3 -> 0.7 ms reads +133 %) never aborts a rollout on the ratio alone.
    min_p99_increase_ms: float = Field(default=1.0, ge=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)  # failed / inferences, new version
    # Latency and error rules are judged, and a wave promoted, only once this many devices
    # (capped at the wave's size) and this share of the assigned devices report.
    min_devices_reporting: int = Field(default=3, ge=1)
    min_reporting_share: float = Field(default=0.5, ge=0, le=1)
    # A device that has not reported on the new version this long after its wave's soak
    # (seconds) is silent; None: wait for every device for ever.
    report_timeout_s: float | None = Field(default=900.0, gt=0)
    # What a silent device counts as: a failed update (towards max_failed_update_share), or
    # skipped (left out of the wave's figures, so the others decide).
    silent_devices: Literal["failed", "skipped"] = "failed"


class ShadowStage(_Frozen):
    """Dark launch before the first wave: ``percent`` of the selected fleet (or ``count``
    devices) load the version beside the one serving and run it on ``sample_share`` of their
    inferences (frames of the loop and API requests), at most ``max_busy_share`` of the
    wall-clock time busy with it, and never answer with it. After ``soak_s`` the waves start if
    enough devices report (the rules' ``min_devices_reporting`` / ``min_reporting_share``) with
    at least ``min_samples`` compared inferences each, and

    - ``delta``, the points of the model's task metric (``agent.contracts.accuracy``: top-1
      agreement, box F1, mask IoU, cosine / retrieval, relative L2) lost against the serving
      version's outputs, weighted by samples over the reporting devices, is at most
      ``max_delta``;
    - the median over devices of (shadow p99 / serving p99 on the same inputs) is at most
      ``max_latency_ratio`` (None: latency not judged).

    Either broken aborts before a single device serves the version. A device that refuses to
    shadow (not enough memory beside the serving version) counts like a failed update."""

    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    soak_s: float = Field(default=600.0, ge=0)
    sample_share: float = Field(default=0.1, gt=0, le=1)
    max_busy_share: float = Field(default=0.25, gt=0, le=1)
    min_samples: int = Field(default=100, ge=1, le=1_000_000)
    max_delta: float = Field(default=1.0, ge=0)
    max_latency_ratio: float | None = Field(default=1.5, gt=0)

    @model_validator(mode="after")
    def _one_size(self) -> ShadowStage:
        if self.percent is not None and self.count is not None:
            raise ValueError("a shadow stage has at most one of percent or count")
        return self

    def target(self, fleet_size: int, first_wave: Wave) -> int:
        """Devices to shadow in a fleet of ``fleet_size`` (default: the first wave's share)."""
        if self.percent is None and self.count is None:
            return first_wave.target(fleet_size)
        return Wave(percent=self.percent, count=self.count).target(fleet_size)


class RolloutSpec(_Frozen):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: str
    version: str
    selector: dict[str, str] = Field(default_factory=dict)  # every label must match
    waves: tuple[Wave, ...] = Field(min_length=1)
    rules: RolloutRules = RolloutRules()
    shadow: ShadowStage | None = None

    @model_validator(mode="after")
    def _growing_waves(self) -> RolloutSpec:
        for attr in ("percent", "count"):
            sizes = [getattr(w, attr) for w in self.waves if getattr(w, attr) is not None]
            if sizes != sorted(sizes):
                raise ValueError(f"wave {attr} values must not decrease")
        return self

    def selects(self, labels: dict[str, str]) -> bool:
        if not self.selector:
            return True
        return all(labels.get(k) == v for k, v in self.selector.items())


# -- fleet input -----------------------------------------------------------------------------


class ShadowFigures(_Frozen):
    """A device's shadow comparison for the rollout's model over the ingester's health window."""

    version: str
    samples: int = Field(default=0, ge=0)  # inferences compared
    metric: str | None = None
    value: float | None = None  # the task metric, mean over the samples (percent)
    delta: float | None = Field(default=None, ge=0)  # points lost vs the serving version
    latency_ratio: float | None = Field(default=None, ge=0)  # shadow p99 / serving p99
    p99_ms: float | None = Field(default=None, ge=0)  # the shadow's p99
    serving_p99_ms: float | None = Field(default=None, ge=0)  # serving p99 on the same inputs
    refused: str | None = None  # why the device does not shadow (memory, load failure)
    reported_at: float | None = None  # control-plane receive time


class DeviceStatus(_Frozen):
    """One device as the control plane currently knows it, for the rollout's model."""

    device_id: str
    labels: dict[str, str] = Field(default_factory=dict)
    online: bool = True
    version: str | None = None  # active version of the rollout's model
    update: UpdatePhase = "none"  # the device's progress towards its desired version
    p99_ms: float | None = Field(default=None, ge=0)  # latest window, active version
    inferences: int = Field(default=0, ge=0)  # over the rollout's current window
    failed: int = Field(default=0, ge=0)
    reported_at: float | None = None  # control-plane receive time of that telemetry
    shadow: ShadowFigures | None = None  # the rollout's version running as a shadow


class FleetSnapshot(_Frozen):
    devices: tuple[DeviceStatus, ...] = ()

    def by_id(self) -> dict[str, DeviceStatus]:
        return {d.device_id: d for d in self.devices}


# -- state -----------------------------------------------------------------------------------


class AssignedDevice(_Frozen):
    device_id: str
    wave: int
    previous_version: str | None
    baseline_p99_ms: float | None  # p99 on the previous version when assigned
    assigned_at: float


class WaveHealth(_Frozen):
    """The last evaluation, for ``edgectl rollout status``.

    ``assigned`` counts the devices judged: assigned, still registered, and not skipped as
    silent. ``silent`` counts the silent ones under either policy (under "failed" they are in
    ``failed_updates`` too).
    """

    assigned: int = 0
    reporting: int = 0
    failed_updates: int = 0
    silent: int = 0
    failed_update_share: float = 0.0
    error_rate: float | None = None
    p99_regression: float | None = None
    p99_increase_ms: float | None = None  # median over reporting devices, new - previous


class ShadowedDevice(_Frozen):
    device_id: str
    assigned_at: float


class ShadowHealth(_Frozen):
    """The shadow stage's last evaluation; ``delta`` and ``latency_ratio`` over the devices
    that reported ``min_samples`` or more."""

    assigned: int = 0
    reporting: int = 0
    refused: int = 0
    silent: int = 0
    samples: int = 0
    metric: str | None = None
    delta: float | None = None
    latency_ratio: float | None = None


class RolloutState(_Frozen):
    spec: RolloutSpec
    status: RolloutStatus = "pending"
    stage: Stage = "waves"
    shadowed: tuple[ShadowedDevice, ...] = ()
    shadow_health: ShadowHealth | None = None
    wave: int = 0
    wave_started_at: float | None = None
    paused_at: float | None = None
    assigned: tuple[AssignedDevice, ...] = ()
    rolled_back: tuple[str, ...] = ()
    silent: tuple[str, ...] = ()  # assigned devices judged silent at the last evaluation
    reason: str | None = None
    health: WaveHealth = WaveHealth()

    @classmethod
    def new(cls, spec: RolloutSpec) -> RolloutState:
        return cls(spec=spec, stage="shadow" if spec.shadow is not None else "waves")

    def assigned_ids(self) -> set[str]:
        return {a.device_id for a in self.assigned}


# -- actions ---------------------------------------------------------------------------------


class Assign(_Frozen):
    """Set these devices' desired version of ``model`` to ``version``."""

    kind: Literal["assign"] = "assign"
    model: str
    version: str
    wave: int
    devices: tuple[str, ...]


class Rollback(_Frozen):
    """Put these devices back on their previous version (desired state + ``rollback`` command)."""

    kind: Literal["rollback"] = "rollback"
    model: str
    devices: tuple[str, ...]
    previous_versions: dict[str, str | None] = Field(default_factory=dict)


class ShadowAssign(_Frozen):
    """Have these devices run ``version`` beside the serving one, never answering with it."""

    kind: Literal["shadow_assign"] = "shadow_assign"
    model: str
    version: str
    devices: tuple[str, ...]
    sample_share: float
    max_busy_share: float


class ShadowStop(_Frozen):
    """End these devices' shadowing of the rollout's version (passed or aborted)."""

    kind: Literal["shadow_stop"] = "shadow_stop"
    model: str
    devices: tuple[str, ...]


class ShadowPassed(_Frozen):
    """The shadow stage held: the waves start."""

    kind: Literal["shadow_passed"] = "shadow_passed"
    detail: str


class Promote(_Frozen):
    kind: Literal["promote"] = "promote"
    wave: int  # the wave now starting


class Abort(_Frozen):
    kind: Literal["abort"] = "abort"
    reason: str


class Complete(_Frozen):
    kind: Literal["complete"] = "complete"


Action = Annotated[
    Assign | Rollback | Promote | Abort | Complete | ShadowAssign | ShadowStop | ShadowPassed,
    Field(discriminator="kind"),
]


@functools.lru_cache(maxsize=1 << 17)
def wave_rank(rollout_id: str, device_id: str) -> int:
    """The device's place in the rollout's order: stable, uniform, independent per rollout.

    Cached: the runner asks for the same (rollout, device) pairs on every pass."""
    digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class _FleetView:
    """One ``advance`` pass's look at the fleet: the selected devices and their rollout order,
    computed once, not once per question (a pass asks for the wave's target and candidates up
    to three times; at 10,000 devices each look costs milliseconds)."""

    def __init__(self, spec: RolloutSpec, fleet: FleetSnapshot) -> None:
        self.fleet = fleet
        self._spec = spec
        wanted = tuple(spec.selector.items())
        self.selected = (
            [d for d in fleet.devices if all(d.labels.get(k) == v for k, v in wanted)]
            if wanted
            else list(fleet.devices)
        )
        self.selected_ids = {d.device_id for d in self.selected}
        self._ordered: list[DeviceStatus] | None = None

    def size(self, assigned: Iterable[str]) -> int:
        """Selected devices, plus assigned ones no longer selected (labels changed, gone)."""
        return len(self.selected_ids) + sum(1 for a in assigned if a not in self.selected_ids)

    def ordered(self) -> list[DeviceStatus]:
        """Selected devices not yet on the version, in the rollout's order."""
        if self._ordered is None:
            spec = self._spec
            pool = [d for d in self.selected if d.version != spec.version]
            pool.sort(key=lambda d: (wave_rank(spec.id, d.device_id), d.device_id))
            self._ordered = pool
        return self._ordered


# -- the controller --------------------------------------------------------------------------


class RolloutController:
    """Decides; never acts. Every method returns ``(new_state, actions)``."""

    def advance(
        self, state: RolloutState, fleet: FleetSnapshot, now: float
    ) -> tuple[RolloutState, list[Action]]:
        if state.status in _TERMINAL or state.status == "paused":
            return state, []
        actions: list[Action] = []
        if state.status == "pending":
            state = state.model_copy(
                update={"status": "running", "wave": 0, "wave_started_at": now}
            )
        view = _FleetView(state.spec, fleet)
        if state.stage == "shadow":
            state, shadow_actions = self._advance_shadow(state, view, now)
            if state.stage == "shadow" or state.status != "running":
                return state, shadow_actions
            actions += shadow_actions
        state, assign = self._fill_wave(state, view, now)
        actions += assign
        devices = fleet.by_id()
        health, silent = self._health(state, devices, now)
        state = state.model_copy(update={"health": health, "silent": silent})
        reason = self._broken_rule(state, health, now)
        if reason is not None:
            aborted, more = self._abort(state, reason)
            return aborted, actions + more
        if not self._wave_done(state, view, health, now):
            return state, actions
        spec = state.spec
        if state.wave + 1 >= len(spec.waves):
            done = state.model_copy(update={"status": "completed"})
            return done, [*actions, Complete()]
        state = state.model_copy(update={"wave": state.wave + 1, "wave_started_at": now})
        actions.append(Promote(wave=state.wave))
        state, assign = self._fill_wave(state, view, now)
        return state, actions + assign

    # -- operator transitions ------------------------------------------------------------

    def pause(self, state: RolloutState, now: float) -> tuple[RolloutState, list[Action]]:
        if state.status not in ("running", "pending"):
            return state, []
        return state.model_copy(update={"status": "paused", "paused_at": now}), []

    def resume(self, state: RolloutState, now: float) -> tuple[RolloutState, list[Action]]:
        if state.status != "paused":
            return state, []
        # The soak clock does not run while paused.
        started = state.wave_started_at
        if started is not None and state.paused_at is not None:
            started += now - state.paused_at
        status: RolloutStatus = "running" if started is not None else "pending"
        return state.model_copy(
            update={"status": status, "paused_at": None, "wave_started_at": started}
        ), []

    def abort(self, state: RolloutState, reason: str) -> tuple[RolloutState, list[Action]]:
        """Operator abort: stops the rollout and rolls back every device it touched."""
        if state.status in _TERMINAL:
            return state, []
        return self._abort(state, reason)

    # -- internals -----------------------------------------------------------------------

    def _abort(self, state: RolloutState, reason: str) -> tuple[RolloutState, list[Action]]:
        touched = tuple(a.device_id for a in state.assigned)
        new = state.model_copy(
            update={
                "status": "aborted",
                "reason": reason,
                "rolled_back": touched,
                "paused_at": None,
            }
        )
        actions: list[Action] = [Abort(reason=reason)]
        if state.stage == "shadow" and state.shadowed:
            actions.append(
                ShadowStop(
                    model=state.spec.model, devices=tuple(s.device_id for s in state.shadowed)
                )
            )
        if touched:
            actions.append(
                Rollback(
                    model=state.spec.model,
                    devices=touched,
                    previous_versions={a.device_id: a.previous_version for a in state.assigned},
                )
            )
        return new, actions

    # -- the shadow stage ----------------------------------------------------------------

    def _advance_shadow(
        self, state: RolloutState, view: _FleetView, now: float
    ) -> tuple[RolloutState, list[Action]]:
        """Fill, judge and end the shadow stage. Returns the state in stage ``waves`` (wave 0
        just started, nothing assigned yet) once it passed."""
        shadow = state.spec.shadow
        assert shadow is not None
        actions: list[Action] = []
        state, fill = self._fill_shadow(state, view, now, shadow)
        actions += fill
        health, silent = self._shadow_health(state, view.fleet.by_id(), now, shadow)
        state = state.model_copy(update={"shadow_health": health, "silent": silent})
        reason = self._shadow_broken(state, health, now, shadow)
        if reason is not None:
            aborted, more = self._abort(state, f"held back before serving: {reason}")
            return aborted, actions + more
        started = state.wave_started_at
        if started is None or now - started < shadow.soak_s:
            return state, actions
        if len(state.shadowed) < self._shadow_target(state, view, shadow) and self._candidates(
            state, view, 1, taken={s.device_id for s in state.shadowed}
        ):
            return state, actions
        if health.assigned > 0 and not self._shadow_reports_enough(state, health):
            return state, actions
        detail = (
            f"shadow held on {health.reporting}/{health.assigned} devices over "
            f"{health.samples} samples: {health.metric or 'metric'} "
            f"-{health.delta or 0.0:.2f} points (max {shadow.max_delta:g})"
            + (
                f", p99 x{health.latency_ratio:.2f} of serving"
                if health.latency_ratio is not None
                else ""
            )
        )
        actions.append(ShadowPassed(detail=detail))
        if state.shadowed:
            actions.append(
                ShadowStop(
                    model=state.spec.model, devices=tuple(s.device_id for s in state.shadowed)
                )
            )
        state = state.model_copy(
            update={"stage": "waves", "wave": 0, "wave_started_at": now, "silent": ()}
        )
        return state, actions

    def _shadow_target(self, state: RolloutState, view: _FleetView, shadow: ShadowStage) -> int:
        size = view.size(s.device_id for s in state.shadowed)
        return shadow.target(size, state.spec.waves[0])

    def _fill_shadow(
        self, state: RolloutState, view: _FleetView, now: float, shadow: ShadowStage
    ) -> tuple[RolloutState, list[Action]]:
        room = self._shadow_target(state, view, shadow) - len(state.shadowed)
        if room <= 0:
            return state, []
        picked = self._candidates(state, view, room, taken={s.device_id for s in state.shadowed})
        # A device can only shadow beside a version it serves.
        picked = [d for d in picked if d.version is not None]
        if not picked:
            return state, []
        new = tuple(ShadowedDevice(device_id=d.device_id, assigned_at=now) for d in picked)
        spec = state.spec
        action = ShadowAssign(
            model=spec.model,
            version=spec.version,
            devices=tuple(d.device_id for d in picked),
            sample_share=shadow.sample_share,
            max_busy_share=shadow.max_busy_share,
        )
        return state.model_copy(update={"shadowed": state.shadowed + new}), [action]

    def _shadow_health(
        self,
        state: RolloutState,
        devices: dict[str, DeviceStatus],
        now: float,
        shadow: ShadowStage,
    ) -> tuple[ShadowHealth, tuple[str, ...]]:
        spec = state.spec
        timeout = spec.rules.report_timeout_s
        gone = refused = reporting = samples = 0
        weighted = 0.0
        ratios: list[float] = []
        metric: str | None = None
        silent: list[str] = []
        for s in state.shadowed:
            d = devices.get(s.device_id)
            if d is None:
                gone += 1
                continue
            f = d.shadow
            fresh = (
                f is not None
                and f.version == spec.version
                and f.reported_at is not None
                and f.reported_at >= s.assigned_at
            )
            if fresh and f is not None and f.refused:
                refused += 1
                continue
            if not fresh or f is None or f.samples < shadow.min_samples or f.delta is None:
                if timeout is not None and now >= s.assigned_at + shadow.soak_s + timeout:
                    silent.append(s.device_id)
                continue
            reporting += 1
            samples += f.samples
            weighted += f.delta * f.samples
            metric = metric or f.metric
            if f.latency_ratio is not None:
                ratios.append(f.latency_ratio)
        n = len(state.shadowed) - gone
        if spec.rules.silent_devices == "skipped":
            n -= len(silent)
        health = ShadowHealth(
            assigned=n,
            reporting=reporting,
            refused=refused,
            silent=len(silent),
            samples=samples,
            metric=metric,
            delta=weighted / samples if samples else None,
            latency_ratio=statistics.median(ratios) if ratios else None,
        )
        return health, tuple(silent)

    def _shadow_reports_enough(self, state: RolloutState, health: ShadowHealth) -> bool:
        rules = state.spec.rules
        needed = min(rules.min_devices_reporting, health.assigned)
        share = math.ceil(rules.min_reporting_share * health.assigned - 1e-9)
        return health.assigned > 0 and health.reporting >= max(needed, share)

    def _shadow_broken(
        self, state: RolloutState, health: ShadowHealth, now: float, shadow: ShadowStage
    ) -> str | None:
        rules = state.spec.rules
        failed = health.refused + (health.silent if rules.silent_devices == "failed" else 0)
        if health.assigned and failed / health.assigned > rules.max_failed_update_share:
            return (
                f"{health.refused} of {health.assigned} devices refused to shadow"
                + (f", {health.silent} silent" if health.silent else "")
                + f" (> {rules.max_failed_update_share:.1%})"
            )
        needed = min(rules.min_devices_reporting, health.assigned)
        if health.assigned and health.reporting >= needed:
            if health.delta is not None and health.delta > shadow.max_delta:
                return (
                    f"shadow {health.metric or 'metric'} -{health.delta:.2f} points vs the serving "
                    f"version over {health.samples} samples on {health.reporting} devices "
                    f"> {shadow.max_delta:g}"
                )
            ratio = health.latency_ratio
            if (
                shadow.max_latency_ratio is not None
                and ratio is not None
                and ratio > shadow.max_latency_ratio
            ):
                return f"shadow p99 x{ratio:.2f} of serving > x{shadow.max_latency_ratio:g}"
        timeout, started = rules.report_timeout_s, state.wave_started_at
        if (
            timeout is not None
            and started is not None
            and state.shadowed
            and now >= started + shadow.soak_s + timeout
            and all(now >= s.assigned_at + shadow.soak_s + timeout for s in state.shadowed)
            and not self._shadow_reports_enough(state, health)
        ):
            return (
                f"only {health.reporting}/{health.assigned} devices reported shadow figures "
                f"{timeout:g} s after the soak"
            )
        return None

    # -- waves ---------------------------------------------------------------------------

    def _target(self, state: RolloutState, view: _FleetView) -> int:
        size = view.size(a.device_id for a in state.assigned)
        # Cumulative: a wave never covers fewer devices than the one before it.
        return max(w.target(size) for w in state.spec.waves[: state.wave + 1])

    def _candidates(
        self,
        state: RolloutState,
        view: _FleetView,
        limit: int | None = None,
        *,
        taken: set[str] | None = None,
    ) -> list[DeviceStatus]:
        """The next devices in the rollout's order (at most ``limit``), skipping ``taken``
        (default: the assigned ones)."""
        if taken is None:
            taken = state.assigned_ids()
        picked: list[DeviceStatus] = []
        for d in view.ordered():
            if d.device_id in taken:
                continue
            picked.append(d)
            if limit is not None and len(picked) >= limit:
                break
        return picked

    def _fill_wave(
        self, state: RolloutState, view: _FleetView, now: float
    ) -> tuple[RolloutState, list[Action]]:
        room = self._target(state, view) - len(state.assigned)
        if room <= 0:
            return state, []
        picked = self._candidates(state, view, room)
        if not picked:
            return state, []
        new = tuple(
            AssignedDevice(
                device_id=d.device_id,
                wave=state.wave,
                previous_version=d.version,
                baseline_p99_ms=d.p99_ms,
                assigned_at=now,
            )
            for d in picked
        )
        spec = state.spec
        action = Assign(
            model=spec.model,
            version=spec.version,
            wave=state.wave,
            devices=tuple(d.device_id for d in picked),
        )
        return state.model_copy(update={"assigned": state.assigned + new}), [action]

    def _deadline(self, state: RolloutState, a: AssignedDevice) -> float | None:
        """When ``a`` turns silent unless it reports; None: never."""
        timeout = state.spec.rules.report_timeout_s
        if timeout is None:
            return None
        return a.assigned_at + state.spec.waves[a.wave].soak_s + timeout

    def _health(
        self, state: RolloutState, devices: dict[str, DeviceStatus], now: float
    ) -> tuple[WaveHealth, tuple[str, ...]]:
        spec = state.spec
        failed_updates = gone = 0
        inferences = failed = 0
        ratios: list[float] = []
        increases: list[float] = []
        reporting = 0
        silent: list[str] = []
        for a in state.assigned:
            d = devices.get(a.device_id)
            if d is None:
                gone += 1
                continue
            if d.update in ("failed", "rolled_back"):
                failed_updates += 1
                continue
            fresh = d.reported_at is not None and d.reported_at >= a.assigned_at
            if d.version != spec.version or not fresh or d.inferences <= 0:
                deadline = self._deadline(state, a)
                if deadline is not None and now >= deadline:
                    silent.append(a.device_id)
                continue
            reporting += 1
            inferences += d.inferences
            failed += d.failed
            if d.p99_ms is not None and a.baseline_p99_ms:
                ratios.append(d.p99_ms / a.baseline_p99_ms)
                increases.append(d.p99_ms - a.baseline_p99_ms)
        n = len(state.assigned) - gone
        if spec.rules.silent_devices == "skipped":
            n -= len(silent)
        else:
            failed_updates += len(silent)
        health = WaveHealth(
            assigned=n,
            reporting=reporting,
            failed_updates=failed_updates,
            silent=len(silent),
            failed_update_share=failed_updates / n if n else 0.0,
            error_rate=failed / inferences if inferences else None,
            p99_regression=statistics.median(ratios) - 1.0 if ratios else None,
            p99_increase_ms=statistics.median(increases) if increases else None,
        )
        return health, tuple(silent)

    def _enough_to_judge(self, state: RolloutState, health: WaveHealth) -> bool:
        needed = min(state.spec.rules.min_devices_reporting, health.assigned)
        return health.assigned > 0 and health.reporting >= needed

    def _broken_rule(self, state: RolloutState, health: WaveHealth, now: float) -> str | None:
        rules = state.spec.rules
        if health.failed_update_share > rules.max_failed_update_share:
            reason = (
                f"failed updates {health.failed_updates}/{health.assigned} "
                f"({health.failed_update_share:.1%}) > {rules.max_failed_update_share:.1%}"
            )
            if health.silent and rules.silent_devices == "failed":
                reason += (
                    f", {health.silent} of them silent {rules.report_timeout_s:g} s after the soak"
                )
            return reason
        if self._enough_to_judge(state, health):
            if health.error_rate is not None and health.error_rate > rules.max_error_rate:
                return f"error rate {health.error_rate:.2%} > {rules.max_error_rate:.2%}"
            regression, increase = health.p99_regression, health.p99_increase_ms
            if (
                regression is not None
                and regression > rules.max_p99_regression
                and (increase is None or increase > rules.min_p99_increase_ms)
            ):
                return (
                    f"p99 latency +{regression:.1%} (+{increase or 0.0:.2f} ms) vs previous "
                    f"> +{rules.max_p99_regression:.1%} and +{rules.min_p99_increase_ms:g} ms"
                )
        if (
            health.assigned > 0
            and self._all_judged(state, now)
            and not self._reports_enough(state, health)
        ):
            return (
                f"only {health.reporting}/{health.assigned} devices reporting "
                f"{rules.report_timeout_s:g} s after the soak"
            )
        return None

    def _all_judged(self, state: RolloutState, now: float) -> bool:
        """Every assigned device's report deadline has passed, and the wave's own."""
        timeout, started = state.spec.rules.report_timeout_s, state.wave_started_at
        if timeout is None or started is None:
            return False
        if now < started + state.spec.waves[state.wave].soak_s + timeout:
            return False
        return all(
            (deadline := self._deadline(state, a)) is not None and now >= deadline
            for a in state.assigned
        )

    def _reports_enough(self, state: RolloutState, health: WaveHealth) -> bool:
        if health.assigned == 0 and health.silent > 0:
            return True  # every device was skipped as silent: nothing left to wait for
        share = math.ceil(state.spec.rules.min_reporting_share * health.assigned - 1e-9)
        return self._enough_to_judge(state, health) and health.reporting >= share

    def _wave_done(
        self, state: RolloutState, view: _FleetView, health: WaveHealth, now: float
    ) -> bool:
        started = state.wave_started_at
        if started is None or now - started < state.spec.waves[state.wave].soak_s:
            return False
        if len(state.assigned) < self._target(state, view) and self._candidates(state, view, 1):
            return False
        return health.assigned == 0 or self._reports_enough(state, health)


def touched_devices(states: Iterable[RolloutState]) -> set[str]:
    """Every device any of these rollouts assigned (for "one active rollout per device")."""
    return {a.device_id for s in states for a in s.assigned} | {
        d.device_id for s in states if s.stage == "shadow" for d in s.shadowed
    }

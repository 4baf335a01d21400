"""The staged-rollout controller: pure decisions from a fleet snapshot, no I/O.

Owns the rollout spec and state models, wave membership (a stable hash of rollout id + device
id, so the same devices are picked whatever order the fleet is listed in), the promote/abort
rules and the operator transitions (pause, resume, abort). ``RolloutController.advance`` takes
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
    "Wave",
    "WaveHealth",
    "touched_devices",
    "wave_rank",
]

RolloutStatus = Literal["pending", "running", "paused", "aborted", "completed"]
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


class RolloutSpec(_Frozen):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: str
    version: str
    selector: dict[str, str] = Field(default_factory=dict)  # every label must match
    waves: tuple[Wave, ...] = Field(min_length=1)
    rules: RolloutRules = RolloutRules()

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


class RolloutState(_Frozen):
    spec: RolloutSpec
    status: RolloutStatus = "pending"
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
        return cls(spec=spec)

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


class Promote(_Frozen):
    kind: Literal["promote"] = "promote"
    wave: int  # the wave now starting


class Abort(_Frozen):
    kind: Literal["abort"] = "abort"
    reason: str


class Complete(_Frozen):
    kind: Literal["complete"] = "complete"


Action = Annotated[Assign | Rollback | Promote | Abort | Complete, Field(discriminator="kind")]


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
        if touched:
            actions.append(
                Rollback(
                    model=state.spec.model,
                    devices=touched,
                    previous_versions={a.device_id: a.previous_version for a in state.assigned},
                )
            )
        return new, actions

    def _target(self, state: RolloutState, view: _FleetView) -> int:
        size = view.size(a.device_id for a in state.assigned)
        # Cumulative: a wave never covers fewer devices than the one before it.
        return max(w.target(size) for w in state.spec.waves[: state.wave + 1])

    def _candidates(
        self, state: RolloutState, view: _FleetView, limit: int | None = None
    ) -> list[DeviceStatus]:
        """The next devices in the rollout's order (at most ``limit``)."""
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
    return {a.device_id for s in states for a in s.assigned}

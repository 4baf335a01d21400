"""Running rollouts in the service: the runner thread, operator transitions, carrying out actions.

Owns the I/O around the pure ``RolloutController``: each tick loads every active rollout, builds
its ``FleetSnapshot`` from the ingested data (``snapshot``), calls ``advance`` and, in the same
transaction as the new state (``store``), carries out the actions:

- ``Assign``: a direct assignment of the version to each device (``created_by =
  rollout:<id>``), then a ``check-update`` command so the device polls now;
- ``Rollback``: the rollout's assignments for those devices are deleted, which puts back what
  applied before; where that is not the device's previous version, that version is pinned;
  then a ``rollback`` command;
- ``Promote`` / ``Abort`` / ``Complete``: a line in the decision log.

``create`` refuses what could never finish: a version that is not ready, whose archives are
not signed TUF targets (``unsigned``, the service's TUF check), or a selector that matches no
enrolled device.

Commands go out after the commit (a device that misses one still converges at its next poll).
One lock serialises the runner and the operator routes in this process; the state row's
revision catches a second writer elsewhere. With several replicas on PostgreSQL, the runner
ticks only in the replica holding the ``rollout-runner`` lease (``lease``,
``control_plane.coordination.RoleLease``); the others renew-or-take it every third of its
lifetime, so a dead runner is replaced within about ``1.33 x lease`` seconds. Every decision
is idempotent: the new state and its actions commit together against the revision read, so a
former leader that wakes up late loses the revision check instead of acting twice. Time
enters as ``clock`` (epoch seconds).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from agent.contracts.manifest import semver_key
from agent.contracts.telemetry import CheckUpdateCommand, RollbackCommand
from agent.logs import get_logger
from control_plane.coordination import RoleLease
from control_plane.db.models import Assignment, Device, Model, ModelVersion, ShadowAssignment
from control_plane.desired import selector_matches
from control_plane.errors import ConflictError, InvalidInputError
from control_plane.ingest.writer import lock_for_write
from control_plane.registry import archive_path, get_version
from control_plane.rollouts import store
from control_plane.rollouts.controller import (
    Abort,
    Action,
    Assign,
    Complete,
    FleetSnapshot,
    Promote,
    Rollback,
    RolloutController,
    RolloutSpec,
    RolloutState,
    ShadowAssign,
    ShadowPassed,
    ShadowStop,
)
from control_plane.rollouts.snapshot import SnapshotCache, SnapshotDevice, build_snapshot
from control_plane.rollouts.tables import RolloutDecisionRow, RolloutRow

__all__ = ["CommandSender", "RolloutService", "RolloutView", "operator_rollback"]

log = get_logger(__name__)
CONTROLLER_ACTOR = "controller"


class CommandSender(Protocol):
    """Carries a command to a device (the ingester's broker link)."""

    def publish_command(
        self, device_id: str, command: CheckUpdateCommand | RollbackCommand
    ) -> bool: ...


@dataclass(frozen=True)
class RolloutView:
    """Everything ``GET /v1/rollouts/{id}`` shows: state, per-device data, the decision log."""

    row: RolloutRow
    state: RolloutState
    devices: dict[str, SnapshotDevice]
    decisions: list[RolloutDecisionRow]
    fleet_size: int


@dataclass
class _Outbox:
    """What to do once the transaction committed."""

    check_update: list[str] = field(default_factory=list)
    rollback: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)


def operator_rollback(
    controller: RolloutController, state: RolloutState, reason: str
) -> tuple[RolloutState, list[Action]]:
    """Roll back every device the rollout touched, whatever its status.

    Active: the controller's abort. Completed: aborted now, with the same rollback. Aborted:
    the rollback again (desired state re-checked, commands re-sent).
    """
    if state.status not in ("aborted", "completed"):
        return controller.abort(state, reason)  # stops a shadow stage's shadows too
    touched = tuple(a.device_id for a in state.assigned)
    new = state.model_copy(update={"status": "aborted", "reason": reason, "rolled_back": touched})
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


def _new_id(model: str, version: str) -> str:
    base = "".join(c if c.isalnum() or c in "._-" else "-" for c in f"{model}-{version}")
    return f"{base[:39]}-{secrets.token_hex(4)}"


MIN_TICK_GAP_S = 0.25  # seconds: the fastest the runner ticks when telemetry keeps arriving


class RolloutService:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        commands: CommandSender | None = None,
        on_desired_changed: Callable[[Iterable[str]], None] = lambda _ids: None,
        clock: Callable[[], float] = time.time,
        interval_s: float = 5.0,
        controller: RolloutController | None = None,
        unsigned: Callable[[Mapping[str, tuple[int, str]]], list[str]] | None = None,
        lease: RoleLease | None = None,
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._lease = lease
        self._wall = wall
        self._commands = commands
        self._on_desired_changed = on_desired_changed
        self._clock = clock
        self.interval_s = interval_s
        self._controller = controller or RolloutController()
        self._unsigned = unsigned
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and by nudge()
        self._nudged = False
        self.min_tick_gap_s = min(MIN_TICK_GAP_S, interval_s)
        self._thread: threading.Thread | None = None
        self.ticks = 0
        self.tick_failures = 0
        self.takeovers = 0  # times this replica became the runner
        # the runner's snapshot of each active rollout, read again where rows changed
        self._snapshots: dict[str, SnapshotCache] = {}
        self._full_reads = 0  # full snapshot reads (every row) the runner made

    # -- the runner ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-runner", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """Device state or events were stored: tick soon (at most every ``min_tick_gap_s``)
        instead of at the next interval, so a wave that just finished reporting is promoted
        (or aborted) within a second, not within ``interval_s``."""
        self._nudged = True
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._lease is not None:
            self._lease.release()  # a clean stop hands the runner over at once

    @property
    def running(self) -> bool:
        """Whether the runner thread was started here."""
        return self._thread is not None

    @property
    def leading(self) -> bool:
        """Whether this replica runs the controller now (always, without a lease)."""
        return self._lease is None or self._lease.held

    def _run(self) -> None:
        # With a lease, wake every third of it to renew (or take it over); tick only while
        # holding it: at once on taking it, then every interval_s.
        lease = self._lease
        wake = self.interval_s if lease is None else min(self.interval_s, lease.ttl_s / 3)
        next_tick = self._wall() + self.interval_s if lease is None else 0.0
        renew_at = float("inf") if lease is None else 0.0
        last_tick = float("-inf")
        first = lease is not None
        while True:
            if not first:
                deadline = renew_at
                if lease is None or lease.held:
                    deadline = min(deadline, next_tick)
                    if self._nudged:  # news: tick once the minimum gap since the last passed
                        deadline = min(deadline, last_tick + self.min_tick_gap_s)
                self._wake.wait(max(0.0, deadline - self._wall()))
                self._wake.clear()
            if self._stop.is_set():
                return
            first = False
            now = self._wall()
            if lease is not None and now >= renew_at - wake / 10:
                renew_at = now + wake
                was_leading = lease.held
                if not lease.hold():
                    self._nudged = False  # another replica runs the controller
                    continue
                if not was_leading:
                    self.takeovers += 1
                    next_tick = 0.0
            if lease is not None and not lease.held:
                self._nudged = False
                continue
            nudged = self._nudged and now >= last_tick + self.min_tick_gap_s
            if not nudged and now < next_tick - wake / 10:  # a hair early still ticks
                continue
            self._nudged = False
            last_tick = now
            next_tick = now + self.interval_s
            full_reads = self._full_reads
            try:
                self.tick()
            except Exception:  # keep running: the next tick retries from the stored state
                self.tick_failures += 1
                log.exception("rollout_tick_failed")
            # nudged ticks cost at most about a fifth of a core, however large the fleet; a
            # tick that read every row (every FULL_READ_S) does not set the pace of the others
            if self._full_reads == full_reads:
                self.min_tick_gap_s = max(
                    min(MIN_TICK_GAP_S, self.interval_s), 4 * (self._wall() - now)
                )

    def tick(self) -> dict[str, list[Action]]:
        """Advance every active rollout once; the actions taken, by rollout id."""
        with self._sessions() as session:
            ids = store.active_ids(session)
        with self._lock:
            for gone in self._snapshots.keys() - set(ids):
                del self._snapshots[gone]
        taken: dict[str, list[Action]] = {}
        for rollout_id in ids:
            try:
                actions = self._step(rollout_id, self._advance)
            except ConflictError:
                log.info("rollout_tick_conflict", rollout_id=rollout_id)
                continue
            if actions:
                taken[rollout_id] = actions
        self.ticks += 1
        return taken

    def _advance(
        self, state: RolloutState, snapshot: Callable[[], FleetSnapshot]
    ) -> tuple[RolloutState, list[Action]]:
        return self._controller.advance(state, snapshot(), self._clock())

    # -- operator transitions --------------------------------------------------------------

    def create(
        self,
        *,
        model: str,
        version: str,
        selector: dict[str, str],
        waves: Sequence[object],
        rules: object,
        actor: str,
        rollout_id: str | None = None,
        shadow: object = None,
    ) -> RolloutState:
        try:
            semver_key(version)
        except ValueError as exc:
            raise InvalidInputError(str(exc), field="version") from exc
        now = self._clock()
        try:
            spec = RolloutSpec.model_validate(
                {
                    "id": rollout_id or _new_id(model, version),
                    "model": model,
                    "version": version,
                    "selector": selector,
                    "waves": waves,
                    "rules": rules,
                    "shadow": shadow,
                }
            )
        except ValueError as exc:
            raise InvalidInputError(str(exc).splitlines()[0]) from exc
        with self._lock, self._sessions() as session, session.begin():
            lock_for_write(session)
            row = get_version(session, model, version)
            if row.status != "ready":
                raise ConflictError(f"{model} {version} is {row.status}, not ready")
            archives = {
                archive_path(model, version, v.variant_id): (v.archive_size, v.archive_sha256)
                for v in row.variants
                if v.archive_sha256 is not None and v.archive_size is not None
            }
            if not archives:
                raise ConflictError(f"{model} {version} has no accepted variant")
            unsigned = self._unsigned(archives) if self._unsigned is not None else []
            if unsigned:
                raise ConflictError(
                    f"{model} {version}: {len(unsigned)} archive(s) are not signed TUF targets "
                    f"yet ({', '.join(unsigned)}); devices would refuse them"
                )
            labels = session.scalars(select(Device.labels)).all()
            if not any(spec.selects(dict(lab or {})) for lab in labels):
                raise InvalidInputError(
                    f"{_selector_text(spec.selector)} matches no enrolled device",
                    field="selector",
                )
            active = store.active_ids(session, model=model)
            if active:
                raise ConflictError(
                    f"rollout {active[0]!r} of {model} is still active: finish, abort or wait"
                )
            state = RolloutState.new(spec)
            store.insert(session, state, actor=actor, now=now)
            store.record(
                session,
                spec.id,
                "create",
                now=now,
                actor=actor,
                detail=f"{model} {version} to {spec.selector or 'every device'}, "
                f"{len(spec.waves)} waves"
                + (", a shadow stage first" if spec.shadow is not None else ""),
            )
        log.info("rollout_created", rollout_id=spec.id, model=model, version=version, by=actor)
        return state

    def pause(self, rollout_id: str, *, actor: str) -> RolloutState:
        return self._operator(
            rollout_id, "pause", actor, lambda s: self._controller.pause(s, self._clock())
        )

    def resume(self, rollout_id: str, *, actor: str) -> RolloutState:
        return self._operator(
            rollout_id, "resume", actor, lambda s: self._controller.resume(s, self._clock())
        )

    def abort(self, rollout_id: str, *, actor: str, reason: str | None = None) -> RolloutState:
        why = reason or f"aborted by {actor}"
        return self._operator(rollout_id, "abort", actor, lambda s: self._controller.abort(s, why))

    def rollback(self, rollout_id: str, *, actor: str, reason: str | None = None) -> RolloutState:
        why = reason or f"rolled back by {actor}"
        return self._operator(
            rollout_id, "rollback", actor, lambda s: operator_rollback(self._controller, s, why)
        )

    def _operator(
        self,
        rollout_id: str,
        kind: str,
        actor: str,
        transition: Callable[[RolloutState], tuple[RolloutState, list[Action]]],
    ) -> RolloutState:
        result: list[RolloutState] = []

        def step(
            state: RolloutState, _snapshot: Callable[[], FleetSnapshot]
        ) -> tuple[RolloutState, list[Action]]:
            new, actions = transition(state)
            if new == state and not actions:
                raise ConflictError(f"rollout {rollout_id!r} is {state.status}: cannot {kind}")
            result.append(new)
            return new, actions

        self._step(rollout_id, step, actor=actor, note=kind)
        log.info("rollout_transition", rollout_id=rollout_id, transition=kind, by=actor)
        return result[0]

    # -- one transaction: load, decide, act, save ------------------------------------------

    def _step(
        self,
        rollout_id: str,
        decide: Callable[
            [RolloutState, Callable[[], FleetSnapshot]], tuple[RolloutState, list[Action]]
        ],
        *,
        actor: str = CONTROLLER_ACTOR,
        note: str | None = None,
    ) -> list[Action]:
        outbox = _Outbox()
        with self._lock:
            with self._sessions() as session, session.begin():
                lock_for_write(session)
                row, state = store.load(session, rollout_id)

                def snapshot() -> FleetSnapshot:
                    assigned = {a.device_id: a.assigned_at for a in state.assigned}
                    cache = self._snapshots.get(rollout_id)
                    if cache is None or cache.spec != state.spec:
                        cache = self._snapshots[rollout_id] = SnapshotCache(state.spec)
                    fleet, _ = cache.build(session, assigned)
                    self._full_reads += cache.last_read_full
                    return fleet

                new, actions = decide(state, snapshot)
                if new == state and not actions:
                    return []
                now = self._clock()
                if note is not None and not actions:  # actions log themselves, with reasons
                    store.record(session, rollout_id, note, now=now, actor=actor, wave=new.wave)
                for action in actions:
                    self._carry_out(session, new, action, outbox, actor=actor, now=now)
                store.save(session, row, new, now=now)
            self._after_commit(rollout_id, new, outbox)
        return actions

    def _carry_out(
        self,
        session: Session,
        state: RolloutState,
        action: Action,
        outbox: _Outbox,
        *,
        actor: str,
        now: float,
    ) -> None:
        rid = state.spec.id
        if isinstance(action, Assign):
            version = get_version(session, action.model, action.version)
            for device_id in action.devices:
                session.add(
                    Assignment(
                        model_id=version.model_id,
                        version_id=version.id,
                        device_id=device_id,
                        selector=None,
                        created_at=datetime.fromtimestamp(now, timezone.utc),
                        created_by=f"rollout:{rid}",
                    )
                )
            outbox.check_update += action.devices
            outbox.changed.update(action.devices)
            store.record(
                session,
                rid,
                "assign",
                now=now,
                actor=actor,
                wave=action.wave,
                devices=len(action.devices),
                detail=f"{action.version} to {len(action.devices)} devices",
            )
        elif isinstance(action, Rollback):
            self._restore_desired(session, rid, action, now)
            outbox.rollback += action.devices
            outbox.changed.update(action.devices)
            store.record(
                session,
                rid,
                "rollback",
                now=now,
                actor=actor,
                devices=len(action.devices),
                detail=f"{len(action.devices)} devices back to their previous version",
            )
        elif isinstance(action, ShadowAssign):
            version = get_version(session, action.model, action.version)
            for device_id in action.devices:
                session.add(
                    ShadowAssignment(
                        model_id=version.model_id,
                        version_id=version.id,
                        device_id=device_id,
                        rollout_id=rid,
                        sample_share=action.sample_share,
                        max_busy_share=action.max_busy_share,
                        created_at=datetime.fromtimestamp(now, timezone.utc),
                    )
                )
            outbox.check_update += action.devices
            outbox.changed.update(action.devices)
            store.record(
                session,
                rid,
                "shadow",
                now=now,
                actor=actor,
                devices=len(action.devices),
                detail=f"{action.version} as a shadow on {len(action.devices)} devices "
                f"({action.sample_share:.0%} of inferences, at most "
                f"{action.max_busy_share:.0%} busy)",
            )
        elif isinstance(action, ShadowStop):
            session.execute(
                delete(ShadowAssignment)
                .where(ShadowAssignment.rollout_id == rid)
                .where(ShadowAssignment.device_id.in_(list(action.devices)))
                .execution_options(synchronize_session=False)
            )
            outbox.check_update += action.devices
            outbox.changed.update(action.devices)
        elif isinstance(action, ShadowPassed):
            store.record(
                session, rid, "shadow_passed", now=now, actor=actor, wave=0, detail=action.detail
            )
        elif isinstance(action, Promote):
            h = state.health
            store.record(
                session,
                rid,
                "promote",
                now=now,
                actor=actor,
                wave=action.wave,
                detail=f"wave {action.wave} healthy: {h.reporting}/{h.assigned} reporting, "
                f"p99 {_pct(h.p99_regression)}, errors "
                f"{'n/a' if h.error_rate is None else f'{h.error_rate:.2%}'}"
                + (f", {h.silent} silent" if h.silent else ""),
            )
        elif isinstance(action, Abort):
            store.record(
                session, rid, "abort", now=now, actor=actor, wave=state.wave, detail=action.reason
            )
        elif isinstance(action, Complete):
            store.record(session, rid, "complete", now=now, actor=actor, wave=state.wave)

    def _restore_desired(self, session: Session, rid: str, action: Rollback, now: float) -> None:
        model = session.scalar(select(Model).where(Model.name == action.model))
        if model is None:
            return
        tag = f"rollout:{rid}"
        devices = list(action.devices)
        session.execute(
            delete(Assignment)
            .where(Assignment.created_by == tag, Assignment.model_id == model.id)
            .where(Assignment.device_id.in_(devices))
            .execution_options(synchronize_session=False)
        )
        remaining = session.scalars(
            select(Assignment).where(Assignment.model_id == model.id).order_by(Assignment.id.desc())
        ).all()
        versions = {
            v.version: v
            for v in session.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id))
        }
        by_id = {v.id: v.version for v in versions.values()}
        labels: dict[str, dict[str, str]] = {
            row.id: row.labels
            for row in session.execute(
                select(Device.id, Device.labels).where(Device.id.in_(devices))
            )
        }
        for device_id in devices:
            previous = action.previous_versions.get(device_id)
            if previous is None or device_id not in labels:
                continue
            effective = _effective_version(remaining, device_id, labels[device_id] or {}, by_id)
            target = versions.get(previous)
            if (
                effective == previous
                or target is None
                or not any(v.archive_sha256 for v in target.variants)
            ):
                continue
            session.add(
                Assignment(
                    model_id=model.id,
                    version_id=target.id,
                    device_id=device_id,
                    selector=None,
                    created_at=datetime.fromtimestamp(now, timezone.utc),
                    created_by=tag,
                )
            )

    def _after_commit(self, rollout_id: str, state: RolloutState, outbox: _Outbox) -> None:
        if outbox.changed:
            self._on_desired_changed(sorted(outbox.changed))
        if self._commands is None:
            return
        issued = datetime.fromtimestamp(self._clock(), timezone.utc)
        for device_id in outbox.check_update:
            self._commands.publish_command(
                device_id,
                CheckUpdateCommand(
                    id=secrets.token_hex(8), issued_at=issued, command="check-update"
                ),
            )
        for device_id in outbox.rollback:
            self._commands.publish_command(
                device_id,
                RollbackCommand(
                    id=secrets.token_hex(8),
                    issued_at=issued,
                    command="rollback",
                    model=state.spec.model,
                    rollout_id=rollout_id,
                ),
            )

    # -- reading ---------------------------------------------------------------------------

    def view(self, rollout_id: str) -> RolloutView:
        with self._sessions() as session:
            row, state = store.load(session, rollout_id)
            assigned = {a.device_id: a.assigned_at for a in state.assigned}
            fleet, devices = build_snapshot(session, state.spec, assigned)
            selected = {d.device_id for d in fleet.devices if state.spec.selects(d.labels)}
            size = len(selected | set(assigned))
            return RolloutView(row, state, devices, store.decisions(session, rollout_id), size)

    def list(self) -> list[RolloutRow]:
        with self._sessions() as session:
            return list(store.summaries(session))


def _effective_version(
    assignments: Sequence[Assignment],
    device_id: str,
    labels: dict[str, str],
    versions_by_id: dict[int, str],
) -> str | None:
    """The version the remaining assignments give this device (``desired``'s precedence)."""
    for a in assignments:
        if a.device_id == device_id:
            return versions_by_id.get(a.version_id)
    for a in assignments:
        if a.device_id is None and a.selector is not None and selector_matches(a.selector, labels):
            return versions_by_id.get(a.version_id)
    return None


def _selector_text(selector: Mapping[str, str]) -> str:
    if not selector:
        return "{} (every device)"
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"

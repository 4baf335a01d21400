"""The driver of an update on one model slot: swap, probation, commit or rollback, and boot.

A thin layer: the decisions are ``agent.models.probation``'s pure functions; this module carries
them out on the slot (``agent.models.slots``), the store pointer (``agent.models.store``) and the
journal, in the order that ``agent.models.probation`` documents so that a crash at any point resumes
or rolls back on the next start. Time enters as ``now`` (wall-clock seconds). Each step is an event
on the bus.

Downloading and verifying bundles belongs to ``agent.updates``; it calls ``store.install`` and
then ``ModelActivator.update``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.contracts.events import EventStep
from agent.errors import AgentError, ModelError, StoreError
from agent.events import EventBus
from agent.logs import get_logger
from agent.models.probation import (
    BootPlan,
    Limits,
    UpdateJournal,
    UpdateRecord,
    Verdict,
    awaiting_evidence,
    begin,
    begin_rollback,
    failed,
    finish_rollback,
    judge,
    mark_committed,
    on_boot,
    start_rollback,
    swapped,
)
from agent.models.slots import ModelSlot, SwapReport
from agent.models.store import ModelStore

__all__ = ["ModelActivator"]

log = get_logger(__name__)


class ModelActivator:
    """Carries one slot through updates; one instance per served model."""

    def __init__(
        self,
        slot: ModelSlot,
        *,
        journal: UpdateJournal,
        limits: Limits,
        bus: EventBus | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.slot = slot
        self.store: ModelStore = slot.store
        self.name = slot.name
        self.journal = journal
        self.limits = limits
        self._bus = bus
        self._now = now
        self._lock = threading.RLock()

    def record(self) -> UpdateRecord | None:
        return self.journal.load(self.name)

    # --- boot --------------------------------------------------------------------------------

    def boot(self, *, resume: bool = True) -> BootPlan:
        """Decide from the journal and the pointer what to serve, count this start, serve it,
        and (``resume``) retry a swap that a crash interrupted. Run ``store.recover()`` first."""
        with self._lock:
            record = self.journal.load(self.name)
            plan = on_boot(
                record, active=self.store.active(self.name), limits=self.limits, now=self._now()
            )
            if plan.record is not None and plan.record != record:
                self.journal.save(plan.record)  # counted before anything that could crash
            if plan.pointer is not None:
                self.store.set_pointer(self.name, *plan.pointer)
            if plan.serve is not None:
                self._serve_at_boot(plan.serve)
            if plan.reason is not None and plan.record is not None:
                step: EventStep = "rolled_back" if plan.record.phase == "rolled_back" else "failed"
                self._emit(
                    step,
                    version=self.slot.version or None,
                    from_version=plan.record.to_version,
                    reason=plan.reason,
                )
                log.warning(
                    "update_resolved_at_boot",
                    model=self.name,
                    phase=plan.record.phase,
                    reason=plan.reason,
                )
            if plan.retry_swap and resume and plan.record is not None:
                with contextlib.suppress(AgentError):  # failure is journaled and emitted
                    self._swap_and_start_probation(plan.record)
            return plan

    def _serve_at_boot(self, version: str) -> None:
        try:
            self.slot.start(version)
            return
        except ModelError as exc:
            pointer = self.store.pointer(self.name)
            previous = pointer.previous if pointer else None
            if previous is None or previous == version or not self.store.has(self.name, previous):
                raise
            reason = f"{version} does not come up at start-up ({exc}); serving {previous}"
        log.error("boot_fallback", model=self.name, version=version, previous=previous)
        self.store.set_pointer(self.name, previous, None)
        self.slot.start(previous)
        self._emit("rolled_back", version=previous, from_version=version, reason=reason)

    # --- update ------------------------------------------------------------------------------

    def update(self, version: str) -> SwapReport:
        """Swap to an installed ``version`` and put it on probation. On failure the old version
        keeps serving, the journal says ``failed`` and the rejected version leaves the store."""
        with self._lock:
            current = self.slot.version or self.store.active(self.name)
            if current == version:
                raise StoreError(f"{self.name} {version} is already serving")
            previous = self.journal.load(self.name)
            if previous is not None and awaiting_evidence(previous, now=self._now()):
                # Its window passed with too few inferences to judge; the operator wants
                # another version now, so it ends here instead of blocking the update.
                reason = f"superseded by {version} before it served enough inferences"
                previous = mark_committed(previous, now=self._now(), reason=reason)
                self.journal.save(previous)
                log.info("probation_superseded", model=self.name, version=current, by=version)
            record = begin(
                previous,
                model=self.name,
                from_version=current,
                to_version=version,
                now=self._now(),
            )
            self.journal.save(record)
            return self._swap_and_start_probation(record)

    def _swap_and_start_probation(self, record: UpdateRecord) -> SwapReport:
        assert record.to_version is not None
        version = record.to_version
        baseline = self.slot.baseline_p99()
        try:
            report = self.slot.swap(version)
        except AgentError as exc:
            self.journal.save(failed(record, reason=str(exc), now=self._now()))
            with contextlib.suppress(StoreError):
                self.store.remove(self.name, version, reason=f"rejected: {exc}")
            raise
        try:
            self.store.activate(self.name, version)
        except StoreError as exc:
            # The pointer could not move (disk full): do not serve what a restart would not.
            if record.from_version is not None:
                self.slot.swap(record.from_version, validate=False)
            self.journal.save(failed(record, reason=str(exc), now=self._now()))
            raise
        now = self._now()
        record = swapped(record, now=now, limits=self.limits, baseline_p99_s=baseline)
        self.journal.save(record)
        self._emit(
            "probation_started",
            version=version,
            from_version=record.from_version,
            probation_s=self.limits.probation_s,
            baseline_p99_s=baseline,
        )
        return report

    # --- probation ---------------------------------------------------------------------------

    def check(self) -> Verdict | None:
        """Judge the version on probation now: commit, roll back, or wait. ``None`` when no
        version is on probation."""
        with self._lock:
            record = self.journal.load(self.name)
            if record is None or record.phase != "probation":
                return None
            now = self._now()
            health = self.slot.health()
            verdict = judge(record, health, now=now, limits=self.limits)
            if verdict.action == "commit":
                self.journal.save(mark_committed(record, now=now))
                self._emit(
                    "committed",
                    version=record.to_version,
                    from_version=record.from_version,
                    requests=health.requests,
                    errors=health.errors,
                    p99_s=health.p99_s,
                )
                self.store.gc(self.name)
            elif verdict.action == "rollback":
                assert verdict.reason is not None
                self._roll_back(start_rollback(record, reason=verdict.reason, now=now))
            return verdict

    def awaiting_evidence(self) -> bool:
        """On probation past its window, waiting only for enough inferences to judge."""
        return awaiting_evidence(self.journal.load(self.name), now=self._now())

    def rollback(self, reason: str = "requested") -> str:
        """Go back to the previous version now (an operator's or the control plane's abort):
        the version on probation, or a committed one while the store still names the version
        it replaced. Returns the version serving afterwards; ``StoreError`` when there is
        nothing to go back to or a swap is in flight."""
        with self._lock:
            record = self.journal.load(self.name)
            if record is not None and record.phase == "probation":
                if record.from_version is None:
                    raise StoreError(f"{self.name}: no previous version to roll back to")
                self._roll_back(start_rollback(record, reason=reason, now=self._now()))
                return self.slot.version
            pointer = self.store.pointer(self.name)
            serving = self.slot.version or (pointer.version if pointer else "")
            previous = pointer.previous if pointer is not None else None
            if not serving or previous is None or not self.store.has(self.name, previous):
                raise StoreError(f"{self.name}: no previous version to roll back to")
            self._roll_back(
                begin_rollback(
                    record,
                    model=self.name,
                    serving=serving,
                    previous=previous,
                    reason=reason,
                    now=self._now(),
                )
            )
            return self.slot.version

    def _roll_back(self, record: UpdateRecord) -> None:
        """Carry out a journaled ``rolling_back`` record: serve ``from_version`` again."""
        reason = record.reason or "rolled back"
        self.journal.save(record)
        old = record.from_version
        if old is not None:
            self.slot.swap(old, validate=False)
            self.store.set_pointer(self.name, old, None)
        self.journal.save(finish_rollback(record, now=self._now()))
        log.warning(
            "update_rolled_back",
            model=self.name,
            version=old,
            left=record.to_version,
            reason=reason,
        )
        self._emit("rolled_back", version=old, from_version=record.to_version, reason=reason)

    def run_probation(self, stop: threading.Event, *, interval_s: float = 1.0) -> None:
        """Check every ``interval_s`` until a verdict or ``stop`` (for a background thread)."""
        while not stop.wait(interval_s):
            verdict = self.check()
            if verdict is None or verdict.action != "wait":
                return

    def _emit(self, step: EventStep, *, version: str | None, **fields: Any) -> None:
        if self._bus is not None:
            self._bus.emit(step, model=self.name, version=version, **fields)

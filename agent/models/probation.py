"""The update state machine of one model slot: swap, probation, commit or rollback, and what a
restart does in each phase. Pure decisions plus the journal that persists them.

Phases (``UpdateRecord.phase``)::

    idle --begin--> swapping --swapped--> probation --judge: commit--> committed
                       |                      |--judge: rollback--> rolling_back --> rolled_back
                       +--failed--> failed    +--crash loop at boot--> rolling_back
    committed --begin_rollback (an operator's abort)--> rolling_back --> rolled_back

A version commits only after serving ``Limits.min_inferences``; past its window without them it
waits (and says why), and another desired version may supersede it (``awaiting_evidence``).

The functions here take the record, the health figures and ``now`` (wall-clock seconds, since
deadlines must survive a restart) and return a new record or a decision; they touch nothing.
``UpdateJournal`` writes records atomically to ``<state_dir>/updates/<model>.json``, each carrying
the verdicts of the ones before (``UpdateRecord.rejected``), and ``boot_version`` picks what to
serve from them when the store's pointer is lost. The driver
that loads, swaps and flips the store's pointer is ``agent.models.activation``.

Ordering the driver keeps, which makes every crash point recoverable:

1. journal ``swapping`` (from, to), then load/validate/switch in memory;
2. flip the store pointer to ``to``, then journal ``probation`` (deadline, baseline p99);
3. on commit journal ``committed``; on rollback journal ``rolling_back``, switch back, flip the
   pointer back, journal ``rolled_back``.

A process start increments ``boots`` while a phase is in flight; ``boot_attempts`` starts in
``swapping`` or ``probation`` without reaching a verdict means the new version crashes the
process, and the restart comes back on the previous version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from agent.config import SwapConfig
from agent.errors import StoreError
from agent.logs import get_logger

__all__ = [
    "BootPlan",
    "Health",
    "Limits",
    "UpdateJournal",
    "UpdatePhase",
    "UpdateRecord",
    "Verdict",
    "awaiting_evidence",
    "begin",
    "begin_rollback",
    "boot_version",
    "failed",
    "finish_rollback",
    "in_flight",
    "judge",
    "judged_p99",
    "mark_committed",
    "on_boot",
    "p99",
    "rejected_versions",
    "start_rollback",
    "swapped",
    "with_verdict",
]

log = get_logger(__name__)

# The slowest inferences of a probation window that its latency verdict sets aside (see
# ``judged_p99``); from 200 inferences on, the 99th percentile sets aside at least as many.
SPARED_SLOWEST = 2

UpdatePhase = Literal[
    "idle", "swapping", "probation", "committed", "rolling_back", "rolled_back", "failed"
]
IN_FLIGHT: tuple[UpdatePhase, ...] = ("swapping", "probation", "rolling_back")


class UpdateRecord(BaseModel):
    """The persisted state of the latest update of one model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    model: str
    phase: UpdatePhase = "idle"
    from_version: str | None = None
    to_version: str | None = None
    started_at: float | None = None  # wall-clock seconds
    probation_until: float | None = None
    baseline_p99_s: float | None = None  # the previous version's p99, the probation yardstick
    boots: int = Field(default=0, ge=0)  # process starts since the phase began
    reason: str | None = None
    updated_at: float = 0.0
    # Versions this device judged bad (failed, rolled back), oldest first, at most
    # ``MAX_VERDICTS``: kept across later updates so that a start-up that lost the store's
    # pointer never picks one of them while a good version is installed.
    rejected: tuple[str, ...] = Field(default=(), max_length=64)


MAX_VERDICTS = 16  # rejected versions remembered per model


def with_verdict(record: UpdateRecord, earlier: UpdateRecord | None) -> UpdateRecord:
    """``record`` carrying the verdicts of ``earlier`` (the journal before this write), plus its
    own: a failed or rolled-back ``to_version`` is rejected; a version that swaps in again (an
    operator offered it again on purpose) is not any more."""
    rejected = list(earlier.rejected if earlier is not None else ())
    for version in record.rejected:
        if version not in rejected:
            rejected.append(version)
    to = record.to_version
    if to is not None:
        if record.phase in ("failed", "rolled_back"):
            if to in rejected:
                rejected.remove(to)
            rejected.append(to)
        elif record.phase == "swapping" and to in rejected:
            rejected.remove(to)
    out = tuple(rejected[-MAX_VERDICTS:])
    return record if out == record.rejected else record.model_copy(update={"rejected": out})


def rejected_versions(record: UpdateRecord | None) -> frozenset[str]:
    """Every version the journal says this device judged bad, the latest verdict included."""
    if record is None:
        return frozenset()
    out = set(record.rejected)
    if record.phase in ("failed", "rolled_back") and record.to_version is not None:
        out.add(record.to_version)
    return frozenset(out)


def boot_version(record: UpdateRecord | None, installed: Sequence[str]) -> str | None:
    """Which installed version to serve when the store's pointer is lost or unusable, from the
    journal's verdicts alone. ``installed`` is oldest first (semantic-version order).

    The version the journal last called good comes first: the one committed, or the one an
    update was going back to (``from_version`` of a failed, rolled-back or interrupted update:
    a version on probation is not proven). Else the newest installed version not rejected. Only
    when every installed version is rejected is the newest served (and the report says it was
    judged bad)."""
    if not installed:
        return None
    bad = rejected_versions(record)
    if record is not None:
        proven = record.to_version if record.phase == "committed" else record.from_version
        if record.phase != "idle" and proven in installed and proven not in bad:
            return proven
    good = [v for v in installed if v not in bad]
    return good[-1] if good else installed[-1]


@dataclass(frozen=True)
class Limits:
    """Probation bounds (from ``SwapConfig``) plus the minimum evidence before judging."""

    probation_s: float = 60.0
    max_error_rate: float = 0.01
    max_p99_ratio: float = 1.5
    boot_attempts: int = 3
    min_requests: int = 20  # fewer than this and error rate / p99 are not judged
    # A p99 rise smaller than this is scheduler noise, whatever the ratio (sub-ms models).
    p99_slack_s: float = 0.002
    # A version that served fewer inferences (API or loop) may not commit: no evidence either way.
    min_inferences: int = 20

    @classmethod
    def from_config(
        cls, config: SwapConfig, *, min_requests: int = 20, p99_slack_s: float = 0.002
    ) -> Limits:
        return cls(
            probation_s=config.probation_s,
            max_error_rate=config.max_error_rate,
            max_p99_ratio=config.max_p99_ratio,
            boot_attempts=config.boot_attempts,
            min_requests=min_requests,
            p99_slack_s=p99_slack_s,
            min_inferences=config.probation_min_inferences,
        )


@dataclass(frozen=True)
class Health:
    """What the new version did on probation so far. ``p99_s``: its latency as judged
    (``judged_p99`` of its recent inferences)."""

    requests: int
    errors: int
    p99_s: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class Verdict:
    """``reason``: why it rolls back, or why a version whose window has passed still waits."""

    action: Literal["wait", "commit", "rollback"]
    reason: str | None = None


@dataclass(frozen=True)
class BootPlan:
    """What a process start must do before serving.

    ``serve``: the version to load (the store pointer after ``pointer`` is applied);
    ``pointer``: a pointer change to make first (``(version, previous)``) or ``None``;
    ``retry_swap``: start the swap to ``record.to_version`` again once serving.
    """

    record: UpdateRecord | None
    serve: str | None
    pointer: tuple[str, str | None] | None = None
    retry_swap: bool = False
    reason: str | None = None


def p99(samples: Sequence[float], *, spare: int = 0) -> float | None:
    """Nearest-rank 99th percentile; ``None`` without samples. ``spare``: that many of the
    slowest samples are never the answer (while more remain). Below ``100 * spare`` samples
    the nearest rank would be one of them: the plain p99 of 20 samples is their maximum."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, min(math.ceil(0.99 * len(ordered)), len(ordered) - spare))
    return ordered[rank - 1]


def judged_p99(samples: Sequence[float]) -> float | None:
    """The p99 that probation judges and compares: ``SPARED_SLOWEST`` stalled inferences
    never decide it. On a window of a few dozen inferences the plain p99 is the slowest one,
    and one frame held up by the scheduler, a page fault or a neighbour's burst (milliseconds
    against a sub-millisecond model) would roll back a sound version. A version that is
    really slower is slow on most of its inferences, and is still caught."""
    return p99(samples, spare=SPARED_SLOWEST)


def in_flight(record: UpdateRecord | None) -> bool:
    return record is not None and record.phase in IN_FLIGHT


def begin(
    record: UpdateRecord | None,
    *,
    model: str,
    from_version: str | None,
    to_version: str,
    now: float,
) -> UpdateRecord:
    """Start an update; refuses while another is in flight."""
    if in_flight(record):
        assert record is not None
        raise StoreError(
            f"{model}: an update to {record.to_version} is in phase {record.phase}; "
            "wait for it to commit or roll back"
        )
    return UpdateRecord(
        model=model,
        phase="swapping",
        from_version=from_version,
        to_version=to_version,
        started_at=now,
        updated_at=now,
    )


def swapped(
    record: UpdateRecord, *, now: float, limits: Limits, baseline_p99_s: float | None
) -> UpdateRecord:
    """The new version serves and the pointer names it: probation starts."""
    _expect(record, "swapping")
    return record.model_copy(
        update={
            "phase": "probation",
            "probation_until": now + limits.probation_s,
            "baseline_p99_s": baseline_p99_s,
            "boots": 0,
            "updated_at": now,
        }
    )


def failed(record: UpdateRecord, *, reason: str, now: float) -> UpdateRecord:
    """The swap did not happen (load, validation, resources); the old version still serves."""
    _expect(record, "swapping")
    return record.model_copy(update={"phase": "failed", "reason": reason, "updated_at": now})


def judge(record: UpdateRecord, health: Health, *, now: float, limits: Limits) -> Verdict:
    """Probation verdict: roll back on too many errors or a p99 beyond the bound relative to
    the previous version (both as ``judged_p99``: a stalled frame or two decide nothing),
    commit once the window has passed and the version served at least
    ``limits.min_inferences`` inferences, otherwise wait (with the reason once only the
    evidence is missing)."""
    _expect(record, "probation")
    if health.requests >= limits.min_requests:
        if health.error_rate > limits.max_error_rate:
            return Verdict(
                "rollback",
                f"error rate {health.error_rate:.1%} ({health.errors}/{health.requests}) "
                f"> {limits.max_error_rate:.1%}",
            )
        base = record.baseline_p99_s
        if (
            base
            and health.p99_s is not None
            and health.p99_s > base * limits.max_p99_ratio
            and health.p99_s - base > limits.p99_slack_s
        ):
            return Verdict(
                "rollback",
                f"p99 {health.p99_s * 1e3:.2f} ms is {health.p99_s / base:.2f}x the previous "
                f"version's {base * 1e3:.2f} ms (limit {limits.max_p99_ratio:g}x)",
            )
    if record.probation_until is None or now >= record.probation_until:
        if health.requests < limits.min_inferences:
            return Verdict(
                "wait",
                f"{record.to_version} served {health.requests} of the {limits.min_inferences} "
                "inferences it needs before it may commit",
            )
        return Verdict("commit")
    return Verdict("wait")


def awaiting_evidence(record: UpdateRecord | None, *, now: float) -> bool:
    """On probation with its window passed: only the minimum of inferences keeps it there, so
    another desired version may supersede it (``mark_committed`` with a reason) instead of
    waiting for traffic that may never come."""
    return (
        record is not None
        and record.phase == "probation"
        and (record.probation_until is None or now >= record.probation_until)
    )


def mark_committed(record: UpdateRecord, *, now: float, reason: str | None = None) -> UpdateRecord:
    _expect(record, "probation")
    return record.model_copy(
        update={"phase": "committed", "boots": 0, "reason": reason, "updated_at": now}
    )


def start_rollback(record: UpdateRecord, *, reason: str, now: float) -> UpdateRecord:
    _expect(record, "probation")
    return record.model_copy(update={"phase": "rolling_back", "reason": reason, "updated_at": now})


def begin_rollback(
    record: UpdateRecord | None,
    *,
    model: str,
    serving: str,
    previous: str,
    reason: str,
    now: float,
) -> UpdateRecord:
    """An operator's rollback of a committed (or hand-activated) version: back to ``previous``.
    Refused while a swap or another rollback is in flight; a version on probation goes through
    ``start_rollback`` instead."""
    if in_flight(record):
        assert record is not None
        if record.phase == "probation":
            return start_rollback(record, reason=reason, now=now)
        raise StoreError(f"{model}: an update to {record.to_version} is in phase {record.phase}")
    return UpdateRecord(
        model=model,
        phase="rolling_back",
        from_version=previous,
        to_version=serving,
        started_at=now,
        reason=reason,
        updated_at=now,
    )


def finish_rollback(record: UpdateRecord, *, now: float) -> UpdateRecord:
    _expect(record, "rolling_back")
    return record.model_copy(update={"phase": "rolled_back", "boots": 0, "updated_at": now})


def on_boot(
    record: UpdateRecord | None, *, active: str | None, limits: Limits, now: float
) -> BootPlan:
    """Decide what a starting process serves, given the journal and the store pointer.

    The returned record must be journaled before the plan is carried out, so that a crash
    while carrying it out counts as one more boot.
    """
    if record is None or record.phase not in IN_FLIGHT:
        return BootPlan(record, serve=active)
    old, new = record.from_version, record.to_version
    boots = record.boots + 1
    if record.phase == "rolling_back":
        # A rollback was decided; finish it whatever the pointer says now.
        done = record.model_copy(update={"phase": "rolled_back", "boots": 0, "updated_at": now})
        if old is None:
            return BootPlan(done, serve=active, reason=record.reason)
        return BootPlan(done, serve=old, pointer=(old, None), reason=record.reason)
    if active == new and record.phase == "swapping":
        # Crashed between the pointer flip and journaling probation: the swap completed.
        record = record.model_copy(
            update={"phase": "probation", "probation_until": now + limits.probation_s}
        )
    if record.phase == "swapping":
        if boots >= limits.boot_attempts:
            reason = f"the process restarted {boots} times during the swap to {new}"
            gave_up = record.model_copy(
                update={"phase": "failed", "reason": reason, "boots": boots, "updated_at": now}
            )
            return BootPlan(gave_up, serve=active, reason=reason)
        again = record.model_copy(update={"boots": boots, "updated_at": now})
        return BootPlan(again, serve=active, retry_swap=True)
    # probation
    if active != new:
        # The pointer no longer names the version on probation (changed by hand): stop.
        reason = f"active pointer is {active}, not {new}; probation abandoned"
        ended = record.model_copy(
            update={"phase": "rolled_back", "reason": reason, "boots": 0, "updated_at": now}
        )
        return BootPlan(ended, serve=active, reason=reason)
    if boots >= limits.boot_attempts and old is not None:
        reason = f"crash loop: {boots} restarts while {new} was on probation"
        done = record.model_copy(
            update={"phase": "rolled_back", "reason": reason, "boots": 0, "updated_at": now}
        )
        return BootPlan(done, serve=old, pointer=(old, None), reason=reason)
    # Resume probation with a fresh window: the time spent down says nothing about the version.
    resumed = record.model_copy(
        update={"boots": boots, "probation_until": now + limits.probation_s, "updated_at": now}
    )
    return BootPlan(resumed, serve=new)


def _expect(record: UpdateRecord, phase: UpdatePhase) -> None:
    if record.phase != phase:
        raise StoreError(f"{record.model}: update is in phase {record.phase}, not {phase}")


class UpdateJournal:
    """``<state_dir>/updates/<model>.json``, written atomically (temp file, fsync, replace)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "updates"

    def path(self, model: str) -> Path:
        return self.root / f"{model}.json"

    def load(self, model: str) -> UpdateRecord | None:
        try:
            data = self.path(model).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{model}: cannot read the update journal: {exc}") from exc
        try:
            return UpdateRecord.model_validate_json(data)
        except PydanticValidationError:
            # Atomic writes make this unreachable short of disk corruption: start afresh
            # on whatever the store pointer names, and say so.
            log.error("update_journal_corrupt", model=model, path=str(self.path(model)))
            return None

    def save(self, record: UpdateRecord) -> None:
        from agent.models.store import write_file_atomic

        record = with_verdict(record, self.load(record.model))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_file_atomic(self.path(record.model), record.model_dump_json().encode())
        except OSError as exc:
            raise StoreError(f"{record.model}: cannot write the update journal: {exc}") from exc

"""What a device reports for one model: a pure function of what serves, the update journal and
what the update client knows, no I/O.

The reported phase is never set from scattered callbacks; it is derived, each time a report is
made, from the facts that decide it:

- the slot: which version serves now (and its variant, backend, device, why it was chosen);
- the update journal (``agent.models.probation``): a swap, a probation or a rollback in flight,
  and how the last update ended (committed, rolled back, failed) and why;
- the update client: the step it is carrying a new version through now (download to swap), the
  version this device refuses and why, the last failed attempt at the desired version;
- the daemon: the health of the model's inference loop.

So every change of what serves (a swap, a rollback of any cause, boot recovery) shows in the
next report without anyone remembering to say so. ``agent.updates.client`` gathers the facts and
sends the result; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.contracts.state import LoopHealth, Phase, ReportedModel, ReportedShadow, bounded_text
from agent.models.probation import UpdateRecord

__all__ = [
    "FailureClass",
    "LoopStatus",
    "ModelFacts",
    "Progress",
    "Rejection",
    "Serving",
    "reported_model",
]

# The steps the update client carries a version through before the journal takes over.
PROGRESS_PHASES: tuple[Phase, ...] = (
    "downloading",
    "verifying",
    "installing",
    "loading",
    "validating",
    "swapping",
)


@dataclass(frozen=True)
class Serving:
    """The version a slot serves now."""

    version: str
    variant_id: str | None = None
    backend: str | None = None
    device: str | None = None
    choice: str | None = None


@dataclass(frozen=True)
class Progress:
    """The update client carrying ``version`` through ``phase`` right now."""

    version: str
    phase: Phase


# Whose fault a failed attempt was: the version's (a rollout counts it against the version), the
# network's or the control plane's for a while (``transient``), or this device's disk
# (``local_io``: out of space, an I/O error). The last two are retried and never counted.
FailureClass = Literal["version", "transient", "local_io"]


@dataclass(frozen=True)
class Rejection:
    """A version this device refuses (it failed to load or validate, or was rolled back) while
    its desired entry keeps the generation it was rejected under; or the last failed attempt at
    a target that is retried later (``retried``)."""

    version: str
    reason: str
    retried: bool = False
    failure_class: FailureClass = "version"


@dataclass(frozen=True)
class LoopStatus:
    health: LoopHealth
    error: str | None = None


@dataclass(frozen=True)
class ModelFacts:
    """Everything the report of one model depends on."""

    name: str
    serving: Serving | None = None
    record: UpdateRecord | None = None  # the update journal
    desired: str | None = None  # the desired version, when the desired state names the model
    progress: Progress | None = None
    rejection: Rejection | None = None  # applies to ``desired``
    waiting: str | None = None  # why the version on probation waits (the last verdict)
    loop: LoopStatus | None = None
    shadow: ReportedShadow | None = None  # a version running beside the serving one


def reported_model(facts: ModelFacts) -> ReportedModel:
    """The reported state of one model. Consistent with what serves by construction:
    ``active_version`` is the slot's version; ``probation`` and ``committed`` name it; a step
    before the swap, ``failed`` and ``rolled_back`` name another version as the target; ``swapping``
    names the version coming in, which may serve already while the pointer flips."""
    serving = facts.serving
    active = serving.version if serving is not None else None
    phase, target, error, detail = _phase(facts, active)
    loop = facts.loop
    return ReportedModel(
        name=facts.name,
        active_version=active,
        variant_id=serving.variant_id if serving else None,
        backend=bounded_text(serving.backend, 64) if serving and serving.backend else None,
        device=bounded_text(serving.device, 64) if serving and serving.device else None,
        choice=bounded_text(serving.choice) if serving and serving.choice else None,
        phase=phase,
        target_version=target,
        last_error=bounded_text(error) if error else None,
        detail=bounded_text(detail) if detail else None,
        loop=loop.health if loop else None,
        loop_error=bounded_text(loop.error) if loop and loop.error else None,
        shadow=facts.shadow,
    )


_Decided = tuple[Phase, "str | None", "str | None", "str | None"]


def _phase(facts: ModelFacts, active: str | None) -> _Decided:
    progress, record = facts.progress, facts.record
    if progress is not None and progress.version != active:
        return progress.phase, progress.version, None, None
    if record is not None:
        to, back = record.to_version, record.from_version
        if record.phase == "swapping" and to is not None:
            return "swapping", to, None, None  # serving already, or about to
        if record.phase == "probation" and to is not None and to == active:
            return "probation", to, None, facts.waiting
        if record.phase == "rolling_back" and back is not None and back != active:
            return "swapping", back, None, None
    desired, rejection = facts.desired, facts.rejection
    if rejection is not None and desired is not None and rejection.version == desired != active:
        if rejection.retried and rejection.failure_class != "version":
            # Still on its way: the phase stays where it stopped, the error says why and whose.
            why = f"{rejection.failure_class}: {rejection.reason}"
            return "downloading", desired, why, "retrying"
        if rejection.retried:
            return "failed", desired, rejection.reason, None
        # Refused for as long as its entry keeps this generation: say so, and how it ended.
        reason = rejection.reason
        reason = reason if reason.startswith("rejected: ") else f"rejected: {reason}"
        left = record is not None and record.phase == "rolled_back" and record.to_version == desired
        return ("rolled_back" if left else "failed"), desired, reason, None
    if record is None:
        return "idle", None, None, None
    if record.to_version is not None and record.to_version != active:
        why = record.reason or record.phase
        if record.phase == "rolled_back":
            return "rolled_back", record.to_version, why, None
        if record.phase == "failed":
            return "failed", record.to_version, why, None
    if record.phase == "committed" and record.to_version == active:
        return "committed", active, None, None
    if record.phase in ("rolled_back", "failed") and record.to_version == active:
        # Judged bad with nothing to go back to: it serves, and says what happened.
        return "failed", None, f"{record.phase}: {record.reason or 'no reason given'}", None
    return "idle", None, None, None

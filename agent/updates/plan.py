"""What the update client should do next: pure decisions, no I/O.

Given the desired state, what each slot serves, and what happened to earlier attempts, decide per
model whether to update now, wait (a retry is backing off), leave it (already there), or leave it
for good (this exact version was rejected on the device: it failed to load or validate, or was
rolled back on probation). Also: when to poll next (interval with jitter, exponential backoff
while the control plane is unreachable) and whether the signed metadata agrees with the desired
state. ``agent.updates.client`` carries the decisions out.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.contracts.state import DesiredModel, DesiredState, DesiredVariant

__all__ = [
    "Attempt",
    "Decision",
    "PollSchedule",
    "Refusal",
    "check_against_signed",
    "plan",
    "record_failure",
    "target_key",
]

Action = Literal["update", "up_to_date", "retry_later", "rejected"]


@dataclass(frozen=True)
class Refusal:
    """Why a target or its metadata was not accepted."""

    kind: Literal["refused", "failed"]  # refused: security/verification; failed: anything else
    reason: str


@dataclass(frozen=True)
class Attempt:
    """The last failed attempt at one target (``target_key``) and when to try it again."""

    key: str
    failures: int
    retry_at: float  # monotonic seconds
    reason: str


@dataclass(frozen=True)
class Decision:
    model: DesiredModel
    action: Action
    reason: str | None = None


def target_key(model: DesiredModel) -> str:
    """One downloadable thing: a new sha256 (a republished variant) is a new target."""
    return f"{model.name}/{model.version}/{model.variant_id}/{model.sha256}"


def plan(
    desired: DesiredState,
    *,
    serving: Mapping[str, str | None],
    rejected: Mapping[str, tuple[str, int]],
    attempts: Mapping[str, Attempt],
    now: float,
) -> list[Decision]:
    """One decision per desired model, in the desired state's order.

    ``serving``: model name -> version serving now (None when nothing serves); ``rejected``:
    model name -> (version, entry generation) this device rejected last (load, validation or
    probation): that version is refused while the entry's generation is the same, and tried
    again once the control plane offers it on purpose (a new generation);
    ``attempts``: failed attempts by ``target_key``; ``now``: monotonic seconds.
    """
    decisions: list[Decision] = []
    for model in desired.models:
        if serving.get(model.name) == model.version:
            decisions.append(Decision(model, "up_to_date"))
            continue
        if rejected.get(model.name) == (model.version, model.generation):
            decisions.append(
                Decision(model, "rejected", f"{model.version} was rejected on this device")
            )
            continue
        attempt = attempts.get(target_key(model))
        if attempt is not None and now < attempt.retry_at:
            decisions.append(Decision(model, "retry_later", attempt.reason))
            continue
        decisions.append(Decision(model, "update"))
    return decisions


def record_failure(
    previous: Attempt | None,
    key: str,
    reason: str,
    *,
    now: float,
    base_s: float,
    max_s: float,
    rng: random.Random,
) -> Attempt:
    """The attempt after one more failure: retry after base * 2^(n-1), capped, with jitter in
    [0.5, 1.0] of that (never sooner than half, so a tampered mirror is not hammered)."""
    failures = (previous.failures if previous else 0) + 1
    delay = min(max_s, base_s * 2 ** (failures - 1))
    return Attempt(key, failures, now + delay * rng.uniform(0.5, 1.0), reason)


def check_against_signed(
    model: DesiredModel | DesiredVariant, length: int, sha256: str
) -> Refusal | None:
    """The desired state is a hint; the signed metadata decides. They must agree."""
    if length != model.size or sha256 != model.sha256:
        return Refusal(
            "refused",
            f"{model.artifact_path}: the desired state says {model.size} bytes sha256 "
            f"{model.sha256[:16]}..., the signed metadata {length} bytes sha256 "
            f"{sha256[:16]}...; not downloading",
        )
    return None


@dataclass
class PollSchedule:
    """Seconds until the next desired-state poll: ``interval_s`` with +-``jitter`` (fraction),
    doubling per consecutive failure up to ``max_backoff_s`` (full-interval jitter kept)."""

    interval_s: float
    jitter: float
    max_backoff_s: float
    rng: random.Random
    failures: int = 0

    def succeeded(self) -> float:
        self.failures = 0
        return self._jittered(self.interval_s)

    def failed(self) -> float:
        self.failures += 1
        base = min(
            max(self.max_backoff_s, self.interval_s),
            self.interval_s * 2 ** min(self.failures, 32),
        )
        return self._jittered(base)

    def _jittered(self, seconds: float) -> float:
        return max(0.0, seconds * (1 + self.rng.uniform(-self.jitter, self.jitter)))

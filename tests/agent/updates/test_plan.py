"""The update client's pure decisions: what to do per desired model, retries, poll schedule."""

from __future__ import annotations

import random

from agent.contracts.state import DesiredModel, DesiredState
from agent.updates.plan import (
    PollSchedule,
    check_against_signed,
    plan,
    record_failure,
    target_key,
)

SHA = "a" * 64


def _model(name: str = "digits", version: str = "2.0.0", sha: str = SHA) -> DesiredModel:
    return DesiredModel(
        name=name,
        version=version,
        variant_id="onnx-fp32",
        artifact_path=f"bundles/{name}/{version}/onnx-fp32.tar",
        sha256=sha,
        size=100,
    )


def _desired(*models: DesiredModel) -> DesiredState:
    return DesiredState(device_id="dev-1", generation=3, models=models)


def test_each_desired_model_gets_one_decision() -> None:
    fresh, same, bad = _model("a"), _model("b"), _model("c")
    decisions = plan(
        _desired(fresh, same, bad),
        serving={"a": "1.0.0", "b": "2.0.0", "c": "1.0.0"},
        rejected={"c": ("2.0.0", 0)},
        attempts={},
        now=0.0,
    )
    assert [(d.model.name, d.action) for d in decisions] == [
        ("a", "update"),
        ("b", "up_to_date"),
        ("c", "rejected"),
    ]
    assert decisions[2].reason == "2.0.0 was rejected on this device"


def test_a_rejected_version_is_tried_again_only_when_offered_on_purpose() -> None:
    """An unchanged entry never retries a rejected version; a new generation (a new rollout,
    an operator's ``edgectl devices retry``) does."""
    rejected = {"digits": ("2.0.0", 7)}
    same = _model().model_copy(update={"generation": 7})
    again = _model().model_copy(update={"generation": 8})
    other = _model(version="2.1.0").model_copy(update={"generation": 7})
    for entry, action in ((same, "rejected"), (again, "update"), (other, "update")):
        [decision] = plan(_desired(entry), serving={}, rejected=rejected, attempts={}, now=0.0)
        assert decision.action == action, entry


def test_a_failed_target_waits_for_its_retry_time_and_a_new_digest_does_not() -> None:
    model = _model()
    attempt = record_failure(
        None,
        target_key(model),
        "sha256 mismatch",
        now=100.0,
        base_s=30,
        max_s=600,
        rng=random.Random(1),
    )
    assert 115.0 <= attempt.retry_at <= 130.0
    attempts = {attempt.key: attempt}
    early = plan(_desired(model), serving={}, rejected={}, attempts=attempts, now=110.0)
    assert (early[0].action, early[0].reason) == ("retry_later", "sha256 mismatch")
    late = plan(_desired(model), serving={}, rejected={}, attempts=attempts, now=131.0)
    assert late[0].action == "update"
    republished = _model(sha="b" * 64)  # the operator fixed the artifact: a new target
    again = plan(_desired(republished), serving={}, rejected={}, attempts=attempts, now=110.0)
    assert again[0].action == "update"


def test_retry_delays_double_up_to_the_cap() -> None:
    rng = random.Random(0)
    attempt = None
    delays = []
    for _ in range(8):
        attempt = record_failure(attempt, "k", "x", now=0.0, base_s=10, max_s=100, rng=rng)
        delays.append(attempt.retry_at)
    assert attempt is not None
    assert attempt.failures == 8
    assert all(0.5 * min(100, 10 * 2**i) <= d <= min(100, 10 * 2**i) for i, d in enumerate(delays))


def test_poll_schedule_backs_off_while_unreachable_and_resets() -> None:
    s = PollSchedule(interval_s=30, jitter=0.2, max_backoff_s=600, rng=random.Random(0))
    assert 24 <= s.succeeded() <= 36
    failed = [s.failed() for _ in range(10)]
    assert 48 <= failed[0] <= 72
    assert all(480 <= d <= 720 for d in failed[5:])  # capped at 600 s +-20 %
    assert 24 <= s.succeeded() <= 36


def test_desired_state_must_agree_with_the_signed_metadata() -> None:
    model = _model()
    assert check_against_signed(model, 100, SHA) is None
    bigger = check_against_signed(model, 50, SHA)
    assert bigger is not None
    assert bigger.kind == "refused"
    assert "the desired state says 100 bytes" in bigger.reason
    assert "signed metadata 50 bytes" in bigger.reason
    other = check_against_signed(model, 100, "b" * 64)
    assert other is not None
    assert "not downloading" in other.reason

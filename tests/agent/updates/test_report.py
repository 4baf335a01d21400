"""The reported phase as a pure function (``agent.updates.report``): driven by any sequence of
store, journal and slot events through the real pure state machine (``agent.models.probation``),
every report is consistent with what serves."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.contracts.state import ReportedModel
from agent.models.probation import (
    Health,
    Limits,
    UpdateRecord,
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
from agent.updates.report import (
    PROGRESS_PHASES,
    LoopStatus,
    ModelFacts,
    Progress,
    Rejection,
    Serving,
    reported_model,
)

VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
LIMITS = Limits(probation_s=10, boot_attempts=2, min_requests=5, min_inferences=5)


@dataclass
class Device:
    """A model slot, its store pointer and its journal, moved only by the pure state machine."""

    serving: str | None = None
    previous: str | None = None
    record: UpdateRecord | None = None
    now: float = 1000.0
    rejected: dict[str, str] = field(default_factory=dict)
    progress: Progress | None = None

    def facts(self, desired: str | None, loop: LoopStatus | None) -> ModelFacts:
        rejection = Rejection(desired, self.rejected[desired]) if desired in self.rejected else None
        return ModelFacts(
            name="digits",
            serving=Serving(self.serving) if self.serving else None,
            record=self.record,
            desired=desired,
            progress=self.progress,
            rejection=rejection,
            waiting="served 0 of the 5 inferences" if self.record else None,
            loop=loop,
        )


def _step(d: Device, action: str, version: str, requests: int) -> None:
    """One event; actions the state machine refuses in this state leave it unchanged."""
    d.now += 3
    rec = d.record
    in_flight = rec is not None and rec.phase in ("swapping", "probation", "rolling_back")
    if action == "fetch" and version != d.serving and not in_flight:
        d.progress = Progress(version, PROGRESS_PHASES[requests % len(PROGRESS_PHASES)])
    elif action == "begin" and version != d.serving and not in_flight:
        d.progress = None
        d.record = begin(rec, model="digits", from_version=d.serving, to_version=version, now=d.now)
    elif action == "load_fails" and rec is not None and rec.phase == "swapping":
        d.record = failed(rec, reason="golden case 0 differs", now=d.now)
        assert rec.to_version is not None
        d.rejected[rec.to_version] = "golden case 0 differs"
    elif action == "swap" and rec is not None and rec.phase == "swapping":
        d.serving, d.previous = rec.to_version, d.serving  # slot first, then pointer
        d.record = swapped(rec, now=d.now, limits=LIMITS, baseline_p99_s=0.01)
    elif action == "judge" and rec is not None and rec.phase == "probation":
        errors = requests if version == "3.0.0" else 0
        verdict = judge(rec, Health(requests, errors, 0.01), now=d.now + 20, limits=LIMITS)
        if verdict.action == "commit":
            d.record = mark_committed(rec, now=d.now)
        elif verdict.action == "rollback":
            d.record = start_rollback(rec, reason=verdict.reason or "", now=d.now)
    elif action == "finish" and rec is not None and rec.phase == "rolling_back":
        if rec.from_version is not None:
            d.serving, d.previous = rec.from_version, None
        d.record = finish_rollback(rec, now=d.now)
        assert rec.to_version is not None
        d.rejected[rec.to_version] = f"rolled back: {rec.reason}"
    elif action == "command_rollback" and d.serving and d.previous and not in_flight:
        d.record = begin_rollback(
            rec,
            model="digits",
            serving=d.serving,
            previous=d.previous,
            reason="requested by the control plane",
            now=d.now,
        )
    elif action == "boot":
        d.progress = None
        plan = on_boot(rec, active=d.serving, limits=LIMITS, now=d.now)
        d.record = plan.record
        if plan.pointer is not None:
            d.serving, d.previous = plan.pointer
        elif plan.serve is not None:
            d.serving = plan.serve
    elif action == "retry":  # the operator's retry: a new generation clears the refusal
        d.rejected.pop(version, None)


def _check(report: ReportedModel, d: Device) -> None:
    active = report.active_version
    assert active == d.serving
    if report.phase in PROGRESS_PHASES and report.phase != "swapping":
        assert report.target_version is not None
        assert report.target_version != active
    if report.phase == "swapping":
        assert report.target_version is not None
    if report.phase == "probation":
        assert d.record is not None
        assert d.record.phase == "probation"
        assert d.record.to_version == active
        assert report.target_version == active
    if report.phase == "committed":
        assert d.record is not None
        assert d.record.to_version == active
    if report.phase == "rolled_back":
        assert report.target_version is not None
        assert report.target_version != active
        assert report.last_error
    if report.phase == "failed":
        assert report.last_error
        assert report.target_version is None or report.target_version != active
    if report.phase in ("idle", "committed", "probation", *PROGRESS_PHASES):
        assert report.last_error is None
    if report.last_error and report.last_error.startswith("rejected: "):
        assert report.target_version in d.rejected


actions = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "fetch",
                "begin",
                "load_fails",
                "swap",
                "judge",
                "finish",
                "command_rollback",
                "boot",
                "retry",
            ]
        ),
        st.sampled_from(VERSIONS),
        st.integers(min_value=0, max_value=30),
        st.sampled_from((None, *VERSIONS)),
    ),
    max_size=40,
)
loops = st.sampled_from(
    (
        None,
        LoopStatus("running"),
        LoopStatus("failed", "loop cannot start: video file not found"),
        LoopStatus("not_installed", "configured, but no version of it is installed"),
    )
)


@settings(max_examples=400, deadline=None)
@given(actions, loops)
def test_any_sequence_of_events_reports_what_serves(
    events: list[tuple[str, str, int, str | None]], loop: LoopStatus | None
) -> None:
    d = Device()
    for action, version, requests, desired in events:
        _step(d, action, version, requests)
        report = reported_model(d.facts(desired, loop))
        _check(report, d)
        assert report.loop == (loop.health if loop else None)
        assert report.loop_error == (loop.error if loop else None)


def test_a_commanded_rollback_after_commit_reports_the_previous_version() -> None:
    d = Device()
    for action, version in (("begin", "1.0.0"), ("swap", ""), ("judge", "")):
        _step(d, action, version, 10)
    for action, version in (("begin", "2.0.0"), ("swap", ""), ("judge", "")):
        _step(d, action, version, 10)
    assert reported_model(d.facts("2.0.0", None)).phase == "committed"
    _step(d, "command_rollback", "", 0)
    assert reported_model(d.facts("2.0.0", None)).phase == "swapping"
    _step(d, "finish", "", 0)
    report = reported_model(d.facts("2.0.0", None))
    assert (report.active_version, report.phase) == ("1.0.0", "rolled_back")
    assert report.last_error == "rejected: rolled back: requested by the control plane"
    # The operator's abort also moves the desired state back: nothing is refused any more.
    report = reported_model(d.facts("1.0.0", None))
    assert (report.active_version, report.phase, report.target_version) == (
        "1.0.0",
        "rolled_back",
        "2.0.0",
    )


def test_a_version_short_of_inferences_stays_in_probation_and_says_why() -> None:
    d = Device()
    for action, version, requests in (("begin", "1.0.0", 0), ("swap", "", 0), ("judge", "", 0)):
        _step(d, action, version, requests)
    report = reported_model(d.facts("1.0.0", None))
    assert report.phase == "probation"
    assert report.detail == "served 0 of the 5 inferences"
    verdict = judge(d.record, Health(2, 0, 0.01), now=d.now + 60, limits=LIMITS)  # type: ignore[arg-type]
    assert verdict.action == "wait"
    assert verdict.reason == "1.0.0 served 2 of the 5 inferences it needs before it may commit"

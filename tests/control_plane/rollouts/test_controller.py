"""The pure rollout controller: waves, soak, rules, operator transitions, and invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from control_plane.rollouts import (
    Abort,
    Assign,
    Complete,
    DeviceStatus,
    FleetSnapshot,
    Promote,
    Rollback,
    RolloutController,
    RolloutRules,
    RolloutSpec,
    RolloutState,
    Wave,
)

CTRL = RolloutController()


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {
        "id": "r1",
        "model": "det",
        "version": "2.0.0",
        "selector": {"site": "a"},
        "waves": (
            Wave(percent=10, soak_s=60),
            Wave(percent=50, soak_s=60),
            Wave(percent=100, soak_s=60),
        ),
        "rules": RolloutRules(min_devices_reporting=1, min_reporting_share=0.5),
    }
    base.update(kw)
    return RolloutSpec.model_validate(base)


def fleet(n: int, *, site: str = "a", prefix: str = "d") -> list[DeviceStatus]:
    return [
        DeviceStatus(
            device_id=f"{prefix}{i}",
            labels={"site": site},
            version="1.0.0",
            p99_ms=10.0,
            inferences=100,
            reported_at=0.0,
        )
        for i in range(n)
    ]


def report(
    devices: list[DeviceStatus],
    state: RolloutState,
    now: float,
    *,
    p99: float = 10.0,
    failed: int = 0,
    update: str = "committed",
) -> FleetSnapshot:
    """Assigned devices have installed the new version and report at ``now``."""
    assigned = state.assigned_ids()
    out = []
    for d in devices:
        if d.device_id in assigned:
            d = d.model_copy(
                update={
                    "version": state.spec.version,
                    "p99_ms": p99,
                    "failed": failed,
                    "inferences": 100,
                    "reported_at": now,
                    "update": update,
                }
            )
        out.append(d)
    return FleetSnapshot(devices=tuple(out))


def test_waves_promote_after_soak_and_complete() -> None:
    devices = fleet(20) + fleet(5, site="b", prefix="x")
    state = RolloutState.new(spec())
    state, actions = CTRL.advance(state, FleetSnapshot(devices=tuple(devices)), 0.0)
    assert [type(a) for a in actions] == [Assign]
    assert len(actions[0].devices) == 2  # 10% of the 20 selected
    assert all(d.startswith("d") for d in actions[0].devices)  # selector honoured
    state, actions = CTRL.advance(state, report(devices, state, 30.0), 30.0)
    assert actions == []  # soaking
    state, actions = CTRL.advance(state, report(devices, state, 61.0), 61.0)
    assert [type(a) for a in actions] == [Promote, Assign]
    assert len(state.assigned) == 10
    state, _ = CTRL.advance(state, report(devices, state, 122.0), 122.0)
    assert len(state.assigned) == 20
    state, actions = CTRL.advance(state, report(devices, state, 183.0), 183.0)
    assert actions == [Complete()]
    assert state.status == "completed"
    assert CTRL.advance(state, report(devices, state, 999.0), 999.0) == (state, [])


def test_membership_is_deterministic_and_order_free() -> None:
    devices = fleet(200)
    a, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 0.0)
    b, _ = CTRL.advance(
        RolloutState.new(spec()), FleetSnapshot(devices=tuple(reversed(devices))), 0.0
    )
    c, _ = CTRL.advance(RolloutState.new(spec(id="r2")), FleetSnapshot(devices=tuple(devices)), 0.0)
    assert a.assigned_ids() == b.assigned_ids()
    assert a.assigned_ids() != c.assigned_ids()  # another rollout picks other canaries
    assert len(a.assigned) == 20


def test_p99_regression_aborts_and_rolls_back_everyone_touched() -> None:
    devices = fleet(20)
    state, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 0.0)
    state, actions = CTRL.advance(state, report(devices, state, 10.0, p99=13.0), 10.0)
    assert state.status == "aborted"
    assert isinstance(actions[0], Abort)
    assert "p99 latency +30.0%" in actions[0].reason
    assert isinstance(actions[1], Rollback)
    assert set(actions[1].devices) == state.assigned_ids()
    assert actions[1].previous_versions == dict.fromkeys(actions[1].devices, "1.0.0")


def test_error_rate_and_failed_updates_abort() -> None:
    devices = fleet(20)
    state, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 0.0)
    errs, _actions = CTRL.advance(state, report(devices, state, 5.0, failed=5), 5.0)
    assert errs.reason is not None
    assert errs.reason.startswith("error rate 5.00%")
    bad, _ = CTRL.advance(state, report(devices, state, 5.0, update="failed"), 5.0)
    assert bad.reason is not None
    assert bad.reason.startswith("failed updates 2/2")


def test_stale_or_old_version_reports_do_not_count() -> None:
    devices = fleet(20)
    state, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 100.0)
    # Telemetry received before the assignment (or from a device whose clock says "later" but
    # that the control plane received earlier) is not evidence about the new version.
    stale = report(devices, state, 50.0, p99=100.0)
    state, actions = CTRL.advance(state, stale, 200.0)
    assert state.status == "running"
    assert actions == []
    assert state.health.reporting == 0


def test_silent_devices_count_as_failed_after_the_report_timeout() -> None:
    rules = RolloutRules(min_devices_reporting=1, report_timeout_s=30)
    devices = fleet(20)
    state, _ = CTRL.advance(
        RolloutState.new(spec(rules=rules)), FleetSnapshot(devices=tuple(devices)), 0.0
    )
    state, _ = CTRL.advance(state, FleetSnapshot(devices=tuple(devices)), 80.0)
    assert (state.status, state.silent) == ("running", ())
    state, actions = CTRL.advance(state, FleetSnapshot(devices=tuple(devices)), 95.0)
    assert state.status == "aborted"
    assert (
        state.reason == "failed updates 2/2 (100.0%) > 5.0%, 2 of them silent 30 s after the soak"
    )
    assert set(state.silent) == state.assigned_ids()
    assert isinstance(actions[1], Rollback)


def test_waves_have_a_report_timeout_by_default() -> None:
    assert RolloutRules().report_timeout_s == 900.0
    assert RolloutRules().silent_devices == "failed"
    devices = fleet(20)
    state, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 0.0)
    state, _ = CTRL.advance(state, FleetSnapshot(devices=tuple(devices)), 959.0)
    assert state.status == "running"
    state, _ = CTRL.advance(state, FleetSnapshot(devices=tuple(devices)), 960.0)
    assert state.status == "aborted"


def test_silent_devices_skipped_by_policy_let_the_others_decide() -> None:
    rules = RolloutRules(min_devices_reporting=1, report_timeout_s=30, silent_devices="skipped")
    devices = fleet(40)  # 10 %: 4 canaries
    state, _ = CTRL.advance(
        RolloutState.new(spec(rules=rules)), FleetSnapshot(devices=tuple(devices)), 0.0
    )
    canaries = sorted(state.assigned_ids())
    quiet = set(canaries[:3])  # three never report; one does
    talking = [d for d in devices if d.device_id not in quiet]

    def snapshot(now: float) -> FleetSnapshot:
        reported = {d.device_id: d for d in report(talking, state, now).devices}
        return FleetSnapshot(devices=tuple(reported.get(d.device_id, d) for d in devices))

    state, actions = CTRL.advance(state, snapshot(61.0), 61.0)
    assert actions == []  # 1 of 4 reporting: not enough before the timeout
    state, actions = CTRL.advance(state, snapshot(91.0), 91.0)
    assert [type(a) for a in actions] == [Promote, Assign]
    assert state.health.silent == 3
    assert state.health.assigned == 1  # judged: the silent ones are left out
    assert set(state.silent) == quiet

    # Every device silent: nothing left to wait for, the wave is over.
    all_quiet = RolloutState.new(spec(rules=rules))
    all_quiet, _ = CTRL.advance(all_quiet, FleetSnapshot(devices=tuple(devices)), 0.0)
    all_quiet, actions = CTRL.advance(all_quiet, FleetSnapshot(devices=tuple(devices)), 91.0)
    assert isinstance(actions[0], Promote)


def test_too_few_reports_once_every_device_is_judged_aborts() -> None:
    # Failed updates are tolerated here, so only the backstop can end the wave.
    rules = RolloutRules(
        min_devices_reporting=1,
        min_reporting_share=1.0,
        report_timeout_s=30,
        max_failed_update_share=1.0,
    )
    devices = fleet(40)
    state, _ = CTRL.advance(
        RolloutState.new(spec(rules=rules)), FleetSnapshot(devices=tuple(devices)), 0.0
    )
    failing = sorted(state.assigned_ids())[0]

    def snapshot(now: float) -> FleetSnapshot:
        out = report(devices, state, now)
        return FleetSnapshot(
            devices=tuple(
                d.model_copy(update={"update": "failed"}) if d.device_id == failing else d
                for d in out.devices
            )
        )

    state, actions = CTRL.advance(state, snapshot(89.0), 89.0)
    assert (state.status, actions) == ("running", [])
    state, actions = CTRL.advance(state, snapshot(90.0), 90.0)
    assert state.status == "aborted"
    assert state.reason == "only 3/4 devices reporting 30 s after the soak"


def test_deleted_devices_are_left_out_of_the_figures() -> None:
    devices = fleet(40)
    state, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 0.0)
    gone = sorted(state.assigned_ids())[0]
    remaining = [d for d in devices if d.device_id != gone]
    state, actions = CTRL.advance(state, report(remaining, state, 61.0), 61.0)
    assert state.health.assigned == 3
    assert isinstance(actions[0], Promote)


@pytest.mark.parametrize(
    ("before_ms", "after_ms", "floor_ms", "aborts"),
    [
        (0.3, 0.7, 1.0, False),  # +133 % but +0.4 ms: jitter on a fast model
        (0.3, 0.7, 0.0, True),  # no floor: the ratio alone decides
        (0.3, 1.5, 1.0, True),  # +1.2 ms and +400 %
        (10.0, 13.0, 1.0, True),  # +30 %, +3 ms
        (10.0, 11.5, 1.0, False),  # +15 %: under the ratio whatever the floor
        (10.0, 13.0, 5.0, False),  # +3 ms under a 5 ms floor
    ],
)
def test_p99_rule_needs_both_the_ratio_and_the_absolute_floor(
    before_ms: float, after_ms: float, floor_ms: float, aborts: bool
) -> None:
    rules = RolloutRules(min_devices_reporting=1, min_p99_increase_ms=floor_ms)
    devices = [d.model_copy(update={"p99_ms": before_ms}) for d in fleet(20)]
    state, _ = CTRL.advance(
        RolloutState.new(spec(rules=rules)), FleetSnapshot(devices=tuple(devices)), 0.0
    )
    state, _ = CTRL.advance(state, report(devices, state, 10.0, p99=after_ms), 10.0)
    assert (state.status == "aborted") == aborts, state.reason
    assert state.health.p99_increase_ms == pytest.approx(after_ms - before_ms)
    if aborts:
        assert f"+{floor_ms:g} ms" in (state.reason or "")


def test_pause_freezes_and_resume_keeps_soak() -> None:
    devices = fleet(20)
    state, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 0.0)
    paused, _ = CTRL.pause(state, 30.0)
    assert CTRL.advance(paused, report(devices, paused, 500.0, p99=99.0), 500.0) == (paused, [])
    resumed, _ = CTRL.resume(paused, 500.0)
    assert resumed.wave_started_at == 470.0  # 30 s of soak done before the pause
    state, actions = CTRL.advance(resumed, report(devices, resumed, 520.0), 520.0)
    assert actions == []
    state, actions = CTRL.advance(state, report(devices, state, 531.0), 531.0)
    assert isinstance(actions[0], Promote)


def test_operator_abort_and_terminal_states() -> None:
    devices = fleet(20)
    state, _ = CTRL.advance(RolloutState.new(spec()), FleetSnapshot(devices=tuple(devices)), 0.0)
    aborted, actions = CTRL.abort(state, "operator")
    assert actions[0] == Abort(reason="operator")
    assert isinstance(actions[1], Rollback)
    assert set(actions[1].devices) == state.assigned_ids()
    assert CTRL.abort(aborted, "again") == (aborted, [])
    assert CTRL.resume(aborted, 1.0) == (aborted, [])
    assert CTRL.pause(aborted, 1.0) == (aborted, [])


def test_absolute_counts_and_bad_specs() -> None:
    devices = fleet(50)
    s = spec(waves=(Wave(count=1, soak_s=0), Wave(count=5, soak_s=0)))
    state, _actions = CTRL.advance(RolloutState.new(s), FleetSnapshot(devices=tuple(devices)), 0.0)
    assert len(state.assigned) == 1
    with pytest.raises(ValidationError, match="exactly one of percent or count"):
        Wave(percent=10, count=3)
    with pytest.raises(ValidationError, match="exactly one of percent or count"):
        Wave()
    with pytest.raises(ValidationError, match="must not decrease"):
        spec(waves=(Wave(percent=50), Wave(percent=10)))
    with pytest.raises(ValidationError):
        spec(waves=())
    with pytest.raises(ValidationError):
        spec(id="has space")


# -- invariants under random fleets, telemetry and operator actions ---------------------------

device_st = st.builds(
    lambda i, site, p99, failed, update, online: (i, site, p99, failed, update, online),
    st.integers(0, 39),
    st.sampled_from(["a", "b"]),
    st.floats(1.0, 40.0),
    st.integers(0, 5),
    st.sampled_from(["committed", "committed", "committed", "updating", "failed"]),
    st.booleans(),
)
wave_st = st.one_of(
    st.builds(
        lambda p, s: Wave(percent=p, soak_s=s), st.floats(1, 100), st.sampled_from([0, 10, 60])
    ),
    st.builds(
        lambda c, s: Wave(count=c, soak_s=s), st.integers(1, 40), st.sampled_from([0, 10, 60])
    ),
)
step_st = st.one_of(
    st.tuples(st.just("advance"), st.lists(device_st, max_size=40), st.floats(0, 30)),
    st.tuples(st.just("pause"), st.just([]), st.floats(0, 30)),
    st.tuples(st.just("resume"), st.just([]), st.floats(0, 30)),
    st.tuples(st.just("abort"), st.just([]), st.floats(0, 30)),
)


def _ordered(waves: list[Wave]) -> tuple[Wave, ...]:
    pct = iter(sorted(w.percent for w in waves if w.percent is not None))
    cnt = iter(sorted(w.count for w in waves if w.count is not None))
    return tuple(
        Wave(percent=next(pct), soak_s=w.soak_s)
        if w.percent is not None
        else Wave(count=next(cnt), soak_s=w.soak_s)
        for w in waves
    )


@settings(max_examples=150, deadline=None)
@given(
    waves=st.lists(wave_st, min_size=1, max_size=4),
    steps=st.lists(step_st, min_size=1, max_size=25),
    rules=st.builds(
        RolloutRules,
        max_failed_update_share=st.floats(0, 1),
        max_p99_regression=st.floats(0, 2),
        min_p99_increase_ms=st.floats(0, 5),
        max_error_rate=st.floats(0, 0.1),
        min_devices_reporting=st.integers(1, 5),
        report_timeout_s=st.one_of(st.none(), st.floats(1, 120)),
        silent_devices=st.sampled_from(["failed", "skipped"]),
    ),
)
def test_invariants(
    waves: list[Wave], steps: list[tuple[str, list[tuple], float]], rules: RolloutRules
) -> None:
    s = spec(waves=_ordered(waves), rules=rules)
    state = RolloutState.new(s)
    now = 0.0
    base = {
        i: DeviceStatus(
            device_id=f"d{i}", labels={"site": "a" if i % 3 else "b"}, version="1.0.0", p99_ms=10.0
        )
        for i in range(40)
    }
    for op, devs, dt in steps:
        now += dt
        before = state
        if op == "pause":
            state, actions = CTRL.pause(state, now)
            assert actions == []
            continue
        if op == "resume":
            state, actions = CTRL.resume(state, now)
            assert actions == []
            continue
        if op == "abort":
            state, actions = CTRL.abort(state, "operator")
        else:
            snapshot_devices = dict(base)
            for i, site, p99, failed, update, online in devs:
                on_new = f"d{i}" in state.assigned_ids() and update != "failed"
                snapshot_devices[i] = base[i].model_copy(
                    update={
                        "labels": {"site": site},
                        "online": online,
                        "p99_ms": p99,
                        "failed": failed,
                        "inferences": 100,
                        "reported_at": now,
                        "update": update,
                        "version": s.version if on_new else "1.0.0",
                    }
                )
            snap = FleetSnapshot(devices=tuple(snapshot_devices.values()))
            state, actions = CTRL.advance(state, snap, now)
            # Deterministic: same input, same answer.
            assert CTRL.advance(before, snap, now) == (state, actions)
            # Pause stops changes.
            if before.status == "paused":
                assert (state, actions) == (before, [])
            # Never assigns beyond the current wave (cumulative target of the selected fleet).
            size = len(
                {d.device_id for d in snap.devices if s.selects(d.labels)} | before.assigned_ids()
            )
            target = max(w.target(size) for w in s.waves[: state.wave + 1])
            assert len(state.assigned) <= max(target, len(before.assigned))
            for a in actions:
                if isinstance(a, Assign):
                    assert a.wave == state.wave or a.wave == before.wave
                    assert not set(a.devices) & before.assigned_ids()
                    labels = {d.device_id: d.labels for d in snap.devices}
                    assert all(s.selects(labels[d]) for d in a.devices)
        # Assignments are only ever added.
        assert before.assigned == state.assigned[: len(before.assigned)]
        if state.status == "aborted" and before.status != "aborted":
            rollbacks = [a for a in actions if isinstance(a, Rollback)]
            touched = state.assigned_ids()
            assert set(rollbacks[0].devices) == touched if touched else rollbacks == []
            assert set(state.rolled_back) == touched
        if before.status in ("aborted", "completed"):
            assert (state, actions) == (before, [])
        assert math.isfinite(state.wave)
        assert 0 <= state.wave < len(s.waves)


# -- no rollout hangs ---------------------------------------------------------------------------

behaviour_st = st.sampled_from(["reports", "reports_slow", "fails", "silent", "deleted"])


@settings(max_examples=150, deadline=None)
@given(
    waves=st.lists(wave_st, min_size=1, max_size=4),
    behaviours=st.lists(behaviour_st, min_size=1, max_size=30),
    rules=st.builds(
        RolloutRules,
        max_failed_update_share=st.floats(0, 1),
        max_p99_regression=st.floats(0, 2),
        min_p99_increase_ms=st.floats(0, 5),
        min_devices_reporting=st.integers(1, 5),
        min_reporting_share=st.floats(0, 1),
        report_timeout_s=st.floats(1, 120),
        silent_devices=st.sampled_from(["failed", "skipped"]),
    ),
    tick_s=st.sampled_from([1.0, 7.0, 30.0]),
)
def test_every_rollout_ends_within_soak_plus_report_timeout_per_wave(
    waves: list[Wave], behaviours: list[str], rules: RolloutRules, tick_s: float
) -> None:
    """Whatever each device does (reports, fails, stays silent, is deleted), a rollout with a
    report timeout is completed or aborted once every wave had its soak plus the timeout."""
    s = spec(waves=_ordered(waves), rules=rules)
    base = {
        f"d{i}": DeviceStatus(device_id=f"d{i}", labels={"site": "a"}, version="1.0.0", p99_ms=10.0)
        for i in range(len(behaviours))
    }
    behaviour = {f"d{i}": b for i, b in enumerate(behaviours)}
    state = RolloutState.new(s)
    assert rules.report_timeout_s is not None
    bound = sum(w.soak_s + rules.report_timeout_s + 2 * tick_s for w in s.waves)
    now = 0.0
    while now <= bound and state.status not in ("completed", "aborted"):
        assigned = state.assigned_ids()
        snapshot = []
        for device_id, d in base.items():
            kind = behaviour[device_id]
            if device_id in assigned:
                if kind == "deleted":
                    continue
                if kind in ("reports", "reports_slow"):
                    d = d.model_copy(
                        update={
                            "version": s.version,
                            "p99_ms": 10.0 if kind == "reports" else 40.0,
                            "inferences": 50,
                            "reported_at": now,
                            "update": "committed",
                        }
                    )
                elif kind == "fails":
                    d = d.model_copy(update={"update": "failed", "reported_at": now})
            snapshot.append(d)
        state, _ = CTRL.advance(state, FleetSnapshot(devices=tuple(snapshot)), now)
        now += tick_s
    assert state.status in ("completed", "aborted"), (state.status, state.health, now, bound)

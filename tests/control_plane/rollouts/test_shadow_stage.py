"""The rollout controller's shadow stage: a dark launch judged on agreement and latency before
any device serves the version."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.rollouts import (
    Abort,
    Assign,
    DeviceStatus,
    FleetSnapshot,
    RolloutController,
    RolloutRules,
    RolloutSpec,
    RolloutState,
    ShadowAssign,
    ShadowFigures,
    ShadowPassed,
    ShadowStage,
    ShadowStop,
    Wave,
)

CTRL = RolloutController()


def spec(**shadow: object) -> RolloutSpec:
    return RolloutSpec(
        id="r1",
        model="det",
        version="2.0.0",
        waves=(Wave(percent=50, soak_s=60), Wave(percent=100, soak_s=60)),
        rules=RolloutRules(min_devices_reporting=2, min_reporting_share=0.5, report_timeout_s=300),
        shadow=ShadowStage.model_validate(
            {"percent": 40, "soak_s": 30, "min_samples": 50, **shadow}
        ),
    )


def device(i: int, figures: ShadowFigures | None = None) -> DeviceStatus:
    return DeviceStatus(
        device_id=f"d{i}",
        version="1.0.0",
        p99_ms=10.0,
        inferences=100,
        reported_at=0.0,
        shadow=figures,
    )


def figures(
    *,
    samples: int = 100,
    delta: float | None = 0.0,
    ratio: float = 1.1,
    at: float = 10.0,
    **kw: object,
) -> ShadowFigures:
    return ShadowFigures.model_validate(
        {
            "version": "2.0.0",
            "samples": samples,
            "metric": "agreement",
            "value": None if delta is None else 100.0 - delta,
            "delta": delta,
            "latency_ratio": ratio,
            "reported_at": at,
            **kw,
        }
    )


def start(n: int = 10) -> tuple[RolloutState, list[str]]:
    state, actions = CTRL.advance(
        RolloutState.new(spec()), FleetSnapshot(devices=tuple(device(i) for i in range(n))), 0.0
    )
    assert state.stage == "shadow"
    (assign,) = actions
    assert isinstance(assign, ShadowAssign)
    assert assign.sample_share == 0.1
    return state, list(assign.devices)


def snapshot(n: int, shadowed: list[str], f: ShadowFigures | None) -> FleetSnapshot:
    return FleetSnapshot(
        devices=tuple(device(i, f if f"d{i}" in shadowed else None) for i in range(n))
    )


def test_shadow_first_then_waves_on_agreement() -> None:
    state, shadowed = start()
    assert len(shadowed) == 4  # 40 % of 10
    # Agreeing figures before the soak ends: nothing yet.
    state, actions = CTRL.advance(state, snapshot(10, shadowed, figures()), 20.0)
    assert actions == []
    assert state.stage == "shadow"
    assert state.shadow_health is not None
    assert state.shadow_health.reporting == 4
    # After the soak: passed, shadows stopped, wave 0 assigned in the same pass.
    state, actions = CTRL.advance(state, snapshot(10, shadowed, figures()), 31.0)
    kinds = [a.kind for a in actions]
    assert kinds == ["shadow_passed", "shadow_stop", "assign"], kinds
    assert isinstance(actions[0], ShadowPassed)
    assert "4/4 devices" in actions[0].detail
    stop, assign = actions[1], actions[2]
    assert isinstance(stop, ShadowStop)
    assert sorted(stop.devices) == sorted(shadowed)
    assert isinstance(assign, Assign)
    assert len(assign.devices) == 5
    assert state.stage == "waves"
    assert state.wave == 0
    assert state.wave_started_at == 31.0


def test_disagreement_aborts_before_any_device_serves() -> None:
    state, shadowed = start()
    state, actions = CTRL.advance(state, snapshot(10, shadowed, figures(delta=37.5)), 5.0)
    assert state.status == "aborted"
    assert state.assigned == ()  # nothing ever served the version
    assert isinstance(actions[0], Abort)
    assert "held back before serving" in actions[0].reason
    assert "-37.50 points" in actions[0].reason
    assert [a.kind for a in actions] == ["abort", "shadow_stop"]


def test_slow_shadow_aborts_on_latency() -> None:
    state, shadowed = start()
    state, _actions = CTRL.advance(state, snapshot(10, shadowed, figures(ratio=3.0)), 5.0)
    assert state.status == "aborted"
    assert "p99 x3.00" in (state.reason or "")


def test_refusals_abort_with_the_reason_counted() -> None:
    state, shadowed = start()
    refused = figures(samples=0, delta=None, refused="memory tight")
    state, _ = CTRL.advance(state, snapshot(10, shadowed, refused), 5.0)
    assert state.status == "aborted"
    assert "4 of 4 devices refused to shadow" in (state.reason or "")


def test_too_few_samples_waits_then_times_out() -> None:
    state, shadowed = start()
    few = figures(samples=10)
    state, actions = CTRL.advance(state, snapshot(10, shadowed, few), 40.0)
    assert actions == []
    assert state.stage == "shadow"
    assert state.status == "running"
    state, actions = CTRL.advance(state, snapshot(10, shadowed, few), 30.0 + 300.0 + 1.0)
    assert state.status == "aborted"
    assert "silent" in (state.reason or "") or "reported shadow figures" in (state.reason or "")


def test_stale_figures_of_another_version_do_not_count() -> None:
    state, shadowed = start()
    old = figures(delta=50.0, version="1.9.0")
    state, actions = CTRL.advance(state, snapshot(10, shadowed, old), 5.0)
    assert state.status == "running"
    assert actions == []
    before = figures(delta=50.0, at=-1.0)  # received before the device was told to shadow
    state, actions = CTRL.advance(state, snapshot(10, shadowed, before), 6.0)
    assert state.status == "running"
    assert actions == []


@settings(max_examples=60, deadline=None)
@given(
    deltas=st.lists(st.floats(0, 100), min_size=4, max_size=4),
    ratios=st.lists(st.floats(0.5, 4), min_size=4, max_size=4),
    samples=st.lists(st.integers(0, 500), min_size=4, max_size=4),
)
def test_never_serves_unless_every_figure_held(
    deltas: list[float], ratios: list[float], samples: list[int]
) -> None:
    """Whatever the devices report, wave 0 is assigned only when the sample-weighted delta and
    the median latency ratio of the devices with enough samples are within the stage's rules."""
    state, shadowed = start()
    per = {
        d: figures(samples=s, delta=x, ratio=r)
        for d, s, x, r in zip(shadowed, samples, deltas, ratios, strict=True)
    }
    fleet = FleetSnapshot(devices=tuple(device(i, per.get(f"d{i}")) for i in range(10)))
    state, actions = CTRL.advance(state, fleet, 31.0)
    ok = [(per[d].samples, per[d].delta or 0.0, per[d].latency_ratio) for d in shadowed]
    ok = [o for o in ok if o[0] >= 50]
    if any(isinstance(a, Assign) for a in actions):
        total = sum(s for s, _, _ in ok)
        assert sum(s * x for s, x, _ in ok) / total <= 1.0
        ratios_ok = sorted(r for _, _, r in ok if r is not None)
        assert len(ok) >= 2
        assert ratios_ok
        assert ratios_ok[len(ratios_ok) // 2] <= 1.5 or ratios_ok[(len(ratios_ok) - 1) // 2] <= 1.5
    else:
        assert state.assigned == ()

"""Probation and rollback on real models: a version that is slower, one that errors, one that
crashes the process (boot counter), plus commit, restart during probation and boot fallback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from agent.config import SwapConfig
from agent.contracts.events import UpdateEvent
from agent.errors import InferenceError
from agent.events import EventBus
from agent.models.activation import ModelActivator
from agent.models.probation import Limits, UpdateJournal
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore
from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.store.harness import AgentHarness


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _activator(store: ModelStore, bus: EventBus, clock: Clock, state_dir: Path) -> ModelActivator:
    swap = SwapConfig(probation_s=30, warmup_runs=2, max_p99_ratio=1.5, max_error_rate=0.05)
    slot = ModelSlot("digits", store, swap_config=swap, bus=bus, latency_runs=3)
    return ModelActivator(
        slot,
        journal=UpdateJournal(state_dir),
        limits=Limits.from_config(swap, min_requests=20),
        bus=bus,
        now=clock,
    )


@pytest.fixture
def activator(
    store: ModelStore, bus: EventBus, clock: Clock, state_dir: Path, bundles: dict[str, Path]
) -> ModelActivator:
    store.install(bundles["1.0.0"])
    store.activate("digits", "1.0.0")
    act = _activator(store, bus, clock, state_dir)
    act.boot()
    yield act  # type: ignore[misc]
    act.slot.close()


def _traffic(activator: ModelActivator, x: np.ndarray, n: int) -> int:
    errors = 0
    for i in range(n):
        try:
            activator.slot.infer({"input": x[i % len(x)][None]})
        except InferenceError:
            errors += 1
    return errors


def test_good_version_commits_after_probation(
    activator: ModelActivator,
    store: ModelStore,
    bundles: dict[str, Path],
    clock: Clock,
    digits: DigitsData,
    events: list[UpdateEvent],
) -> None:
    # Latency is another test's subject: a sub-ms model's p99 is scheduler noise on a busy box.
    activator.limits = dataclasses.replace(activator.limits, p99_slack_s=1.0)
    _traffic(activator, digits.x_test, 30)
    store.install(bundles["2.0.0"])
    activator.update("2.0.0")
    assert activator.slot.version == "2.0.0"
    assert store.active("digits") == "2.0.0"
    _traffic(activator, digits.x_test, 30)
    verdict = activator.check()
    assert verdict is not None
    assert verdict.action == "wait"
    clock.t += 31
    verdict = activator.check()
    assert verdict is not None
    assert verdict.action == "commit"
    record = activator.record()
    assert record is not None
    assert record.phase == "committed"
    steps = [e.step for e in events if e.version == "2.0.0"]
    assert steps == [
        "staged",
        "loaded",
        "warmed",
        "validated",
        "swapped",
        "activated",
        "probation_started",
        "committed",
    ]
    assert activator.check() is None


def test_slower_version_is_rolled_back(
    activator: ModelActivator,
    store: ModelStore,
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    digits: DigitsData,
    events: list[UpdateEvent],
) -> None:
    _traffic(activator, digits.x_test, 25)  # the baseline p99 of 1.0.0
    models.make_bundle(tmp_path / "slow", "2.0.0", model_files["slow"], golden_x)
    store.install(tmp_path / "slow")
    activator.update("2.0.0")
    _traffic(activator, digits.x_test, 25)
    verdict = activator.check()
    assert verdict is not None
    assert verdict.action == "rollback"
    assert "the previous version's" in (verdict.reason or "")
    assert activator.slot.version == "1.0.0"
    pointer = store.pointer("digits")
    assert pointer is not None
    assert (pointer.version, pointer.previous) == ("1.0.0", None)
    record = activator.record()
    assert record is not None
    assert record.phase == "rolled_back"
    assert "p99" in (record.reason or "")
    rolled = [e for e in events if e.step == "rolled_back"]
    assert len(rolled) == 1
    assert rolled[0].version == "1.0.0"
    assert rolled[0].from_version == "2.0.0"
    assert "p99" in (rolled[0].reason or "")


def test_erroring_version_is_rolled_back(
    activator: ModelActivator,
    store: ModelStore,
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    digits: DigitsData,
    events: list[UpdateEvent],
) -> None:
    # Golden inputs stay below the failing range, so it passes validation and fails in service.
    models.make_bundle(tmp_path / "err", "2.0.0", model_files["erroring"], golden_x * 0.5)
    store.install(tmp_path / "err")
    activator.update("2.0.0")
    assert activator.slot.version == "2.0.0"
    assert _traffic(activator, digits.x_test, 30) > 20
    verdict = activator.check()
    assert verdict is not None
    assert verdict.action == "rollback"
    assert "error rate" in (verdict.reason or "")
    assert activator.slot.version == "1.0.0"
    assert store.active("digits") == "1.0.0"
    assert _traffic(activator, digits.x_test, 30) == 0
    assert events[-1].step == "rolled_back"
    assert "error rate" in (events[-1].reason or "")


def test_restart_during_probation_resumes_it(
    activator: ModelActivator,
    store: ModelStore,
    bundles: dict[str, Path],
    clock: Clock,
    bus: EventBus,
    state_dir: Path,
) -> None:
    store.install(bundles["2.0.0"])
    activator.update("2.0.0")
    activator.slot.close()  # the process goes away
    restarted = _activator(store, bus, clock, state_dir)
    try:
        store.recover()
        plan = restarted.boot()
        assert restarted.slot.version == "2.0.0"
        assert plan.record is not None
        assert plan.record.phase == "probation"
        assert plan.record.boots == 1
    finally:
        restarted.slot.close()


def test_boot_falls_back_when_the_active_version_does_not_come_up(
    store: ModelStore,
    bus: EventBus,
    clock: Clock,
    state_dir: Path,
    bundles: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    events: list[UpdateEvent],
) -> None:
    store.install(bundles["1.0.0"])
    models.make_bundle(
        tmp_path / "b",
        "2.0.0",
        model_files["corrupt"],
        golden_x,
        reference_model=model_files["2.0.0"],
    )
    store.install(tmp_path / "b")
    store.activate("digits", "1.0.0")
    store.activate("digits", "2.0.0")  # e.g. a technician activated it without the agent running
    act = _activator(store, bus, clock, state_dir)
    try:
        act.boot()
        assert act.slot.version == "1.0.0"
        assert store.active("digits") == "1.0.0"
        assert events[-1].step == "rolled_back"
        assert "does not come up" in (events[-1].reason or "")
    finally:
        act.slot.close()


# --- a version that crashes the process ---------------------------------------------------------


def test_version_that_crashes_the_process_is_rolled_back_by_the_boot_counter(
    store: ModelStore,
    bundles: dict[str, Path],
    archives: dict[str, Path],
    state_dir: Path,
    agent_harness: AgentHarness,
) -> None:
    store.install(bundles["1.0.0"])
    store.activate("digits", "1.0.0")
    opts = ("--probation-s", "3600", "--boot-attempts", "2")
    # SIGKILL is what a segfaulting runtime or the OOM killer does to the process.
    pid = agent_harness.start(state_dir, "update", str(archives["2.0.0"]), *opts)
    agent_harness.wait_for("PROBATION 2.0.0")
    agent_harness.kill(pid)  # crash 1, on probation
    pid = agent_harness.start(state_dir, "serve", *opts)
    assert agent_harness.wait_for("SERVING") == "SERVING 2.0.0"  # one restart: another chance
    agent_harness.kill(pid)  # crash 2
    pid = agent_harness.start(state_dir, "serve", *opts)
    assert agent_harness.wait_for("SERVING") == "SERVING 1.0.0"  # crash loop: previous version
    agent_harness.kill(pid)
    record = UpdateJournal(state_dir).load("digits")
    assert record is not None
    assert record.phase == "rolled_back"
    assert "crash loop: 2 restarts while 2.0.0 was on probation" in (record.reason or "")
    assert store.active("digits") == "1.0.0"

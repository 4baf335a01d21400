"""kill -9 a real agent process at seeded random points of install, swap and probation, restart,
and check that it always comes up serving a complete, verified version.

The default form kills at 8 points; ``EDGEFLEET_SOAK=1`` runs the slow form with 60.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import SwapConfig
from agent.models.activation import ModelActivator
from agent.models.bundle import golden_sets, pack
from agent.models.probation import Limits, UpdateJournal
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore
from tests.agent.store import models
from tests.agent.store.conftest import expected_logits
from tests.agent.store.harness import AgentHarness

SOAK = os.environ.get("EDGEFLEET_SOAK") == "1"
BLOB = 4 * 1024 * 1024  # a weights-sized companion file, so installs take measurable time


@pytest.fixture(scope="module")
def heavy_archives(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path], golden_x: np.ndarray
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("heavy")
    out = {}
    for version in ("2.0.0", "3.0.0"):
        models.make_bundle(root / version, version, model_files[version], golden_x, blob_bytes=BLOB)
        out[version] = pack(root / version, root / f"digits-{version}.tar")
    return out


@pytest.fixture(scope="module")
def initial_state(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> Path:
    state = tmp_path_factory.mktemp("initial") / "state"
    store = ModelStore(state)
    store.install(bundles["1.0.0"])
    store.activate("digits", "1.0.0")
    return state


def _run_agent(
    harness: AgentHarness, state: Path, archives: dict[str, Path], kill_after_s: float | None
) -> tuple[list[str], float]:
    """Run the agent on ``state``; kill -9 it ``kill_after_s`` after READY (None: let it end).
    Returns its output and the seconds from READY to its end."""
    pid = harness.start(state, "run", str(archives["2.0.0"]), str(archives["3.0.0"]))
    harness.wait_for("READY")
    ready = time.perf_counter()
    if kill_after_s is None:
        code, lines = harness.finish()
        assert code == 0, lines
        return lines, time.perf_counter() - ready
    time.sleep(kill_after_s)
    harness.kill(pid)
    return [], time.perf_counter() - ready


def _restart_and_check(state: Path, model_files: dict[str, Path]) -> str:
    """Boot as the daemon does and check what it serves; returns the version."""
    swap = SwapConfig(probation_s=0.2, warmup_runs=1)
    store = ModelStore(state, keep_versions=2)
    store.recover()
    slot = ModelSlot("digits", store, swap_config=swap, latency_runs=1)
    activator = ModelActivator(slot, journal=UpdateJournal(state), limits=Limits.from_config(swap))
    try:
        activator.boot(resume=True)
        version = slot.version
        assert version in ("1.0.0", "2.0.0", "3.0.0")
        assert store.active("digits") == version
        manifest = store.verify("digits", version, deep=True)  # complete and verified
        [case] = golden_sets(store.path("digits", version), manifest)
        served = slot.infer_versioned(case.inputs)
        assert served[0].version == version
        np.testing.assert_allclose(
            served[1]["logits"],
            expected_logits(model_files[version], case.inputs["input"]),
            rtol=1e-5,
        )
        staging = store.root / ".staging"
        assert not staging.exists() or not any(staging.iterdir())
        for v in store.versions("digits"):
            store.verify("digits", v, deep=True)
        record = activator.record()
        assert record is None or record.phase not in ("swapping", "rolling_back")
        return version
    finally:
        slot.close()


@pytest.mark.parametrize(
    "points",
    [
        pytest.param(8, id="8-points"),
        pytest.param(
            60,
            id="60-points",
            marks=[pytest.mark.slow, pytest.mark.skipif(not SOAK, reason="set EDGEFLEET_SOAK=1")],
        ),
    ],
)
def test_kill_at_random_points_and_restart(
    initial_state: Path,
    heavy_archives: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    points: int,
    agent_harness: AgentHarness,
) -> None:
    full = tmp_path / "full"
    shutil.copytree(initial_state, full)
    out, span = _run_agent(agent_harness, full, heavy_archives, kill_after_s=None)
    assert "VERDICT 2.0.0 commit" in out
    assert "VERDICT 3.0.0 commit" in out
    assert "DONE" in out
    assert _restart_and_check(full, model_files) == "3.0.0"

    rng = random.Random(20240611)
    served = []
    for i in range(points):
        state = tmp_path / f"point-{i}"
        shutil.copytree(initial_state, state)
        _run_agent(agent_harness, state, heavy_archives, kill_after_s=rng.uniform(0.0, span))
        served.append(_restart_and_check(state, model_files))
        shutil.rmtree(state)
    assert set(served) <= {"1.0.0", "2.0.0", "3.0.0"}

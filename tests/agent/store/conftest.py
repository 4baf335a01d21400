"""Fixtures for the model store, slots and swap tests: digits CNN variants and their bundles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.config import SwapConfig
from agent.contracts.events import UpdateEvent
from agent.events import EventBus
from agent.models.bundle import pack
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore
from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.store.harness import AgentHarness

SHIFT = {"1.0.0": 0.0, "2.0.0": 5.0, "3.0.0": 10.0}


@pytest.fixture(scope="session")
def golden_x(digits: DigitsData) -> np.ndarray:
    return digits.x_test[:4]


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory, digits_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("digits-variants")
    files = {v: models.shifted(digits_path, root / f"v{v}.onnx", d) for v, d in SHIFT.items()}
    # slower by several milliseconds: beyond probation's 2 ms p99 slack on a quiet machine
    files["slow"] = models.slower(digits_path, root / "slow.onnx", tile=64)
    files["erroring"] = models.erroring(digits_path, root / "erroring.onnx")
    corrupt = root / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07 this is not a protobuf model" * 10)
    files["corrupt"] = corrupt
    return files


@pytest.fixture(scope="session")
def bundles(
    tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path], golden_x: np.ndarray
) -> dict[str, Path]:
    """Bundle directories 1.0.0, 2.0.0, 3.0.0 (outputs shifted by 0, 5, 10)."""
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for version in SHIFT:
        models.make_bundle(root / version, version, model_files[version], golden_x)
        out[version] = root / version
    return out


@pytest.fixture(scope="session")
def archives(tmp_path_factory: pytest.TempPathFactory, bundles: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    return {v: pack(d, root / f"digits-{v}.tar.gz") for v, d in bundles.items()}


@pytest.fixture
def events() -> list[UpdateEvent]:
    return []


@pytest.fixture
def bus(events: list[UpdateEvent]) -> EventBus:
    bus = EventBus("robot-test")
    bus.subscribe(events.append)
    return bus


@pytest.fixture
def store(state_dir: Path, bus: EventBus) -> ModelStore:
    return ModelStore(state_dir, keep_versions=3, bus=bus)


@pytest.fixture
def slot(store: ModelStore, bus: EventBus) -> Iterator[ModelSlot]:
    s = ModelSlot(
        "digits",
        store,
        swap_config=SwapConfig(warmup_runs=2, probation_s=10, loader_threads=1),
        bus=bus,
        latency_runs=3,
    )
    yield s
    s.close()


def expected_logits(model_file: Path, x: np.ndarray) -> np.ndarray:
    from agent.backends import Artifact, LoadOptions, load_first

    session = load_first(Artifact(model_file), LoadOptions(intra_op_threads=1))
    try:
        return session.run({"input": x})["logits"]
    finally:
        session.close()


@pytest.fixture(scope="module")
def agent_harness() -> Iterator[AgentHarness]:
    """A zygote that forks real agent processes (see agent_proc.py)."""
    harness = AgentHarness()
    yield harness
    harness.close()

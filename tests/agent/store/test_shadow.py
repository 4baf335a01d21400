"""Shadow evaluation on real sessions: a version loaded beside the serving one, sampled from the
slot's inferences, compared in task terms, within its busy budget, refused when memory is tight."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from agent.contracts.state import DesiredShadow
from agent.errors import ShadowRefusedError
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore
from agent.samples import DigitsData
from agent.shadow import ShadowEvaluator, ShadowHost
from tests.agent.store import models

DESIRED = {
    "variant_id": "onnx-fp32",
    "artifact_path": "bundles/digits/x/onnx-fp32.tar",
    "sha256": "0" * 64,
    "size": 1,
}


@pytest.fixture
def serving(
    store: ModelStore,
    bundles: dict[str, Path],
    slot: ModelSlot,
    tmp_path: Path,
    digits_path: Path,
    golden_x: np.ndarray,
) -> ModelSlot:
    """1.0.0 serving; 2.0.0 (every logit + 5: the same decisions) and 4.0.0 (class 3 always
    wins) installed beside it."""
    for v in ("1.0.0", "2.0.0"):
        store.install(bundles[v])
    bad = models.one_class_wins(digits_path, tmp_path / "bad.onnx")
    models.make_bundle(tmp_path / "b4", "4.0.0", bad, golden_x)
    store.install(tmp_path / "b4")
    store.activate("digits", "1.0.0")
    slot.start("1.0.0")
    return slot


def _drive(slot: ModelSlot, digits: DigitsData, n: int) -> None:
    for i in range(n):
        slot.infer({"input": digits.x_test[i % len(digits.x_test)][None]})
        time.sleep(0.002)  # a loop's frame gap: the shadow runs in it


def _evaluate(slot: ModelSlot, version: str, digits: DigitsData, **kw: float) -> ShadowEvaluator:
    loaded, _manifest = slot.load_shadow(version)
    evaluator = ShadowEvaluator(
        "digits",
        loaded,
        task="classification",
        sample_share=kw.get("share", 0.1),
        max_busy_share=kw.get("busy", 1.0),
    )
    slot.observer = evaluator.offer
    _drive(slot, digits, int(kw.get("n", 200)))
    time.sleep(0.2)
    slot.observer = None
    return evaluator


def test_an_equivalent_version_agrees_on_every_sample(
    serving: ModelSlot, digits: DigitsData
) -> None:
    evaluator = _evaluate(serving, "2.0.0", digits)
    window = evaluator.take_window()
    evaluator.close()
    assert window.version == "2.0.0"
    assert window.metric == "agreement"
    assert 15 <= window.samples + window.skipped <= 20  # every 10th of 200
    assert window.samples >= 10
    assert window.delta == 0.0
    assert window.value == 100.0
    assert window.latency_p99_ms is not None
    assert window.serving_p99_ms is not None
    assert serving.version == "1.0.0"  # it never served
    assert serving.loaded_versions() == ["1.0.0"]


def test_a_disagreeing_version_loses_points_in_task_terms(
    serving: ModelSlot, digits: DigitsData
) -> None:
    evaluator = _evaluate(serving, "4.0.0", digits)
    window = evaluator.take_window()
    evaluator.close()
    assert window.samples >= 10
    assert window.delta is not None
    assert window.delta > 50.0  # class 3 is right on about a tenth of the digits
    assert serving.version == "1.0.0"


def test_the_busy_budget_skips_samples_and_never_blocks_serving(
    serving: ModelSlot, digits: DigitsData
) -> None:
    evaluator = _evaluate(serving, "2.0.0", digits, share=1.0, busy=0.001, n=300)
    window = evaluator.take_window()
    evaluator.close()
    assert window.skipped > window.samples
    assert window.busy_share < 0.05


def test_memory_tight_refuses_to_shadow_with_the_reason(
    store: ModelStore, serving: ModelSlot
) -> None:
    tight = ModelSlot("digits", store, available_memory=lambda: 1024, latency_runs=1)
    tight.start("1.0.0")
    try:
        with pytest.raises(ShadowRefusedError, match="memory is tight"):
            tight.load_shadow("2.0.0")
        host = ShadowHost()
        desired = DesiredShadow(version="2.0.0", **DESIRED)  # type: ignore[arg-type]
        host.start("digits", tight, desired)
        report = host.report("digits")
        assert report is not None
        assert report.phase == "refused"
        assert "memory is tight" in (report.reason or "")
        assert tight.observer is None
        assert host.take_window("digits") is None
    finally:
        tight.close()


def test_the_host_starts_samples_and_stops_a_shadow(serving: ModelSlot, digits: DigitsData) -> None:
    host = ShadowHost()
    desired = DesiredShadow(version="2.0.0", sample_share=0.5, **DESIRED)  # type: ignore[arg-type]
    host.start("digits", serving, desired)
    assert host.report("digits") is not None
    assert host.wanted("digits", desired) is False
    # The shadow runs at a lower priority and takes a sample only while it is idle: on a busy
    # machine some of those offered are skipped, so drive until ten were taken (bounded).
    samples = 0
    for _ in range(25):
        _drive(serving, digits, 40)
        time.sleep(0.2)
        window = host.take_window("digits")
        assert window is not None
        assert window.version == "2.0.0"
        samples += window.samples
        if samples >= 10:
            break
    assert samples >= 10
    host.stop("digits")
    assert serving.observer is None
    assert host.report("digits") is None
    assert host.wanted("digits", desired) is True


def test_an_observer_that_raises_never_fails_the_request(
    serving: ModelSlot, digits: DigitsData
) -> None:
    def broken(*_: object) -> None:
        raise MemoryError("no room for a copy")

    serving.observer = broken
    try:
        out = serving.infer({"input": digits.x_test[0][None]})
    finally:
        serving.observer = None
    assert out["logits"].shape == (1, 10)

"""Model slots: the hot swap under load, draining, both swap policies, variant choice."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import psutil
import pytest
from structlog.testing import capture_logs

from agent.backends import LoadOptions
from agent.config import BackendConfig, SwapConfig
from agent.contracts.events import UpdateEvent
from agent.contracts.fit import fitting
from agent.contracts.manifest import BundleManifest, TargetConstraints, Variant
from agent.contracts.profile import CpuInfo, HardwareProfile, RuntimeInfo
from agent.errors import InferenceError, ModelError, ModelLoadError
from agent.events import EventBus
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.loaded import return_freed_memory
from agent.models.slots import ModelSlot, SlotRegistry, read_serving_record
from agent.models.store import ModelStore
from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.store.conftest import expected_logits

SOAK = os.environ.get("EDGEFLEET_SOAK") == "1"


@pytest.fixture
def two_versions(store: ModelStore, bundles: dict[str, Path]) -> ModelStore:
    for v in ("1.0.0", "2.0.0"):
        store.install(bundles[v])
    store.activate("digits", "1.0.0")
    return store


def _swaps_under_load(
    slot: ModelSlot, swaps: int, xs: np.ndarray, expected: dict[str, np.ndarray], rate_hz: float
) -> tuple[list[tuple[int, str, np.ndarray]], list[BaseException], int]:
    results: list[tuple[int, str, np.ndarray]] = []
    failures: list[BaseException] = []
    attempts = 0
    stop = threading.Event()

    def loop() -> None:
        nonlocal attempts
        period, due, i = 1.0 / rate_hz, time.perf_counter(), 0
        while not stop.is_set():
            attempts += 1
            try:
                (version, _variant), out = slot.infer_versioned({"input": xs[i % len(xs)][None]})
                results.append((i, version, out["logits"][0]))
            except BaseException as exc:
                failures.append(exc)
            i += 1
            due += period
            time.sleep(max(0.0, due - time.perf_counter()))

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        for k in range(swaps):
            time.sleep(0.03)
            slot.swap("2.0.0" if k % 2 == 0 else "1.0.0")
        time.sleep(0.03)
    finally:
        stop.set()
        worker.join()
    return results, failures, attempts


def _check_attribution(
    results: list[tuple[int, str, np.ndarray]], xs: np.ndarray, expected: dict[str, np.ndarray]
) -> set[str]:
    seen = set()
    for i, version, logits in results:
        matching = [
            v for v, ref in expected.items() if np.allclose(logits, ref[i % len(xs)], atol=1e-4)
        ]
        assert matching == [version], f"request {i} tagged {version} matches {matching}"
        seen.add(version)
    return seen


SOAK_SKIP = pytest.mark.skipif(not SOAK, reason="soak form: set EDGEFLEET_SOAK=1")


@pytest.mark.parametrize(
    "swaps",
    [
        pytest.param(20, id="20-swaps"),
        pytest.param(200, id="soak", marks=[pytest.mark.slow, SOAK_SKIP]),
    ],
)
@pytest.mark.parametrize("policy", ["availability", "resources"])
def test_swap_under_load_at_100hz(
    store: ModelStore,
    two_versions: ModelStore,
    model_files: dict[str, Path],
    digits: DigitsData,
    events: list[UpdateEvent],
    bus: EventBus,
    swaps: int,
    policy: str,
) -> None:
    xs = digits.x_test[:16]
    expected = {v: expected_logits(model_files[v], xs) for v in ("1.0.0", "2.0.0")}
    slot = ModelSlot(
        "digits",
        store,
        bus=bus,
        latency_runs=2,
        swap_config=SwapConfig(policy=policy, warmup_runs=2),  # type: ignore[arg-type]
    )
    try:
        slot.start("1.0.0")
        results, failures, attempts = _swaps_under_load(slot, swaps, xs, expected, rate_hz=100)
        assert failures == []
        assert len(results) == attempts  # nothing dropped: every request got an answer
        assert _check_attribution(results, xs, expected) == {"1.0.0", "2.0.0"}
        assert [e.step for e in events].count("swapped") == swaps + 1
        if policy == "resources":
            assert [e.step for e in events].count("paused") == swaps
        assert slot.loaded_versions() == [slot.version]  # every old session was released
    finally:
        slot.close()


def test_request_in_flight_finishes_on_the_old_session(
    store: ModelStore,
    two_versions: ModelStore,
    slot: ModelSlot,
    digits: DigitsData,
    model_files: dict[str, Path],
) -> None:
    slot.start("1.0.0")
    old = slot.current
    assert old is not None
    assert old._enter()  # a request has been accepted on 1.0.0 and is still running
    slot.swap("2.0.0")
    assert slot.version == "2.0.0"
    assert not old.closed
    assert slot.loaded_versions() == ["1.0.0", "2.0.0"]
    x = digits.x_test[:2]
    np.testing.assert_allclose(
        old._run({"input": x})["logits"], expected_logits(model_files["1.0.0"], x), rtol=1e-5
    )
    old._exit()  # the last request leaves: the old session closes
    assert old.closed
    assert slot.loaded_versions() == ["2.0.0"]
    with pytest.raises(InferenceError, match="no longer loaded"):
        old.infer({"input": x})


def test_swap_reports_steps_and_times(
    store: ModelStore, two_versions: ModelStore, slot: ModelSlot, events: list[UpdateEvent]
) -> None:
    slot.start("1.0.0")
    events.clear()
    report = slot.swap("2.0.0")
    assert (report.version, report.from_version, report.policy) == (
        "2.0.0",
        "1.0.0",
        "availability",
    )
    assert report.load_s > 0
    assert report.warmup_s > 0
    assert report.validation_s > 0
    assert report.promote_s > 0  # the hot path runs with another thread count than the loader
    assert [e.step for e in events] == ["loaded", "warmed", "validated", "swapped"]
    assert events[-1].from_version == "1.0.0"
    assert events[-1].details["policy"] == "availability"


def test_no_promote_when_the_hot_path_uses_the_loader_thread_count(
    store: ModelStore, two_versions: ModelStore
) -> None:
    slot = ModelSlot(
        "digits",
        store,
        swap_config=SwapConfig(loader_threads=1),
        load_options=LoadOptions(intra_op_threads=1),
    )
    try:
        slot.start("1.0.0")
        assert slot.swap("2.0.0").promote_s == 0.0
    finally:
        slot.close()


@pytest.mark.parametrize(("available", "policy"), [(1 << 40, "availability"), (0, "resources")])
def test_auto_policy_follows_free_memory(
    store: ModelStore, two_versions: ModelStore, available: int, policy: str
) -> None:
    slot = ModelSlot("digits", store, available_memory=lambda: available)
    try:
        slot.start("1.0.0")
        assert slot.swap("2.0.0").policy == policy
    finally:
        slot.close()


def test_failed_resource_preserving_swap_brings_the_old_version_back(
    store: ModelStore,
    two_versions: ModelStore,
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: np.ndarray,
    events: list[UpdateEvent],
    bus: EventBus,
) -> None:
    models.make_bundle(
        tmp_path / "b",
        "3.0.0",
        model_files["corrupt"],
        golden_x,
        reference_model=model_files["3.0.0"],
    )
    store.install(tmp_path / "b")
    slot = ModelSlot("digits", store, bus=bus, swap_config=SwapConfig(policy="resources"))
    try:
        slot.start("1.0.0")
        with pytest.raises(ModelLoadError):
            slot.swap("3.0.0")
        assert slot.infer_versioned({"input": golden_x})[0].version == "1.0.0"
        assert "paused" in [e.step for e in events]
        assert events[-1].step == "failed"
    finally:
        slot.close()


def test_requests_wait_during_a_pause_and_time_out_with_a_reason(
    store: ModelStore, two_versions: ModelStore, golden_x: np.ndarray
) -> None:
    slot = ModelSlot("digits", store, pause_timeout_s=0.05)
    with pytest.raises(InferenceError, match="no version is serving"):
        slot.infer({"input": golden_x})
    got: list[str] = []
    waiter = threading.Thread(
        target=lambda: got.append(slot.infer_versioned({"input": golden_x})[0].version)
    )
    slot._pause_timeout_s = 30.0
    waiter.start()
    slot.start("1.0.0")
    waiter.join()
    assert got == ["1.0.0"]
    slot.close()


def _variant(vid: str, runtime: str, precision: str, **target: object) -> Variant:
    return Variant.model_validate(
        {
            "id": vid,
            "runtime": runtime,
            "format": "onnx",
            "precision": precision,
            "entrypoint": "m.onnx",
            "files": [{"path": "m.onnx", "sha256": "0" * 64, "size": 1}],
            "inputs": [],
            "outputs": [],
            "target": TargetConstraints.model_validate(target),
        }
    )


def _profile(*runtimes: str, flags: tuple[str, ...] = ()) -> HardwareProfile:
    return HardwareProfile(
        arch="x86_64",
        os="linux",
        python="3.11",
        cpu=CpuInfo(cores=2, flags=flags),
        memory_bytes=1 << 30,
        runtimes=tuple(RuntimeInfo(name=r, version="2025.1") for r in runtimes),
    )


def test_slot_plans_with_the_variant_contract(store: ModelStore, tmp_path: Path) -> None:
    """The slot's candidates and reasons are the contract's (the control plane's own rule)."""
    manifest = BundleManifest(
        name="m",
        version="1.0.0",
        variants=(
            _variant("ov-int8", "openvino", "int8"),
            _variant("ort-int8", "onnxruntime", "int8"),
            _variant("ort-fp32", "onnxruntime", "fp32"),
            _variant("arm", "onnxruntime", "fp32", arch=("aarch64",)),
            _variant("vnni", "onnxruntime", "int8", cpu_flags=("avx512_vnni",)),
            _variant("trt", "tensorrt", "fp16"),
            _variant("gpu", "onnxruntime", "fp16", accelerator="nvidia-gpu"),
        ),
    )
    here = _profile("onnxruntime", "openvino")
    unmeasured = BackendConfig(measure=False)
    slot = ModelSlot("m", store, backend_config=unmeasured, profile=lambda: here)
    plan = slot.plan(manifest, tmp_path)
    fit = fitting(manifest.variants, here)
    assert (
        [v.id for v in plan.order]
        == [v.id for v in fit.ranked]
        == [
            "ort-fp32",
            "ov-int8",
            "ort-int8",
        ]
    )
    assert plan.left_out == fit.left_out
    assert plan.left_out == {
        "arm": "built for aarch64, this device is x86_64",
        "vnni": "needs CPU flags avx512_vnni",
        "trt": "tensorrt not usable here: not installed",
        "gpu": "needs an NVIDIA GPU",
    }
    assert plan.reason.startswith("first by the variant contract's rank")
    # Pins from the configuration narrow the field, on both sides of the wire.
    pinned_cfg = BackendConfig(pin_precision="int8", pin_backend="openvino", measure=False)
    pinned = ModelSlot("m", store, backend_config=pinned_cfg, profile=lambda: here)
    assert [v.id for v in pinned.plan(manifest, tmp_path).order] == ["ov-int8"]
    assert fitting(manifest.variants, pinned.profile()).ranked == tuple(
        pinned.plan(manifest, tmp_path).order
    )
    none_fit = ModelSlot(
        "m", store, backend_config=BackendConfig(pin_backend="tensorrt"), profile=lambda: here
    )
    with pytest.raises(ModelLoadError, match="no variant fits this device") as info:
        none_fit.plan(manifest, tmp_path)
    assert "ort-fp32: backend pinned to tensorrt" in str(info.value)


def test_slot_measures_the_fitting_variants_and_serves_the_fastest(
    store: ModelStore,
    model_files: dict[str, Path],
    golden_x: np.ndarray,
    tmp_path: Path,
    state_dir: Path,
) -> None:
    """Two accepted variants: the contract's prior names the slow one first (by id), the
    measurement serves the fast one, says why, and the decision is reused from disk."""
    bundle = tmp_path / "bundle"
    build_bundle(
        bundle,
        "digits",
        "1.0.0",
        [
            VariantSpec(model_files["slow"], id="a-slow"),
            VariantSpec(model_files["1.0.0"], id="b-fast"),
        ],
        golden_inputs={"input": golden_x},
    )
    store.install(bundle)
    store.activate("digits", "1.0.0")
    choices = state_dir / "choices"
    # A budget both loads fit in on two busy cores (CI's two test workers): with 2 s the slow
    # variant's load and golden check once spent it all, and b-fast was skipped unloaded.
    config = BackendConfig(choice_budget_s=8.0)
    slot = ModelSlot("digits", store, backend_config=config, state_dir=state_dir, latency_runs=2)
    try:
        report = slot.start("1.0.0")
        assert report.variant_id == "b-fast"
        assert slot.variant_id == "b-fast"
        assert slot.choice.startswith("measured: ")
        assert "a-slow" in slot.choice
        assert "b-fast" in slot.choice
        record = read_serving_record(choices, "digits")
        assert record is not None
        assert (record.version, record.variant_id) == ("1.0.0", "b-fast")
        cached = sorted(p.name for p in choices.glob("*.json") if not p.name.startswith("serving"))
        assert len(cached) == 1
    finally:
        slot.close()
    # After a restart the cached decision serves at once: no second measurement.
    again = ModelSlot("digits", store, backend_config=config, state_dir=state_dir, latency_runs=2)
    try:
        with capture_logs() as logs:
            assert again.start("1.0.0").variant_id == "b-fast"
        assert any(e["event"] == "choice_cached" for e in logs)
        assert not any(e["event"] == "choice_made" for e in logs)
    finally:
        again.close()


def test_memory_of_the_measured_candidates_goes_back_after_the_choice(
    store: ModelStore,
    digits_path: Path,
    model_files: dict[str, Path],
    golden_x: np.ndarray,
    tmp_path: Path,
    state_dir: Path,
) -> None:
    """A slot that measured a heavy variant (100 MB of weights) and serves the light one
    keeps no more than the light one's pages: the heap the heavy one's load and release left
    in the C allocator's arenas goes back to the OS (glibc here) once the swap is done."""
    heavy = models.heavier(digits_path, tmp_path / "heavy.onnx")
    bundle = tmp_path / "bundle"
    build_bundle(
        bundle,
        "digits",
        "1.0.0",
        [
            VariantSpec(heavy, id="a-heavy"),
            VariantSpec(model_files["1.0.0"], id="b-light"),
        ],
        golden_inputs={"input": golden_x},
    )
    store.install(bundle)
    store.activate("digits", "1.0.0")
    config = BackendConfig(choice_budget_s=30.0)
    slot = ModelSlot("digits", store, backend_config=config, state_dir=state_dir, latency_runs=2)
    expected = expected_logits(model_files["1.0.0"], golden_x)
    process = psutil.Process()
    return_freed_memory()  # what earlier tests left in the heap is not this test's
    before = process.memory_info().rss
    try:
        report = slot.start("1.0.0")
        assert slot.settle(10)  # the hand-back is queued on the loader thread
        after = process.memory_info().rss
        assert report.variant_id == "b-light"
        assert re.search(r"a-heavy [0-9.]+ ms", slot.choice), slot.choice  # it was measured
        np.testing.assert_allclose(slot.infer({"input": golden_x})["logits"], expected, atol=1e-4)
    finally:
        slot.close()
    held_mb = (after - before) / 1e6
    # Here: 37-39 MB held (the light session, the runtime's threads and code pages); without
    # the return, 135-227 MB of the heavy variant's 100 MB of weights and their copies.
    assert held_mb < 80, f"{held_mb:.0f} MB held after serving the light variant"


def test_a_chosen_variant_that_fails_to_load_falls_back_to_the_next(
    store: ModelStore, model_files: dict[str, Path], golden_x: np.ndarray, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle"
    build_bundle(
        bundle,
        "digits",
        "1.0.0",
        [
            VariantSpec(model_files["1.0.0"], id="b-good"),
            VariantSpec(model_files["corrupt"], id="a-corrupt"),
        ],
        golden_inputs={"input": golden_x},
        reference_model=model_files["1.0.0"],
    )
    store.install(bundle)
    config = BackendConfig(measure=False)
    slot = ModelSlot("digits", store, backend_config=config, latency_runs=2)
    try:
        report = slot.start("1.0.0")
        assert report.variant_id == "b-good"
        assert slot.choice.startswith("fallback after a-corrupt: ")
    finally:
        slot.close()


def test_registry_is_the_model_repository(
    store: ModelStore, two_versions: ModelStore, slot: ModelSlot, golden_x: np.ndarray
) -> None:
    registry = SlotRegistry([slot])
    slot.start("1.0.0")
    assert registry.names() == ["digits"]
    assert registry.versions("digits") == ["1.0.0"]
    served = registry.get("digits")
    assert served.ready
    assert served.version == "1.0.0"
    assert served.inputs[0].name == "input"
    assert registry.get("digits", "1.0.0") is slot
    with pytest.raises(ModelError, match="unknown model"):
        registry.get("nope")
    with pytest.raises(ModelError, match=r"version 9\.0\.0 is not loaded"):
        registry.get("digits", "9.0.0")
    assert served.infer({"input": golden_x})["logits"].shape == (4, 10)


def test_bad_inputs_to_the_choice_keep_the_serving_version(
    store: ModelStore,
    model_files: dict[str, Path],
    golden_x: np.ndarray,
    tmp_path: Path,
    state_dir: Path,
) -> None:
    """A measurement with no time, a cached decision made for another runtime version, and a
    version whose variants fit nowhere: each ends with a clear reason, never a dead slot."""
    for version, model in (("1.0.0", "1.0.0"), ("2.0.0", "2.0.0")):
        bundle = tmp_path / version
        build_bundle(
            bundle,
            "digits",
            version,
            [
                VariantSpec(model_files["slow"], id="a-slow"),
                VariantSpec(model_files[model], id="b-fast"),
            ],
            golden_inputs={"input": golden_x},
            reference_model=model_files[model],
        )
        store.install(bundle)
    live = _profile("onnxruntime", "openvino")
    profile = {"now": live}
    # A chooser out of time: the contract's first variant serves, saying why.
    hurried = BackendConfig(choice_budget_s=1e-6)
    slot = ModelSlot(
        "digits",
        store,
        backend_config=hurried,
        state_dir=state_dir,
        profile=lambda: profile["now"],
        latency_runs=2,
    )
    try:
        assert slot.start("1.0.0").variant_id == "a-slow"
        assert slot.choice.startswith("first by rank: measuring failed")
        assert "time budget spent" in slot.choice
        slot.backend_config = BackendConfig(choice_budget_s=2.0)
        # The runtime was upgraded: the cached decision no longer applies and is made again.
        profile["now"] = _profile("onnxruntime", "openvino").model_copy(
            update={"runtimes": (RuntimeInfo(name="onnxruntime", version="2099.1"),)}
        )
        with capture_logs() as logs:
            slot.swap("2.0.0")
        # measured again, not taken from the cache (on a starved machine the loader, at nice
        # +10, may spend the budget before the second candidate: that too is a new measurement)
        events = [e["event"] for e in logs]
        assert "choice_cached" not in events
        assert "choice_made" in events or any(
            e["event"] == "variant_choice_failed" and "time budget spent" in e["reason"]
            for e in logs
        ), events
        # Nothing fits any more (the runtime is gone): the swap fails with every reason, the
        # version serving before keeps serving.
        profile["now"] = _profile("openvino")
        with pytest.raises(ModelLoadError, match="no variant fits this device") as info:
            slot.swap("1.0.0")
        assert "a-slow: onnxruntime not usable here: not installed" in str(info.value)
        assert slot.version == "2.0.0"
        assert slot.infer_versioned({"input": golden_x})[0].version == "2.0.0"
    finally:
        slot.close()


def test_a_retired_version_closes_between_frames(
    store: ModelStore, two_versions: ModelStore, bus: EventBus, digits: DigitsData
) -> None:
    """With quiet swaps, the old session is released on the loader thread just after a serving
    request ends, not while a frame is in flight (a release can hold the GIL for milliseconds)."""
    slot = ModelSlot(
        "digits",
        store,
        swap_config=SwapConfig(warmup_runs=1, loader_threads=1),
        bus=bus,
        latency_runs=1,
    )
    x = {"input": digits.x_test[:1]}
    try:
        slot.start("1.0.0")
        old = slot.current
        assert old is not None
        session = old._session
        assert session is not None
        assert old._enter()  # a request still running on 1.0.0: its close waits for it
        slot.swap("2.0.0")
        new = slot.current
        assert new is not None
        # the swap's own hand-back of the heap is queued on the loader thread: let it run
        # first, or it would take the gap below and leave the close waiting for another
        assert slot.settle(10)
        slot._gap_wait_s = 30.0  # from now on only a request's end lets the close run
        slot.infer(x)  # a frame just ended on 2.0.0 ...
        assert new._enter()  # ... and the next one is in flight
        old._exit()  # 1.0.0 may close now, but a frame is running
        time.sleep(0.3)
        assert old.closed  # no new request may enter it
        assert not session._closed  # type: ignore[attr-defined]  # not released mid-frame
        new._exit()
        slot.infer(x)  # a frame ends: a gap, and the release runs in it
        deadline = time.monotonic() + 10
        while not session._closed:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the retired session was never released"
            time.sleep(0.01)
        slot._gap_wait_s = 0.25
        slot.infer(x)  # the gap the release's second step (the heap's return) waits for
    finally:
        slot.close()


@pytest.mark.openvino
@pytest.mark.parametrize(("quiet", "background"), [(True, True), (False, True), (True, False)])
def test_quiet_swaps_load_openvino_in_the_background(
    store: ModelStore,
    model_files: dict[str, Path],
    golden_x: np.ndarray,
    tmp_path: Path,
    quiet: bool,
    background: bool,
) -> None:
    """A quiet swap compiles the new OpenVINO model in a child process and imports it here
    (the compiled model reports that it came from the cache); a plain swap, or a quiet one
    told not to load in the background, compiles here."""
    for version in ("1.0.0", "2.0.0"):
        build_bundle(
            tmp_path / version,
            "digits",
            version,
            [VariantSpec(model_files[version], runtime="openvino")],
            golden_inputs=[{"input": golden_x}],
        )
        store.install(tmp_path / version)
    store.activate("digits", "1.0.0")
    slot = ModelSlot(
        "digits",
        store,
        swap_config=SwapConfig(warmup_runs=1, loader_threads=1),
        backend_config=BackendConfig(pin_backend="openvino"),
        load_options=LoadOptions(intra_op_threads=1, openvino_device="CPU"),
        latency_runs=1,
        quiet_swap=quiet,
        background_loads=background,
    )
    try:
        slot.start("1.0.0")
        assert slot.swap("2.0.0").backend == "openvino"
        current = slot.current
        assert current is not None
        raw = current._session.raw  # type: ignore[union-attr]
        assert bool(raw.get_property("LOADED_FROM_CACHE")) is (quiet and background)
        out = slot.infer({"input": golden_x})["logits"]
        np.testing.assert_allclose(out, expected_logits(model_files["2.0.0"], golden_x), atol=1e-4)
    finally:
        slot.close()


def test_a_retired_version_is_released_in_two_steps(
    store: ModelStore, two_versions: ModelStore
) -> None:
    """The runtime's release and the heap's return to the OS are separate steps, so a quiet
    slot places each in a gap of its own."""
    slot = ModelSlot("digits", store)
    try:
        slot.start("1.0.0")
        old = slot.current
        assert old is not None
        session = old._session
        handed: list[Sequence[Callable[[], None]]] = []
        old._closer = lambda steps: handed.append(steps) or True
        slot.swap("2.0.0")
        assert old.closed
        (steps,) = handed
        assert len(steps) == 2
        assert not session._closed  # type: ignore[union-attr]
        steps[0]()
        assert session._closed  # type: ignore[union-attr]
        steps[1]()
    finally:
        slot.close()


def test_settle_waits_for_the_release_of_the_retired_version(
    store: ModelStore, two_versions: ModelStore
) -> None:
    slot = ModelSlot("digits", store, swap_config=SwapConfig(warmup_runs=1), latency_runs=1)
    try:
        assert slot.settle(1.0)  # nothing queued yet
        slot.start("1.0.0")
        old = slot.current
        assert old is not None
        session = old._session
        slot.swap("2.0.0")
        assert slot.settle(10.0)
        assert session._closed  # type: ignore[union-attr]
    finally:
        slot.close()
    assert slot.settle(1.0)


def test_swaps_of_worker_sessions_reuse_the_retired_worker(
    store: ModelStore, two_versions: ModelStore, model_files: dict[str, Path], digits: DigitsData
) -> None:
    """Sessions in worker processes (as on a GPU): under a 100 Hz loop every request is
    answered by the version it names, each retired version is released, and from the second
    swap on a version loads in the worker its predecessor left (two workers in all)."""
    xs = digits.x_test[:16]
    expected = {v: expected_logits(model_files[v], xs) for v in ("1.0.0", "2.0.0")}
    slot = ModelSlot(
        "digits",
        store,
        swap_config=SwapConfig(warmup_runs=2, loader_threads=1),
        backend_config=BackendConfig(pin_backend="onnxruntime"),
        load_options=LoadOptions(intra_op_threads=1, ort_process="always"),
        latency_runs=1,
    )
    pids: list[int] = []
    try:
        slot.start("1.0.0")
        for _ in range(4):
            current = slot.current
            assert current is not None
            pids.append(current._session.pid)  # type: ignore[union-attr]
            results, failures, attempts = _swaps_under_load(slot, 1, xs, expected, rate_hz=100)
            assert failures == []
            assert len(results) == attempts
            _check_attribution(results, xs, expected)
            assert slot.settle(10.0)
        assert slot.loaded_versions() == [slot.version]
    finally:
        slot.close()
    assert len(set(pids)) == 2, pids
    assert pids[0] == pids[2]
    assert pids[1] == pids[3]

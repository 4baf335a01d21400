"""Backend and precision chosen by measurement: the pure core and the measuring driver."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.backends import Artifact, get_backend
from agent.backends.choice import (
    Candidate,
    Choice,
    Measurement,
    candidates_for_files,
    candidates_from_manifest,
    choose,
    decide,
    decision_path,
    golden_from_manifest,
    measure,
    runnable,
)
from agent.config import BackendConfig
from agent.contracts.manifest import BundleManifest, FileEntry, GoldenCase, Tolerance, Variant
from agent.contracts.profile import CpuInfo, GpuInfo, HardwareProfile, RuntimeInfo
from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, ValidationError
from agent.hardware import detect_profile
from agent.samples import DigitsData


def _m(cid: str, p50: float | None, rel: float | None = 0.0, **kw: Any) -> Measurement:
    backend, precision = cid.split(":")[:2]
    fields: dict[str, Any] = {
        "candidate": cid,
        "backend": backend,
        "format": "onnx",
        "precision": precision,
        "path": "m.onnx",
        "status": "measured",
        "p50_ms": p50,
        "runs": 10,
        "rel_l2": rel,
        "allowed_rel_l2": 0.05,
    }
    fields.update(kw)
    return Measurement(**fields)


# ----------------------------------------------------------------------------- pure core


def test_fastest_within_tolerance_wins() -> None:
    ms = [
        _m("onnxruntime:fp32:a", 50.0),
        _m("openvino:fp32:a", 30.0, 1e-5),
        _m("onnxruntime:int8:b", 20.0, 0.2),  # fastest but inaccurate
        _m("openvino:int8:b", 10.0, status="failed", detail="boom", p50_ms=None),
    ]
    best, reason = decide(ms)
    assert best.candidate == "openvino:fp32:a"
    assert "fastest within tolerance" in reason


def test_near_tie_goes_to_the_more_accurate() -> None:
    ms = [_m("openvino:int8:b", 27.0, 0.03), _m("openvino:fp32:a", 29.0, 1e-5)]
    best, reason = decide(ms, tie_margin=0.10)
    assert best.candidate == "openvino:fp32:a"
    assert "more accurate" in reason
    best, _ = decide(ms, tie_margin=0.05)
    assert best.candidate == "openvino:int8:b"


def test_pins_narrow_the_field() -> None:
    ms = [_m("onnxruntime:fp32:a", 50.0), _m("openvino:fp32:a", 30.0), _m("openvino:int8:b", 20.0)]
    assert decide(ms, pin_backend="onnxruntime")[0].candidate == "onnxruntime:fp32:a"
    best, reason = decide(ms, pin_precision="fp32")
    assert best.candidate == "openvino:fp32:a"
    assert "pinned precision=fp32" in reason
    with pytest.raises(ConfigError, match="no candidate matches the pinned backend=tensorrt"):
        decide(ms, pin_backend="tensorrt")


def test_nothing_acceptable_is_a_validation_error() -> None:
    ms = [_m("onnxruntime:int8:b", 20.0, 0.2, status="inaccurate", detail="rel_l2 0.2 > 0.05")]
    with pytest.raises(ValidationError, match=r"^digits: no candidate runs within tolerance"):
        decide(ms, model="digits")


def test_absolute_tolerance_is_honoured() -> None:
    ok = _m("openvino:fp32:a", 10.0, 1e-6, max_abs=0.5, allowed_abs=0.1)
    assert not ok.accurate
    assert decide([ok, _m("onnxruntime:fp32:a", 20.0, max_abs=0.0)])[0].backend == "onnxruntime"


# ----------------------------------------------------------------------------- candidates


def _profile(*, gpu: bool = False, openvino: bool = True) -> HardwareProfile:
    return HardwareProfile(
        arch="x86_64",
        os="test",
        python="3.10",
        cpu=CpuInfo(cores=2, flags=("avx2",)),
        gpus=(GpuInfo(vendor="nvidia", name="t", compute_capability="8.7"),) if gpu else (),
        memory_bytes=1,
        runtimes=(
            RuntimeInfo(name="onnxruntime", version="1"),
            RuntimeInfo(name="openvino", version="1", usable=openvino, reason="no devices"),
            RuntimeInfo(name="tensorrt", version="", usable=False, reason="not installed"),
        ),
    )


def test_candidates_cover_backend_precision_combinations(tmp_path: Path) -> None:
    cands = candidates_for_files(tmp_path / "m.onnx", int8=[tmp_path / "q.onnx"])
    ids = {c.id for c in cands}
    assert {"onnxruntime:fp32:m.onnx", "openvino:fp32:m.onnx", "openvino:fp16:m.onnx"} <= ids
    assert {"onnxruntime:int8:q.onnx", "openvino:int8:q.onnx", "tensorrt:int8:q.onnx"} <= ids


def test_runnable_says_why_not(tmp_path: Path) -> None:
    profile = _profile(openvino=False)
    art = Artifact(tmp_path / "m.onnx")
    assert runnable(Candidate("onnxruntime", art), profile) is None
    assert runnable(Candidate("openvino", art), profile) == "openvino not usable here: no devices"
    assert "not installed" in (runnable(Candidate("tensorrt", art), profile) or "")
    from agent.contracts.manifest import TargetConstraints

    vnni = Candidate("onnxruntime", art, target=TargetConstraints(cpu_flags=("avx512_vnni",)))
    assert runnable(vnni, profile) == "needs CPU flags avx512_vnni"
    arm = Candidate("onnxruntime", art, target=TargetConstraints(arch=("aarch64",)))
    assert runnable(arm, profile) == "built for aarch64, this device is x86_64"
    gpu_only = Candidate("onnxruntime", art, target=TargetConstraints(accelerator="nvidia-gpu"))
    assert runnable(gpu_only, profile) == "needs an NVIDIA GPU"
    assert runnable(gpu_only, _profile(gpu=True)) is None


# ----------------------------------------------------------------------------- driver


@pytest.fixture(scope="module")
def live_profile() -> HardwareProfile:
    return detect_profile()


def _golden(digits: DigitsData) -> list[dict[str, np.ndarray]]:
    return [{"input": digits.x_test[:64]}, {"input": digits.x_test[64:128]}]


def test_choose_measures_and_caches(
    digits_path: Path,
    digits_int8: Path,
    digits: DigitsData,
    live_profile: HardwareProfile,
    state_dir: Path,
) -> None:
    cands = candidates_for_files(digits_path, int8=[digits_int8], name="digits")
    cfg = BackendConfig(choice_budget_s=1.5)
    choice = choose(cands, live_profile, _golden(digits), config=cfg, state_dir=state_dir)
    by_id = {m.candidate: m for m in choice.measurements}
    assert by_id["onnxruntime:fp32:digits-cnn-v2.onnx"].rel_l2 == 0.0
    assert by_id["tensorrt:fp32:digits-cnn-v2.onnx"].status == "unsupported"
    assert by_id["onnxruntime:int8:digits-int8.onnx"].rel_l2 is not None
    chosen = by_id[choice.chosen]
    assert chosen.status == "measured"
    assert chosen.accurate
    assert chosen.runs >= 5
    timed = [m for m in choice.measurements if m.status == "measured" and m.p50_ms]
    assert chosen.p50_ms is not None
    assert chosen.p50_ms <= min(m.p50_ms for m in timed if m.p50_ms) * 1.1 + 1e-9

    path = decision_path(state_dir, choice.key)
    assert json.loads(path.read_text())["chosen"] == choice.chosen
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    # A second call is served from the cache: with no backends at all it could not measure.
    again = choose(
        cands, live_profile, _golden(digits), config=cfg, state_dir=state_dir, backends={}
    )
    assert again == choice


def test_cache_key_follows_profile_model_and_pins(
    digits_path: Path, digits: DigitsData, live_profile: HardwareProfile, state_dir: Path
) -> None:
    cands = candidates_for_files(digits_path, name="digits", backends=("onnxruntime",))
    cfg = BackendConfig(choice_budget_s=1.0)
    first = choose(cands, live_profile, _golden(digits), config=cfg, state_dir=state_dir)
    other = live_profile.model_copy(update={"cpu": CpuInfo(cores=2, flags=("avx2",))})
    second = choose(cands, other, _golden(digits), config=cfg, state_dir=state_dir)
    pinned = choose(
        cands,
        live_profile,
        _golden(digits),
        config=cfg.model_copy(update={"pin_backend": "onnxruntime"}),
        state_dir=state_dir,
    )
    assert len({first.key, second.key, pinned.key}) == 3
    digest = hashlib.sha256(digits_path.read_bytes()).hexdigest()[:16]
    assert all(c.key.startswith(digest) for c in (first, second, pinned))


def test_corrupt_cache_is_remeasured(
    digits_path: Path, digits: DigitsData, live_profile: HardwareProfile, state_dir: Path
) -> None:
    cands = candidates_for_files(digits_path, name="digits", backends=("onnxruntime",))
    cfg = BackendConfig(choice_budget_s=1.0)
    choice = choose(cands, live_profile, _golden(digits), config=cfg, state_dir=state_dir)
    path = decision_path(state_dir, choice.key)
    path.write_text("{ half a decision")
    again = choose(cands, live_profile, _golden(digits), config=cfg, state_dir=state_dir)
    assert again.chosen == choice.chosen
    assert Choice.model_validate_json(path.read_text()).key == choice.key


@pytest.mark.openvino
def test_pinned_backend_is_used(
    digits_path: Path, digits: DigitsData, live_profile: HardwareProfile
) -> None:
    cands = candidates_for_files(digits_path, name="digits")
    cfg = BackendConfig(choice_budget_s=2.0, pin_backend="openvino", pin_precision="fp32")
    choice = choose(cands, live_profile, _golden(digits), config=cfg)
    assert choice.backend == "openvino"
    assert choice.precision == "fp32"
    ort = next(m for m in choice.measurements if m.candidate.startswith("onnxruntime:fp32"))
    assert ort.rel_l2 == 0.0  # still loaded: it computes the FP32 reference
    fp16 = next(m for m in choice.measurements if m.candidate.startswith("openvino:fp16"))
    assert fp16.status == "skipped"
    assert fp16.detail == "excluded by the pinned backend/precision"
    assert "pinned" in choice.reason


def _fake_clock(step: float) -> Iterator[float]:
    t = 0.0
    while True:
        yield t
        t += step


def test_budget_is_bounded_by_the_injected_clock(digits_path: Path, digits: DigitsData) -> None:
    cands = candidates_for_files(digits_path, name="digits", backends=("onnxruntime", "openvino"))
    ticks = _fake_clock(1.0)  # every clock read costs one "second"
    out = measure(cands, _golden(digits), budget_s=2.5, now=lambda: next(ticks))
    statuses = [m.status for m in out]
    assert statuses[0] in ("measured", "skipped")
    assert "skipped" in statuses  # the budget ran out before every candidate was loaded
    assert all(m.runs <= 1 for m in out)


def test_measure_needs_golden_inputs(digits_path: Path) -> None:
    with pytest.raises(ConfigError, match="golden input"):
        measure(candidates_for_files(digits_path), [])


def test_a_broken_candidate_is_recorded_not_fatal(
    digits_path: Path, digits: DigitsData, tmp_path: Path
) -> None:
    bad = tmp_path / "bad-int8.onnx"
    bad.write_bytes(b"garbage")
    cands = candidates_for_files(digits_path, int8=[bad], backends=("onnxruntime",))
    out = measure(cands, _golden(digits), budget_s=1.0)
    assert out[0].status == "measured"
    assert out[1].status == "failed"
    assert "corrupt" in (out[1].detail or "")


def test_manifest_candidates_and_golden(
    digits_path: Path,
    digits_int8: Path,
    digits: DigitsData,
    tmp_path: Path,
    live_profile: HardwareProfile,
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    files = {"fp32.onnx": digits_path, "int8.onnx": digits_int8}
    entries = {}
    for name, src in files.items():
        data = src.read_bytes()
        (bundle / name).write_bytes(data)
        entries[name] = FileEntry(
            path=name, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )
    x = digits.x_test[:16]
    ref = (
        get_backend("onnxruntime")
        .load(
            Artifact(digits_path),
            __import__("agent.backends", fromlist=["LoadOptions"]).LoadOptions(),
        )
        .run({"input": x})["logits"]
    )
    np.savez(bundle / "golden.npz", **{"in:input": x, "out:logits": ref})
    gdata = (bundle / "golden.npz").read_bytes()
    spec_in = (TensorSpec(name="input", datatype="FP32", shape=(-1, 1, 8, 8)),)
    spec_out = (TensorSpec(name="logits", datatype="FP32", shape=(-1, 10)),)
    manifest = BundleManifest(
        name="digits",
        version="1.0.0",
        variants=(
            Variant(
                id="fp32",
                runtime="onnxruntime",
                format="onnx",
                precision="fp32",
                entrypoint="fp32.onnx",
                files=(entries["fp32.onnx"],),
                inputs=spec_in,
                outputs=spec_out,
            ),
            Variant(
                id="int8",
                runtime="onnxruntime",
                format="onnx",
                precision="int8",
                entrypoint="int8.onnx",
                files=(entries["int8.onnx"],),
                inputs=spec_in,
                outputs=spec_out,
                tolerance=Tolerance(max_rel_l2=1e-9),
            ),
        ),
        golden=(
            GoldenCase(
                file=FileEntry(
                    path="golden.npz", sha256=hashlib.sha256(gdata).hexdigest(), size=len(gdata)
                )
            ),
        ),
    )
    cands = candidates_from_manifest(manifest, bundle, backends=("onnxruntime", "openvino"))
    assert {c.id for c in cands} == {
        "onnxruntime:fp32:fp32",
        "openvino:fp32:fp32",
        "onnxruntime:int8:int8",
        "openvino:int8:int8",
    }
    inputs, refs = golden_from_manifest(manifest, bundle)
    assert list(inputs[0]) == ["input"]
    assert list(refs[0]) == ["logits"]
    choice = choose(
        cands,
        live_profile,
        inputs,
        reference_outputs=refs,
        config=BackendConfig(choice_budget_s=2.0),
    )
    assert choice.precision == "fp32"  # the INT8 variant's tolerance of 1e-9 rules it out
    int8 = [m for m in choice.measurements if m.precision == "int8"]
    assert all(m.status == "inaccurate" for m in int8)

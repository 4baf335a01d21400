"""One variant contract on both sides of the wire: for every recorded board (and a synthetic
NVIDIA desktop), the variants the control plane offers (``control_plane.desired`` resolves with
``agent.contracts.fit``) are exactly what the agent's model slot accepts, in the same order, and
every variant left out has the same reason on both sides."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import BackendConfig
from agent.contracts.fit import fits, fitting
from agent.contracts.manifest import BundleManifest, FileEntry, TargetConstraints, Variant
from agent.contracts.profile import GpuInfo, HardwareProfile, Pins, RuntimeInfo
from agent.contracts.tensors import TensorSpec
from agent.errors import ModelLoadError
from agent.hardware import detect_profile
from agent.models.slots import ModelSlot
from agent.models.store import ModelStore

BOARDS = Path(__file__).resolve().parent.parent / "fixtures" / "boards"
_IO = (TensorSpec(name="x", datatype="FP32", shape=(-1, 3)),)
_CUDA = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _variant(vid: str, runtime: str, precision: str, **target: object) -> Variant:
    fmt = {"onnxruntime": "onnx", "openvino": "openvino-ir", "tensorrt": "tensorrt-plan"}[runtime]
    return Variant(
        id=vid,
        runtime=runtime,  # type: ignore[arg-type]
        format=fmt,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        entrypoint=f"variants/{vid}/m",
        files=(FileEntry(path=f"variants/{vid}/m", sha256="0" * 64, size=1),),
        inputs=_IO,
        outputs=_IO,
        target=TargetConstraints(**target),  # type: ignore[arg-type]
    )


# What the control plane's build makes, plus the target-bound kinds a fleet meets.
VARIANTS = (
    _variant("onnx-fp32", "onnxruntime", "fp32"),
    _variant("onnx-fp16", "onnxruntime", "fp16", accelerator="nvidia-gpu"),
    _variant("onnx-int8", "onnxruntime", "int8"),
    _variant("openvino-fp16", "openvino", "fp16"),
    _variant("openvino-int8", "openvino", "int8"),
    _variant("onnx-int8-vnni", "onnxruntime", "int8", cpu_flags=("avx512_vnni",)),
    _variant("onnx-fp32-arm", "onnxruntime", "fp32", arch=("aarch64",)),
    _variant(
        "trt-fp16-sm87",
        "tensorrt",
        "fp16",
        accelerator="nvidia-gpu",
        compute_capability="8.7",
        runtime_min="10.0",
        runtime_max="11.0",
    ),
    _variant(
        "trt-fp16-sm89", "tensorrt", "fp16", accelerator="nvidia-gpu", compute_capability="8.9"
    ),
    _variant("onnx-fp32-new-ort", "onnxruntime", "fp32", runtime_min="1.30"),
)
MANIFEST = BundleManifest(name="m", version="1.0.0", variants=VARIANTS)


def _runtimes(board: HardwareProfile) -> tuple[RuntimeInfo, ...]:
    """What each board class installs (docs/deployment.md): Jetsons ONNX Runtime with CUDA and
    TensorRT, the others ONNX Runtime and OpenVINO on the CPU."""
    if board.board.kind == "jetson":
        return (
            RuntimeInfo(name="onnxruntime", version="1.23.0", devices=_CUDA),
            RuntimeInfo(name="tensorrt", version="10.3.0.30"),
        )
    return (
        RuntimeInfo(name="onnxruntime", version="1.23.2", devices=("CPUExecutionProvider",)),
        RuntimeInfo(name="openvino", version="2025.4.0", devices=("CPU",)),
    )


def _profiles() -> dict[str, HardwareProfile]:
    out = {}
    for folder in sorted(p for p in BOARDS.iterdir() if p.is_dir()):
        board = detect_profile(folder, runtimes=())
        out[folder.name] = board.model_copy(update={"runtimes": _runtimes(board)})
    desktop = out["x86-amd-zen4"].model_copy(
        update={
            "gpus": (GpuInfo(vendor="nvidia", name="NVIDIA RTX 4090", compute_capability="8.9"),),
            "runtimes": (
                RuntimeInfo(name="onnxruntime", version="1.31.1", devices=_CUDA),
                RuntimeInfo(name="tensorrt", version="10.13.0"),
                RuntimeInfo(name="openvino", version="2026.4.0", devices=("CPU",)),
            ),
        }
    )
    out["nvidia-desktop"] = desktop
    return out


PROFILES = _profiles()


def _agent_plan(profile: HardwareProfile, tmp_path: Path, pins: Pins) -> tuple[list[str], dict]:
    """The agent's side: a real model slot's plan for the manifest on this profile."""
    config = BackendConfig(measure=False, pin_backend=pins.backend, pin_precision=pins.precision)
    slot = ModelSlot("m", ModelStore(tmp_path), backend_config=config, profile=lambda: profile)
    try:
        plan = slot.plan(MANIFEST, tmp_path)
    finally:
        slot.close()
    return [v.id for v in plan.order], dict(plan.left_out)


@pytest.mark.parametrize("board", sorted(PROFILES))
@pytest.mark.parametrize(
    "pins", [Pins(), Pins(precision="int8"), Pins(backend="onnxruntime")], ids=str
)
def test_what_the_control_plane_offers_the_agent_accepts(
    board: str, pins: Pins, tmp_path: Path
) -> None:
    profile = PROFILES[board].model_copy(update={"pins": pins})
    offered = fitting(MANIFEST.variants, profile)  # what control_plane.desired sends
    order, left_out = _agent_plan(profile, tmp_path, pins)
    assert order == [v.id for v in offered.ranked]
    assert left_out == offered.left_out
    assert set(order) | set(left_out) == {v.id for v in VARIANTS}
    for variant in offered.ranked:
        assert fits(variant, profile) is None


def test_each_board_class_gets_what_it_can_run() -> None:
    def ranked(board: str) -> list[str]:
        return [v.id for v in fitting(VARIANTS, PROFILES[board]).ranked]

    orin = ranked("jetson-orin-nano-super-jp6")
    assert orin[0] == "trt-fp16-sm87"  # the plan for its GPU, then the CUDA variant
    assert "onnx-fp16" in orin
    assert "trt-fp16-sm89" not in orin
    assert fitting(VARIANTS, PROFILES["jetson-orin-nano-super-jp6"]).left_out["trt-fp16-sm89"] == (
        "built for compute capability 8.9, this GPU is 8.7"
    )
    desktop = ranked("nvidia-desktop")
    assert desktop[0] == "trt-fp16-sm89"
    assert "onnx-fp32-new-ort" in desktop
    rpi = ranked("rpi5-bookworm")
    assert "onnx-fp32-arm" in rpi
    assert "onnx-fp16" not in rpi
    assert rpi[0] in {"openvino-int8", "onnx-int8"}  # asimddp: INT8 first by the prior
    zen4 = fitting(VARIANTS, PROFILES["x86-amd-zen4"])
    assert "onnx-int8-vnni" in [v.id for v in zen4.ranked]
    assert zen4.left_out["onnx-fp16"] == "needs an NVIDIA GPU"
    assert zen4.left_out["onnx-fp32-arm"] == "built for aarch64, this device is x86_64"
    assert zen4.left_out["onnx-fp32-new-ort"] == (
        "needs onnxruntime >= 1.30, this device has 1.23.2"
    )


_flags = st.lists(st.sampled_from(["avx2", "avx512_vnni", "asimddp", "avx512_fp16"]), max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    board=st.sampled_from(sorted(PROFILES)),
    flags=_flags,
    drop=st.sets(st.sampled_from(["onnxruntime", "openvino", "tensorrt"])),
    pins=st.builds(
        Pins,
        backend=st.sampled_from([None, "onnxruntime", "openvino", "tensorrt"]),
        precision=st.sampled_from([None, "fp32", "fp16", "int8"]),
    ),
    subset=st.lists(st.sampled_from(VARIANTS), min_size=1, max_size=6, unique_by=lambda v: v.id),
)
def test_any_profile_and_variant_set_agree(
    board: str,
    flags: list[str],
    drop: set[str],
    pins: Pins,
    subset: list[Variant],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = PROFILES[board]
    profile = base.model_copy(
        update={
            "cpu": base.cpu.model_copy(update={"flags": tuple(flags)}),
            "runtimes": tuple(r for r in base.runtimes if r.name not in drop),
            "pins": pins,
        }
    )
    manifest = BundleManifest(name="m", version="1.0.0", variants=tuple(subset))
    offered = fitting(manifest.variants, profile)
    config = BackendConfig(measure=False, pin_backend=pins.backend, pin_precision=pins.precision)
    root = tmp_path_factory.mktemp("store")
    slot = ModelSlot("m", ModelStore(root), backend_config=config, profile=lambda: profile)
    try:
        if offered.ranked:
            plan = slot.plan(manifest, root)
            assert [v.id for v in plan.order] == [v.id for v in offered.ranked]
            assert dict(plan.left_out) == offered.left_out
        else:
            with pytest.raises(ModelLoadError, match="no variant fits this device") as info:
                slot.plan(manifest, root)
            for vid, why in offered.left_out.items():
                assert f"{vid}: {why}" in str(info.value)
    finally:
        slot.close()

"""The variant resolution rule, as a pure function of manifest variants and hardware profile."""

from __future__ import annotations

from agent.contracts.fit import fits, resolve_variant, version_tuple
from agent.contracts.manifest import AccuracyReport, FileEntry, TargetConstraints, Variant
from agent.contracts.profile import CpuInfo, GpuInfo, HardwareProfile, RuntimeInfo
from agent.contracts.tensors import TensorSpec

_SHA = "0" * 64
_IO = (TensorSpec(name="x", datatype="FP32", shape=(-1, 3)),)


def variant(
    vid: str,
    runtime: str = "onnxruntime",
    precision: str = "fp32",
    *,
    status: str = "accepted",
    **target: object,
) -> Variant:
    fmt = {"onnxruntime": "onnx", "openvino": "openvino-ir", "tensorrt": "tensorrt-plan"}[runtime]
    accuracy = None
    if status == "rejected":
        accuracy = AccuracyReport(
            metric="top1",
            reference=98.0,
            value=90.0,
            delta=8.0,
            samples=100,
            budget=1.0,
            accepted=False,
            reason="over budget",
        )
    return Variant(
        id=vid,
        runtime=runtime,  # type: ignore[arg-type]
        format=fmt,  # type: ignore[arg-type]
        precision=precision,  # type: ignore[arg-type]
        entrypoint=f"{vid}/model",
        files=(FileEntry(path=f"{vid}/model", sha256=_SHA, size=1),),
        inputs=_IO,
        outputs=_IO,
        target=TargetConstraints(**target),  # type: ignore[arg-type]
        accuracy=accuracy,
        status=status,  # type: ignore[arg-type]
    )


def profile(
    arch: str = "x86_64",
    flags: tuple[str, ...] = (),
    runtimes: dict[str, str] | None = None,
    gpus: tuple[GpuInfo, ...] = (),
) -> HardwareProfile:
    rts = runtimes if runtimes is not None else {"onnxruntime": "1.20.1"}
    return HardwareProfile(
        arch=arch,
        os="linux",
        python="3.11",
        cpu=CpuInfo(cores=4, flags=flags),
        gpus=gpus,
        memory_bytes=1 << 30,
        runtimes=tuple(RuntimeInfo(name=k, version=v) for k, v in rts.items()),
    )


ORT_FP32 = variant("onnx-fp32", runtime_min="1.17")
ORT_FP16 = variant("onnx-fp16", precision="fp16", accelerator="nvidia-gpu")
ORT_INT8 = variant("onnx-int8", precision="int8", runtime_min="1.17")
OV_FP16 = variant("openvino-fp16", "openvino", "fp16", arch=("x86_64", "aarch64"))
OV_INT8 = variant(
    "openvino-int8", "openvino", "int8", arch=("x86_64", "aarch64"), runtime_min="2024.0"
)
ALL = [ORT_FP32, ORT_FP16, ORT_INT8, OV_FP16, OV_INT8]
ORIN = GpuInfo(vendor="nvidia", name="Orin", compute_capability="8.7", integrated=True)


def test_int8_on_cpus_with_integer_dot_products() -> None:
    for flag in ("avx512_vnni", "avx_vnni", "amx", "asimddp"):
        assert resolve_variant(ALL, profile(flags=(flag,))) == ORT_INT8, flag


def test_fp32_on_cpus_without_them() -> None:
    assert resolve_variant(ALL, profile(flags=("avx2",))) == ORT_FP32


def test_openvino_preferred_on_cpus_when_installed() -> None:
    both = {"onnxruntime": "1.20.1", "openvino": "2026.4.0"}
    assert resolve_variant(ALL, profile(flags=("avx512_vnni",), runtimes=both)) == OV_INT8
    # no int8 instructions: OpenVINO's fp16 IR loses to fp32 on such a CPU
    assert resolve_variant(ALL, profile(runtimes=both)) == ORT_FP32
    # OpenVINO too old for the int8 variant
    old = {"onnxruntime": "1.20.1", "openvino": "2023.3.0"}
    assert resolve_variant(ALL, profile(flags=("avx512_vnni",), runtimes=old)) == ORT_INT8


def test_rejected_variants_are_never_offered() -> None:
    rejected = variant("onnx-int8", precision="int8", status="rejected")
    assert resolve_variant([ORT_FP32, rejected], profile(flags=("avx512_vnni",))) == ORT_FP32
    assert resolve_variant([rejected], profile(flags=("avx512_vnni",))) is None


def test_runtime_missing_or_out_of_range() -> None:
    assert resolve_variant(ALL, profile(runtimes={})) is None
    assert resolve_variant([ORT_FP32], profile(runtimes={"onnxruntime": "1.16.3"})) is None
    capped = variant("x", runtime_max="1.20")
    assert fits(capped, profile(runtimes={"onnxruntime": "1.20.0"})) is not None
    assert fits(capped, profile(runtimes={"onnxruntime": "1.19.2"})) is None
    unusable = profile().model_copy(
        update={"runtimes": (RuntimeInfo(name="onnxruntime", version="1.20", usable=False),)}
    )
    assert resolve_variant(ALL, unusable) is None


def test_arch_and_cpu_flags() -> None:
    x86_only = variant("x86", arch=("x86_64",))
    needs_vnni = variant("vnni", precision="int8", cpu_flags=("avx512_vnni",))
    arm = profile(arch="aarch64", flags=("asimddp",))
    assert fits(x86_only, arm) is not None
    assert fits(needs_vnni, arm) is not None
    assert fits(needs_vnni, profile(flags=("avx512f", "avx512_vnni"))) is None


def test_gpu_variants_and_tensorrt_compute_capability() -> None:
    plan87 = variant(
        "trt-87",
        "tensorrt",
        "fp16",
        accelerator="nvidia-gpu",
        compute_capability="8.7",
        runtime_min="10.0",
        runtime_max="11.0",
    )
    plan72 = variant(
        "trt-72", "tensorrt", "fp16", accelerator="nvidia-gpu", compute_capability="7.2"
    )
    variants = [*ALL, plan87, plan72]
    jetson = profile(
        arch="aarch64",
        flags=("asimddp",),
        gpus=(ORIN,),
        runtimes={"onnxruntime": "1.23.0", "tensorrt": "10.3.0.30"},
    )
    assert resolve_variant(variants, jetson) == plan87
    old_trt = jetson.model_copy(
        update={
            "runtimes": (
                RuntimeInfo(
                    name="onnxruntime",
                    version="1.23.0",
                    devices=("CUDAExecutionProvider", "CPUExecutionProvider"),
                ),
                RuntimeInfo(name="tensorrt", version="8.6.2"),
            )
        }
    )
    assert resolve_variant(variants, old_trt) == ORT_FP16  # GPU fp16 through ORT's CUDA EP
    cpu_only_ort = old_trt.model_copy(
        update={"runtimes": (RuntimeInfo(name="onnxruntime", version="1.23.0"),)}
    )
    # Without ONNX Runtime's CUDA provider the GPU variant is left out, with the reason.
    assert fits(ORT_FP16, cpu_only_ort) == (
        "needs ONNX Runtime's CUDA or TensorRT execution provider"
    )
    assert resolve_variant(variants, cpu_only_ort) == ORT_INT8
    xavier = jetson.model_copy(
        update={"gpus": (ORIN.model_copy(update={"compute_capability": "7.2"}),)}
    )
    assert resolve_variant(variants, xavier) == plan72
    assert resolve_variant(variants, profile(flags=("avx512_vnni",))) == ORT_INT8


def test_deterministic_whatever_the_order() -> None:
    p = profile(flags=("avx512_vnni",), runtimes={"onnxruntime": "1.20", "openvino": "2026.4"})
    assert {resolve_variant(order, p) for order in (ALL, ALL[::-1], ALL[2:] + ALL[:2])} == {OV_INT8}


def test_version_tuple() -> None:
    assert version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert version_tuple("1.20.1+cu124") == (1, 20, 1)
    assert version_tuple("2026.4.1-22982") == (2026, 4, 1, 22982)

"""Which variant of a model version a device should run: a pure function of the two contracts.

A variant fits a device when every one of its target constraints holds:

- the variant's runtime is installed and usable on the device, within ``runtime_min`` (inclusive)
  and ``runtime_max`` (exclusive);
- the device's arch is listed (an empty list allows any arch);
- every CPU flag the variant requires is present;
- the accelerator exists: ``cpu`` always; ``nvidia-gpu`` needs an NVIDIA GPU; ``intel-gpu`` an
  Intel GPU or an OpenVINO ``GPU`` device; ``npu`` an OpenVINO ``NPU`` device;
- a TensorRT plan's compute capability equals the device's GPU.

Rejected variants never fit. Among the fitting ones the rank is, best first:

1. accelerator: a GPU/NPU variant before a CPU one (TensorRT before other runtimes there);
2. precision on CPUs: INT8 where the CPU has integer dot-product instructions (``avx512_vnni``,
   ``avx_vnni``, ``amx_int8``/``amx``, ``asimddp``, ``i8mm``), then FP32, then FP16 unless the CPU
   computes in FP16 natively (``avx512_fp16``, ``asimdhp``); on GPUs FP16/INT8 before FP32;
3. runtime on CPUs: OpenVINO before ONNX Runtime (its CPU plugin measured faster on x86 and ARM);
4. the variant id, so the answer is deterministic.

The agent may still measure locally and fall back; this rule only picks what to download.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from agent.contracts.manifest import Variant
from agent.contracts.profile import HardwareProfile

__all__ = ["INT8_DOT_FLAGS", "fits", "rank", "resolve_variant", "version_tuple"]

INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "amx", "asimddp", "i8mm"})
FP16_NATIVE_FLAGS = frozenset({"avx512_fp16", "asimdhp"})
_NUM = re.compile(r"\d+")


def version_tuple(version: str) -> tuple[int, ...]:
    """Numeric parts of a runtime version: ``"10.3.0.30"`` -> ``(10, 3, 0, 30)``."""
    return tuple(int(p) for p in _NUM.findall(version.split("+", 1)[0]))


def _accelerator_present(variant: Variant, profile: HardwareProfile) -> bool:
    acc = variant.target.accelerator
    if acc == "cpu":
        return True
    if acc == "nvidia-gpu":
        return any(g.vendor == "nvidia" for g in profile.gpus)
    runtime = profile.runtime(variant.runtime)
    devices = runtime.devices if runtime else ()
    if acc == "intel-gpu":
        return any(g.vendor == "intel" for g in profile.gpus) or any(
            d.upper().startswith("GPU") for d in devices
        )
    return any(d.upper().startswith("NPU") for d in devices)


def fits(variant: Variant, profile: HardwareProfile) -> bool:
    """Whether ``variant`` can run on the device described by ``profile``."""
    if variant.status != "accepted":
        return False
    target = variant.target
    runtime = profile.runtime(variant.runtime)
    if runtime is None:
        return False
    have = version_tuple(runtime.version)
    if target.runtime_min and have < version_tuple(target.runtime_min):
        return False
    if target.runtime_max and have >= version_tuple(target.runtime_max):
        return False
    if target.arch and profile.arch not in target.arch:
        return False
    flags = set(profile.cpu.flags)
    if not set(target.cpu_flags) <= flags:
        return False
    if not _accelerator_present(variant, profile):
        return False
    if target.compute_capability is not None:
        return target.compute_capability == profile.compute_capability()
    return variant.runtime != "tensorrt" or target.accelerator == "nvidia-gpu"


def rank(variant: Variant, profile: HardwareProfile) -> tuple[int, int, int, str]:
    """Sort key of a fitting variant; smaller is better."""
    flags = set(profile.cpu.flags)
    on_cpu = variant.target.accelerator == "cpu"
    accelerator = 2 if on_cpu else (0 if variant.runtime == "tensorrt" else 1)
    if on_cpu:
        order = ["fp32", "fp16", "int8"]
        if flags & INT8_DOT_FLAGS:
            order.remove("int8")
            order.insert(0, "int8")
        if flags & FP16_NATIVE_FLAGS:
            order.remove("fp16")
            order.insert(1 if order[0] == "int8" else 0, "fp16")
        precision = order.index(variant.precision)
        runtime = {"openvino": 0, "onnxruntime": 1}.get(variant.runtime, 2)
    else:
        precision = {"fp16": 0, "int8": 1, "fp32": 2}[variant.precision]
        runtime = 0
    return (accelerator, precision, runtime, variant.id)


def resolve_variant(variants: Sequence[Variant], profile: HardwareProfile) -> Variant | None:
    """The best fitting accepted variant for this device, or ``None`` when none fits."""
    fitting = [v for v in variants if fits(v, profile)]
    if not fitting:
        return None
    return min(fitting, key=lambda v: rank(v, profile))

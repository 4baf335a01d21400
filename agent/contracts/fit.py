"""The variant contract: which variants of a model version can run on a device, and in what order
to try them. Pure functions of the bundle manifest's variants and the device's hardware profile;
the control plane resolves desired states with them and the agent's model slots choose with them,
so both sides agree on every variant and give the same reason for every one left out.

A variant fits a device when every check below holds, in this order (the first that fails is the
reason):

1. it was accepted at build;
2. it matches the device's pins (``HardwareProfile.pins``: a backend and/or a precision);
3. its runtime is installed and usable on the device, within ``runtime_min`` (inclusive) and
   ``runtime_max`` (exclusive);
4. the device's arch is listed (an empty list allows any arch);
5. every CPU flag the variant requires is present;
6. its accelerator exists and the runtime can reach it: ``cpu`` always; ``nvidia-gpu`` needs an
   NVIDIA GPU and, for ONNX Runtime, its CUDA or TensorRT execution provider; ``intel-gpu`` an
   Intel GPU or an OpenVINO ``GPU`` device; ``npu`` an OpenVINO ``NPU`` device;
7. a TensorRT plan's compute capability equals the device's GPU (TensorRT plans need a GPU).

``rank`` orders the fitting variants by a prior, best first: this is the download order and the
fallback order, and the device measures the top ones before it serves (``agent.models.slots``).

1. accelerator: a GPU/NPU variant before a CPU one (TensorRT before other runtimes there);
2. precision on CPUs: INT8 where the CPU has integer dot-product instructions (``avx512_vnni``,
   ``avx_vnni``, ``amx_int8``/``amx``, ``asimddp``, ``i8mm``), then FP32, then FP16 unless the CPU
   computes in FP16 natively (``avx512_fp16``, ``asimdhp``); on GPUs FP16/INT8 before FP32;
3. runtime on CPUs: OpenVINO before ONNX Runtime (its CPU plugin measured faster on x86 and ARM);
4. the variant id, so the answer is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from agent.contracts.manifest import Variant
from agent.contracts.profile import HardwareProfile, Pins

__all__ = [
    "FP16_NATIVE_FLAGS",
    "GPU_PROVIDERS",
    "INT8_DOT_FLAGS",
    "Fit",
    "fits",
    "fitting",
    "rank",
    "resolve_variant",
    "version_tuple",
]

INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "amx", "asimddp", "i8mm"})
FP16_NATIVE_FLAGS = frozenset({"avx512_fp16", "asimdhp"})
# ONNX Runtime execution providers that put a variant on an NVIDIA GPU.
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
_NUM = re.compile(r"\d+")


def version_tuple(version: str) -> tuple[int, ...]:
    """Numeric parts of a runtime version: ``"10.3.0.30"`` -> ``(10, 3, 0, 30)``."""
    return tuple(int(p) for p in _NUM.findall(version.split("+", 1)[0]))


def _accelerator_missing(variant: Variant, profile: HardwareProfile) -> str | None:
    acc = variant.target.accelerator
    runtime = profile.runtime(variant.runtime)
    devices = runtime.devices if runtime else ()
    if acc == "nvidia-gpu" or variant.runtime == "tensorrt":
        if not any(g.vendor == "nvidia" for g in profile.gpus):
            return "needs an NVIDIA GPU"
        if variant.runtime == "onnxruntime" and not GPU_PROVIDERS & set(devices):
            return "needs ONNX Runtime's CUDA or TensorRT execution provider"
        return None
    if acc == "cpu":
        return None
    if acc == "intel-gpu":
        if any(g.vendor == "intel" for g in profile.gpus) or any(
            d.upper().startswith("GPU") for d in devices
        ):
            return None
        return "needs an Intel GPU"
    if any(d.upper().startswith("NPU") for d in devices):
        return None
    return "needs an NPU"


def fits(variant: Variant, profile: HardwareProfile, pins: Pins | None = None) -> str | None:
    """Why ``variant`` cannot run on the device described by ``profile``; ``None`` when it can.

    ``pins`` default to the profile's own (what the device's configuration pins).
    """
    pins = profile.pins if pins is None else pins
    if variant.status != "accepted":
        return "rejected at build"
    if pins.backend and variant.runtime != pins.backend:
        return f"backend pinned to {pins.backend}"
    if pins.precision and variant.precision != pins.precision:
        return f"precision pinned to {pins.precision}"
    target = variant.target
    runtime = profile.runtime(variant.runtime)
    if runtime is None:
        other = next((r for r in profile.runtimes if r.name == variant.runtime), None)
        why = other.reason if other is not None and other.reason else "not installed"
        return f"{variant.runtime} not usable here: {why}"
    have = version_tuple(runtime.version)
    if target.runtime_min and have < version_tuple(target.runtime_min):
        return f"needs {variant.runtime} >= {target.runtime_min}, this device has {runtime.version}"
    if target.runtime_max and have >= version_tuple(target.runtime_max):
        return f"needs {variant.runtime} < {target.runtime_max}, this device has {runtime.version}"
    if target.arch and profile.arch not in target.arch:
        return f"built for {', '.join(target.arch)}, this device is {profile.arch}"
    missing = [f for f in target.cpu_flags if f not in profile.cpu.flags]
    if missing:
        return f"needs CPU flags {', '.join(missing)}"
    why_not = _accelerator_missing(variant, profile)
    if why_not is not None:
        return why_not
    cc = profile.compute_capability()
    if target.compute_capability is not None and target.compute_capability != cc:
        return f"built for compute capability {target.compute_capability}, this GPU is {cc}"
    return None


def rank(variant: Variant, profile: HardwareProfile) -> tuple[int, int, int, str]:
    """Sort key of a fitting variant; smaller is better."""
    flags = set(profile.cpu.flags)
    on_cpu = variant.target.accelerator == "cpu" and variant.runtime != "tensorrt"
    accelerator = 2 if on_cpu else (0 if variant.runtime == "tensorrt" else 1)
    if on_cpu:
        order = ["fp32", "fp16", "int8"]
        if flags & INT8_DOT_FLAGS:
            order.remove("int8")
            order.insert(0, "int8")
        if flags & FP16_NATIVE_FLAGS:
            order.remove("fp16")
            order.insert(1 if order[0] == "int8" else 0, "fp16")
        # weight-only INT4 (a gated variant: a quarter of the weights' memory traffic) comes
        # before FP32, after what the CPU computes natively in lower precision
        order.insert(order.index("fp32"), "int4")
        precision = order.index(variant.precision)
        runtime = {"openvino": 0, "onnxruntime": 1}.get(variant.runtime, 2)
    else:
        precision = {"fp16": 0, "int8": 1, "int4": 2, "fp32": 3}[variant.precision]
        runtime = 0
    return (accelerator, precision, runtime, variant.id)


@dataclass(frozen=True)
class Fit:
    """The variants of one model version that fit a device, best first by ``rank``, and the
    reason for every one left out (by variant id)."""

    ranked: tuple[Variant, ...]
    left_out: dict[str, str]

    def reasons(self) -> str:
        """``"<id>: <reason>; ..."``, for error messages."""
        return "; ".join(f"{vid}: {why}" for vid, why in self.left_out.items())


def fitting(variants: Iterable[Variant], profile: HardwareProfile, pins: Pins | None = None) -> Fit:
    """Every variant checked with ``fits``: the fitting ones ranked, the others with a reason."""
    keep: list[Variant] = []
    left_out: dict[str, str] = {}
    for variant in variants:
        why = fits(variant, profile, pins)
        if why is None:
            keep.append(variant)
        else:
            left_out[variant.id] = why
    keep.sort(key=lambda v: rank(v, profile))
    return Fit(tuple(keep), left_out)


def resolve_variant(variants: Iterable[Variant], profile: HardwareProfile) -> Variant | None:
    """The best fitting variant for this device by the prior, or ``None`` when none fits."""
    ranked = fitting(variants, profile).ranked
    return ranked[0] if ranked else None

"""Measuring variants against FP32: the accuracy gate and the golden tolerances.

Owns the metrics and their meaning:

- ``top1`` (validation set with ``labels``, classifier output ``(N, classes)``): percent of
  samples whose arg-max is the label; ``delta`` = FP32 top-1 - variant top-1, in points.
- ``agreement`` (no labels, classifier output): percent of samples whose arg-max equals
  FP32's; ``delta`` = 100 - agreement.
- ``rel_l2`` (no labels, any other output): ``100 * ||variant - fp32|| / ||fp32||`` over the
  whole set, the worst output counted; ``delta`` = that figure.

A variant is accepted when ``delta <= budget``. Golden tolerances are the measured relative
L2 error on the golden inputs times ``HEADROOM``, never below a per-precision floor, so a
device's own kernels (another ISA, another runtime build) have room without hiding a broken
artifact. Running a file in its runtime is done by the runners here; deciding what to build is
the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.contracts.manifest import AccuracyReport, Precision, Tolerance
from control_plane.builds._samples import Feeds, SampleSet

__all__ = [
    "HEADROOM",
    "TOLERANCE_FLOOR",
    "Runner",
    "accuracy_report",
    "is_classifier",
    "openvino_runner",
    "ort_runner",
    "rel_l2",
    "run_samples",
    "tolerance",
]

Runner = Callable[[Feeds], list[np.ndarray[Any, Any]]]

HEADROOM = 3.0
TOLERANCE_FLOOR: dict[str, float] = {"fp32": 1e-4, "fp16": 5e-3, "int8": 2e-2}
_EPS = 1e-12


def ort_runner(path: Path, output_names: Sequence[str]) -> Runner:
    """An ONNX Runtime CPU session returning outputs in ``output_names`` order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = list(output_names)

    def run(feeds: Feeds) -> list[np.ndarray[Any, Any]]:
        return [np.asarray(o) for o in session.run(names, feeds)]

    return run


def openvino_runner(
    xml_path: Path, output_names: Sequence[str], *, precision_hint: str | None = None
) -> Runner:
    """An OpenVINO CPU compiled model returning outputs in ``output_names`` order.

    ``precision_hint="f32"`` measures the artifact itself; ``None`` keeps the CPU plugin's
    default, which is bf16 on CPUs with AVX512_BF16/AMX.
    """
    import openvino as ov

    config = {} if precision_hint is None else {"INFERENCE_PRECISION_HINT": precision_hint}
    compiled = ov.Core().compile_model(str(xml_path), "CPU", config)
    ports = []
    for name in output_names:
        port = next((p for p in compiled.outputs if name in p.get_names()), None)
        if port is None:
            raise KeyError(f"output {name!r} not found in {xml_path.name}")
        ports.append(port)

    def run(feeds: Feeds) -> list[np.ndarray[Any, Any]]:
        result = compiled(feeds)
        return [np.asarray(result[p]) for p in ports]

    return run


def run_samples(runner: Runner, samples: SampleSet, *, batch: bool) -> list[np.ndarray[Any, Any]]:
    """Every output over the whole set, samples stacked on axis 0 (one feed per sample)."""
    per_output: list[list[np.ndarray[Any, Any]]] = []
    for feeds in samples.chunks(32 if batch else 1):
        outputs = runner(feeds)
        if not per_output:
            per_output = [[] for _ in outputs]
        for acc, out in zip(per_output, outputs, strict=True):
            acc.append(out if batch else out[None])
    return [np.concatenate(chunks, axis=0) for chunks in per_output]


def rel_l2(value: np.ndarray[Any, Any], reference: np.ndarray[Any, Any]) -> float:
    diff = float(np.linalg.norm((value.astype(np.float64) - reference.astype(np.float64)).ravel()))
    return diff / max(float(np.linalg.norm(reference.astype(np.float64).ravel())), _EPS)


def is_classifier(reference: np.ndarray[Any, Any]) -> bool:
    """A first output holding one score vector per sample: ``(N, classes)``, ``(N, 1, classes)``."""
    per_sample = [d for d in reference.shape[1:] if d != 1]
    return len(per_sample) == 1 and per_sample[0] > 1 and reference.dtype.kind == "f"


def _top1(output: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray(output.reshape(output.shape[0], -1).argmax(axis=1))


def accuracy_report(
    reference: list[np.ndarray[Any, Any]],
    variant: list[np.ndarray[Any, Any]],
    *,
    labels: np.ndarray[Any, Any] | None,
    classifier: bool,
    budget: float,
) -> AccuracyReport:
    """The variant against FP32 over the same samples, gated by ``budget``."""
    samples = int(reference[0].shape[0])
    if labels is not None and classifier:
        ref = float((_top1(reference[0]) == labels).mean() * 100.0)
        value = float((_top1(variant[0]) == labels).mean() * 100.0)
        metric, delta, what = "top1", ref - value, "top-1 dropped"
    elif classifier:
        ref = 100.0
        value = float((_top1(variant[0]) == _top1(reference[0])).mean() * 100.0)
        metric, delta, what = "agreement", ref - value, "agreement with FP32 dropped"
    else:
        ref = 0.0
        value = 100.0 * max(rel_l2(v, r) for v, r in zip(variant, reference, strict=True))
        metric, delta, what = "rel_l2", value, "relative L2 error vs FP32 is"
    accepted = bool(delta <= budget + 1e-9)
    reason = None if accepted else f"{what} {delta:.2f} points, over the budget of {budget:g}"
    return AccuracyReport(
        metric=metric,  # type: ignore[arg-type]
        reference=round(ref, 4),
        value=round(value, 4),
        delta=round(delta, 4),
        samples=samples,
        budget=budget,
        accepted=accepted,
        reason=reason,
    )


def tolerance(
    reference: list[np.ndarray[Any, Any]],
    variants: Sequence[list[np.ndarray[Any, Any]]],
    precision: Precision,
) -> tuple[Tolerance, float]:
    """The golden tolerance and the worst relative L2 error it was derived from.

    ``variants`` holds the variant's golden outputs under each runtime setting a device may
    use (for OpenVINO: the f32 hint and the plugin default); the worst one counts.
    """
    measured = max(
        rel_l2(v[i], r[i])
        for variant in variants
        for v, r in zip(variant, reference, strict=True)
        for i in range(r.shape[0])
    )
    bound = max(measured * HEADROOM, TOLERANCE_FLOOR[precision])
    return Tolerance(max_rel_l2=float(f"{bound:.3g}")), measured

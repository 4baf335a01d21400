"""Measuring variants against FP32: the accuracy gate, golden tolerances, speed and weights.

The metrics and their meaning are ``agent.contracts.accuracy``'s (the same functions a device
may use to compare a shadow version's outputs); this module runs files in their runtime and
turns a ``TaskScore`` into the manifest's ``AccuracyReport``: a variant is accepted when the
deciding metric's ``delta <= budget`` (points of that metric).

Golden tolerances are the measured relative L2 error on the golden inputs times ``HEADROOM``,
never below a per-precision floor, so a device's own kernels (another ISA, another runtime
build) have room without hiding a broken artifact. Deciding what to build is the caller's.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.contracts.accuracy import Task, TaskScore, is_classifier, rel_l2, score_task
from agent.contracts.manifest import AccuracyReport, ComputeCheck, Precision, Tolerance
from control_plane.builds._samples import Feeds, SampleSet

__all__ = [
    "HEADROOM",
    "TOLERANCE_FLOOR",
    "Gate",
    "Runner",
    "accuracy_report",
    "compiled_runner",
    "host_reduced_type",
    "is_classifier",
    "latency_ms",
    "openvino_runner",
    "ort_runner",
    "rel_l2",
    "run_samples",
    "tolerance",
    "with_reduced_compute",
]

Runner = Callable[[Feeds], list[np.ndarray[Any, Any]]]

HEADROOM = 3.0
TOLERANCE_FLOOR: dict[str, float] = {"fp32": 1e-4, "fp16": 5e-3, "int8": 2e-2, "int4": 2e-2}


def ort_runner(path: Path, output_names: Sequence[str]) -> Runner:
    """An ONNX Runtime CPU session returning outputs in ``output_names`` order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = list(output_names)

    def run(feeds: Feeds) -> list[np.ndarray[Any, Any]]:
        return [np.asarray(o) for o in session.run(names, feeds)]

    return run


def openvino_runner(
    model: Path | Any, output_names: Sequence[str], *, precision_hint: str | None = None
) -> Runner:
    """An OpenVINO CPU compiled model returning outputs in ``output_names`` order.

    ``model`` is an IR path or an in-memory ``openvino.Model``. ``precision_hint="f32"``
    measures the artifact itself; ``None`` keeps the CPU plugin's default, which is bf16 on
    CPUs with AVX512_BF16/AMX.
    """
    import openvino as ov

    config = {} if precision_hint is None else {"INFERENCE_PRECISION_HINT": precision_hint}
    source = str(model) if isinstance(model, Path) else model
    compiled = ov.Core().compile_model(source, "CPU", config)
    return compiled_runner(compiled, output_names)


def compiled_runner(compiled: Any, output_names: Sequence[str]) -> Runner:
    """Outputs of an OpenVINO ``CompiledModel`` in ``output_names`` order."""
    ports = []
    for name in output_names:
        port = next((p for p in compiled.outputs if name in p.get_names()), None)
        if port is None:
            raise KeyError(f"output {name!r} not found in the compiled model")
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


def latency_ms(runner: Runner, feeds: Feeds, *, budget_s: float = 2.0, max_runs: int = 20) -> float:
    """Median milliseconds of one call on the build host: 2 warm-up calls, then at least 3 and
    at most ``max_runs`` timed calls within about ``budget_s`` seconds."""
    for _ in range(2):
        runner(feeds)
    times: list[float] = []
    deadline = time.monotonic() + budget_s
    while len(times) < max_runs and (len(times) < 3 or time.monotonic() < deadline):
        start = time.perf_counter()
        runner(feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


@dataclass(frozen=True)
class Gate:
    """The accuracy gate of one build: the task, the evaluation set and its FP32 outputs.

    ``score`` measures outputs (all of the set, or the samples at ``indices``) against the
    FP32 reference; ``run`` runs a runner over the set first; ``passes`` applies the budget.
    Accuracy-aware quantizers search with the same gate the variant is finally judged by.
    """

    task: Task
    samples: SampleSet
    reference: list[np.ndarray[Any, Any]]
    budget: float
    batch: bool

    def score(
        self, outputs: list[np.ndarray[Any, Any]], indices: Sequence[int] | None = None
    ) -> TaskScore:
        reference = self.reference
        labels = self.samples.labels
        if indices is not None:
            pick = np.asarray(list(indices), np.int64)
            reference = [r[pick] for r in reference]
            labels = None if labels is None else labels[pick]
        return score_task(self.task, reference, outputs, labels=labels)

    def run(self, runner: Runner) -> TaskScore:
        return self.score(run_samples(runner, self.samples, batch=self.batch))

    def passes(self, score: TaskScore) -> bool:
        return bool(score.delta <= self.budget + 1e-9)


_WHAT = {
    "top1": "top-1 dropped",
    "agreement": "agreement with FP32 dropped",
    "box_f1": "box F1 vs FP32 dropped",
    "mask_iou": "thresholded-map IoU vs FP32 dropped",
    "cosine": "cosine similarity to FP32 dropped",
    "retrieval": "top-k retrieval agreement with FP32 dropped",
    "rel_l2": "relative L2 error vs FP32 is",
}


def accuracy_report(score: TaskScore, *, budget: float) -> AccuracyReport:
    """The manifest's report of a ``TaskScore`` gated by ``budget`` (points of its metric)."""
    accepted = bool(score.delta <= budget + 1e-9)
    reason = None
    if not accepted:
        reason = (
            f"{score.metric}: {_WHAT[score.metric]} {score.delta:.2f} points,"
            f" over the budget of {budget:g}"
        )
    return AccuracyReport(
        metric=score.metric,
        reference=round(score.reference, 4),
        value=round(score.value, 4),
        delta=round(score.delta, 4),
        samples=score.samples,
        budget=budget,
        accepted=accepted,
        reason=reason,
        task=score.task,
        metrics={k: round(v, 4) for k, v in score.metrics.items()},
    )


@functools.cache
def host_reduced_type() -> str | None:
    """The reduced float type OpenVINO's CPU plugin computes in by default on this host (``bf16``
    on AVX512-BF16/AMX CPUs), or ``None`` where it computes in f32 (the same question a
    device's agent asks, ``OpenVinoBackend.cpu_inference_type``)."""
    import openvino as ov

    found = str(ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name())
    return None if found == "f32" else found


def with_reduced_compute(report: AccuracyReport, kind: str, score: TaskScore) -> AccuracyReport:
    """``report`` with the same metric measured again while the runtime computed the variant's
    float parts in ``kind``, gated by the same budget."""
    check = ComputeCheck(
        value=round(score.value, 4),
        delta=round(score.delta, 4),
        accepted=bool(score.delta <= report.budget + 1e-9),
    )
    return report.model_copy(update={"reduced_compute": {**report.reduced_compute, kind: check}})


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

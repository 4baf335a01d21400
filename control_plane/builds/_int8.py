"""Accuracy-aware INT8: search for a quantization that keeps the task inside its budget.

Each search is judged by the build's own ``Gate`` (the task metric against FP32 on the
validation set) and records every step it took (``QuantStep``: what was tried, the metric,
the float operations kept, the seconds spent).

- **ONNX Runtime** (``search_onnx_int8``): static QDQ with per-channel S8 weights, one
  calibration method after another (``Int8Search.calibration_methods``: MinMax, Percentile,
  Entropy) until one holds the budget; if none does, a sensitivity pass runs the FP32 model
  and the best QDQ model side by side on a few samples, ranks the compute nodes by the
  relative error each one adds to its input's, and excludes the costliest
  (``nodes_to_exclude``: 1, 2, 4, ... nodes) until the budget holds.
- **OpenVINO** (``search_openvino_int8``): ``nncf.quantize`` with one preset after another
  (``Int8Search.openvino_presets``: symmetric activations, then asymmetric) until one holds the
  budget; if none does, ``nncf.quantize_with_accuracy_control`` with the best preset and the
  gate as its validation function, which ranks the quantized operations by their cost on the
  metric and returns the most sensitive to float until the budget holds.

Bounds (``Int8Search``): ``seconds`` per variant (checked before each ONNX Runtime step and at
each NNCF validation; when it runs out the best result so far is kept and the gate judges it),
``max_steps`` exclusion steps or NNCF restore iterations. The first quantization always runs.
Writing files is ``_onnx``/``_openvino``'s business and judging the final file ``_pipeline``'s.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.contracts.accuracy import TaskScore
from agent.contracts.manifest import QuantStep
from agent.logs import get_logger
from control_plane.builds._census import ONNX_COMPUTE_OPS, openvino_quantized_ops
from control_plane.builds._measure import Gate, compiled_runner, openvino_runner, ort_runner
from control_plane.builds._onnx import Int8Recipe, quantize_int8
from control_plane.builds._samples import SampleSet
from control_plane.builds.errors import VariantBuildError, first_line

__all__ = ["Int8Outcome", "Int8Search", "search_onnx_int8", "search_openvino_int8"]

log = get_logger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True)
class Int8Search:
    """Bounds and choices of the accuracy-aware INT8 searches (per variant)."""

    seconds: float = 600.0  # time bound of one variant's search, after its first quantization
    # node-exclusion steps (ONNX Runtime) / restore iterations (NNCF); 0: quantize once, no
    # search. The ONNX Runtime INT4 search takes the same two bounds.
    max_steps: int = 6
    # at most this share of the compute nodes (at least one) left in float by ONNX Runtime's
    # sensitivity pass: past it the variant is no longer an INT8 model
    max_float_share: float = 0.25
    calibration_methods: tuple[str, ...] = ("MinMax", "Percentile", "Entropy")
    # NNCF presets tried in turn until one holds the budget: ``performance`` quantizes
    # activations symmetrically, ``mixed`` asymmetrically (what activations with a negative
    # tail, such as hard-swish outputs, need: on the PP-OCR detector box F1 98.3 against 73.9)
    openvino_presets: tuple[str, ...] = ("performance", "mixed")
    sensitivity_samples: int = 2  # samples the ONNX Runtime sensitivity pass runs
    ranking_samples: int = 4  # NNCF's ranking subset
    calibration_samples: int = 300


@dataclass(frozen=True)
class Int8Outcome:
    recipe: str
    steps: tuple[QuantStep, ...]
    kept_float: tuple[str, ...]


@dataclass(frozen=True)
class _Attempt:
    score: TaskScore
    path: Path
    method: str
    recipe: str
    excluded: tuple[str, ...]


class _OutOfTimeError(Exception):
    """The search's time bound ran out inside NNCF's accuracy control."""


def _step(action: str, score: TaskScore, kept: int, started: float, clock: Clock) -> QuantStep:
    step = QuantStep(
        action=action,
        metric=score.metric,
        value=round(score.value, 4),
        delta=round(score.delta, 4),
        kept_float=kept,
        seconds=round(clock() - started, 2),
    )
    log.info(
        "int8_step",
        action=action,
        metric=step.metric,
        value=step.value,
        delta=step.delta,
        kept_float=kept,
        seconds=step.seconds,
    )
    return step


# -- ONNX Runtime ---------------------------------------------------------------------------


def _outputs_of(path: Path, names: Sequence[str], samples: SampleSet) -> dict[str, Any]:
    """Every tensor in ``names`` that a node of ``path`` produces, over ``samples`` (stacked)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    produced = {o for n in model.graph.node for o in n.output}
    present = {o.name for o in model.graph.output}
    for name in names:
        if name in produced and name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    runs = [session.run(wanted, samples.feed(i)) for i in range(len(samples))]
    return {
        name: np.concatenate([np.asarray(r[k]).ravel() for r in runs])
        for k, name in enumerate(wanted)
    }


def _compute_nodes(path: Path) -> int:
    import onnx

    return sum(n.op_type in ONNX_COMPUTE_OPS for n in onnx.load(str(path)).graph.node)


def rank_onnx_nodes(fp32_path: Path, qdq_path: Path, samples: SampleSet) -> list[str]:
    """Compute nodes of ``fp32_path``, costliest first: the relative error (QDQ vs FP32) of a
    node's output minus the worst of its activation inputs', measured on ``samples``."""
    import onnx

    graph = onnx.load(str(fp32_path)).graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    nodes = [n for n in graph.node if n.op_type in ONNX_COMPUTE_OPS and n.name]
    tensors = sorted({t for n in nodes for t in (*n.input, *n.output) if t and t not in constants})
    reference = _outputs_of(fp32_path, tensors, samples)
    graph_inputs = {i.name: samples.feeds[i.name] for i in graph.input if i.name in samples.feeds}
    for name, array in graph_inputs.items():
        reference[name] = np.asarray(array).ravel()
    quantized = _outputs_of(qdq_path, tensors, samples)
    quantized.update({name: reference[name] for name in graph_inputs})

    def error(name: str) -> float:
        if name not in reference or name not in quantized:
            return 0.0
        ref = reference[name].astype(np.float64)
        diff = quantized[name].astype(np.float64) - ref
        return float(np.dot(diff, diff) / max(float(np.dot(ref, ref)), 1e-12))

    costs = []
    for node in nodes:
        inputs = [t for t in node.input if t and t not in constants]
        added = error(node.output[0]) - max((error(t) for t in inputs), default=0.0)
        costs.append((added, node.name))
    costs.sort(key=lambda c: -c[0])
    return [name for cost, name in costs if cost > 0.0]


def search_onnx_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: SampleSet,
    *,
    batch: bool,
    gate: Gate,
    output_names: Sequence[str],
    work: Path,
    search: Int8Search | None = None,
    clock: Clock = time.monotonic,
) -> Int8Outcome:
    """Write the ONNX Runtime INT8 variant that holds the budget with the fewest float nodes,
    or, when none does within the bounds, the one that came closest."""
    limits = search or Int8Search()
    calibration = calibration.head(limits.calibration_samples)
    started = clock()
    deadline = started + limits.seconds
    work.mkdir(parents=True, exist_ok=True)
    steps: list[QuantStep] = []
    best: _Attempt | None = None

    def attempt(method: str, exclude: tuple[str, ...]) -> bool:
        nonlocal best
        step_started = clock()
        path = work / f"int8-{method.lower()}-{len(exclude)}.onnx"
        settings = Int8Recipe(calibrate_method=method)
        quantize_int8(
            fp32_path,
            path,
            calibration,
            batch=batch,
            recipe=settings,
            nodes_to_exclude=exclude,
            calibration_cache=work / f"calibration-{method.lower()}.json",
        )
        try:
            score = gate.run(ort_runner(path, output_names))
        except Exception as exc:  # ORT refusing the file, any type
            raise VariantBuildError(
                f"the quantized file does not run: {first_line(exc)}", target="onnx-int8"
            ) from exc
        weights = "S7 (reduce_range)" if settings.reduce_range else "S8"
        recipe = f"QDQ U8/{weights} per-channel, {method} calibration"
        action = recipe if not exclude else f"{recipe}, {len(exclude)} costliest nodes in float"
        steps.append(_step(action, score, len(exclude), step_started, clock))
        passed = gate.passes(score)
        if best is None or score.delta < best.score.delta or passed:
            best = _Attempt(score, path, method, recipe, exclude)
        return passed

    passed = False
    for method in limits.calibration_methods:
        if steps and clock() > deadline:
            break
        if attempt(method, ()):
            passed = True
            break
    assert best is not None  # at least one attempt ran (or raised)
    if not passed and limits.max_steps > 0 and clock() <= deadline:
        method = best.method
        ranking = rank_onnx_nodes(
            fp32_path, best.path, calibration.head(limits.sensitivity_samples)
        )
        log.info("int8_sensitivity", costliest=ranking[:8], nodes=len(ranking))
        ranking = ranking[: max(1, int(limits.max_float_share * _compute_nodes(fp32_path)))]
        count = 1
        for _ in range(limits.max_steps):
            if clock() > deadline or not ranking:
                break
            if attempt(method, tuple(ranking[:count])):
                break
            if count >= len(ranking):
                break
            count = min(count * 2, len(ranking))
    shutil.copyfile(best.path, out_path)
    recipe = best.recipe
    if best.excluded:
        recipe += f", {len(best.excluded)} nodes kept in float"
    return Int8Outcome(recipe=recipe, steps=tuple(steps), kept_float=best.excluded)


# -- OpenVINO / NNCF ------------------------------------------------------------------------


def _stack(outputs: Iterable[list[Any]], *, batch: bool) -> list[Any]:
    """Per-sample outputs stacked as ``run_samples`` stacks them (joined on the batch axis
    for a batchable model, else one more leading axis)."""
    per_output: list[list[Any]] = []
    for sample in outputs:
        if not per_output:
            per_output = [[] for _ in sample]
        for acc, value in zip(per_output, sample, strict=True):
            acc.append(value if batch else value[None])
    return [np.concatenate(chunks, axis=0) for chunks in per_output]


def search_openvino_int8(
    onnx_path: Path,
    xml_path: Path,
    calibration: SampleSet,
    *,
    gate: Gate,
    output_names: Sequence[str],
    search: Int8Search | None = None,
    clock: Clock = time.monotonic,
) -> Int8Outcome:
    """Write the NNCF INT8 IR: ``nncf.quantize``, then accuracy control when over budget."""
    import logging

    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    limits = search or Int8Search()
    nncf.set_log_level(logging.WARNING)  # NNCF prints progress bars and INFO lines otherwise
    samples = calibration.head(limits.calibration_samples)
    feeds = [samples.feed(i) for i in range(len(samples))]
    started = clock()
    deadline = started + limits.seconds
    steps: list[QuantStep] = []
    kept: tuple[str, ...] = ()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ov.convert_model(str(onnx_path))
        best: tuple[Any, TaskScore, str] | None = None  # the model, its score, its preset
        for name in limits.openvino_presets or ("performance",):
            if best is not None and (gate.passes(best[1]) or clock() > deadline):
                break
            step_started = clock()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantized = nncf.quantize(
                    model,
                    nncf.Dataset(feeds),
                    preset=nncf.QuantizationPreset(name),
                    subset_size=len(feeds),
                )
            tried = gate.run(openvino_runner(quantized, output_names, precision_hint="f32"))
            steps.append(_step(f"nncf.quantize, {name} preset", tried, 0, step_started, clock))
            if best is None or tried.delta < best[1].delta:
                best = (quantized, tried, name)
        assert best is not None
        chosen, score, preset = best
        recipe = f"NNCF {preset} preset"
        if not gate.passes(score) and limits.max_steps > 0:
            restore_started = clock()
            items = [(i, gate.samples.feed(i)) for i in range(len(gate.samples))]

            def validate(compiled: Any, data: Iterable[Any]) -> tuple[float, list[float]]:
                if clock() > deadline:
                    raise _OutOfTimeError
                run = compiled_runner(compiled, output_names)
                pairs = list(data)
                outputs = _stack((run(f) for _, f in pairs), batch=gate.batch)
                result = gate.score(outputs, [i for i, _ in pairs])
                return 100.0 - result.delta, result.per_sample  # NNCF divides by it: never 0

            parameters = AdvancedAccuracyRestorerParameters(
                max_num_iterations=limits.max_steps,
                ranking_subset_size=min(limits.ranking_samples, len(items)),
                num_ranking_workers=1,
            )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    restored = nncf.quantize_with_accuracy_control(
                        model,
                        nncf.Dataset(feeds),
                        nncf.Dataset(items, lambda item: item[1]),
                        validate,
                        max_drop=gate.budget,
                        drop_type=nncf.DropType.ABSOLUTE,
                        preset=nncf.QuantizationPreset(preset),
                        subset_size=len(feeds),
                        advanced_accuracy_restorer_parameters=parameters,
                    )
            except _OutOfTimeError:
                steps.append(
                    _step(
                        f"accuracy control stopped at the {limits.seconds:g} s bound",
                        score,
                        0,
                        restore_started,
                        clock,
                    )
                )
            else:
                reverted = tuple(
                    sorted(openvino_quantized_ops(chosen) - openvino_quantized_ops(restored))
                )
                restored_score = gate.run(
                    openvino_runner(restored, output_names, precision_hint="f32")
                )
                steps.append(
                    _step(
                        f"nncf.quantize_with_accuracy_control: {len(reverted)} operations"
                        " back to float",
                        restored_score,
                        len(reverted),
                        restore_started,
                        clock,
                    )
                )
                if restored_score.delta <= score.delta or gate.passes(restored_score):
                    chosen, kept = restored, reverted
                    recipe = f"NNCF {preset} preset, accuracy control"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ov.save_model(chosen, str(xml_path), compress_to_fp16=True)
    except VariantBuildError:
        raise
    except Exception as exc:  # NNCF and OpenVINO raise anything
        raise VariantBuildError(
            f"NNCF quantization failed: {first_line(exc)}", target="openvino-int8"
        ) from exc
    log.info("nncf_quantized", samples=len(feeds), seconds=round(clock() - started, 2))
    return Int8Outcome(recipe=recipe, steps=tuple(steps), kept_float=kept)

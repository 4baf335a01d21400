"""One build, step by step: reference model, golden cases, each target's variant, the manifest.

Owns the order of the steps, the plan of variants (including "an already-quantized source is
kept as it is"), the task the gate measures, target constraints, each variant's build report
and provenance. Reading inputs is ``_samples``/``_onnx``'s, tools are ``_onnx``/``_openvino``'s,
the accuracy-aware INT8 searches ``_int8``'s, numbers ``_measure``'s and ``_census``'s, the
disk ``_bundle``'s.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.contracts.accuracy import Task, is_classifier
from agent.contracts.manifest import (
    AccuracyReport,
    ArtifactFormat,
    BuildReport,
    BundleManifest,
    GoldenCase,
    Precision,
    Preprocessing,
    Provenance,
    Runtime,
    TargetConstraints,
    Variant,
)
from agent.logs import get_logger
from control_plane.builds import _census, _gptq, _int4, _int8, _measure, _onnx, _openvino
from control_plane.builds._bundle import file_entry, write_golden, write_manifest
from control_plane.builds._samples import SampleSet, batchable
from control_plane.builds.errors import (
    BuildError,
    BuildInputError,
    VariantBuildError,
    first_line,
)

__all__ = ["GOLDEN_FROM_SAMPLES", "MAX_GOLDEN", "TARGETS", "BuildRequest", "Target", "run_build"]

log = get_logger(__name__)

Progress = Callable[[float, str], None]

MAX_GOLDEN = 16  # golden cases kept from an uploaded golden set
GOLDEN_FROM_SAMPLES = 4  # golden cases taken from calibration/validation when none uploaded
DEFAULT_SEARCH = _int8.Int8Search()
MAX_KEPT_LISTED = 50  # float operations named in a variant's build report
# CPUs whose integer dot-product instructions make INT8 pay off; TargetConstraints.cpu_flags
# means "all of", so this "any of" preference is documented, not enforced (docs/variants.md).
INT8_PREFERRED_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "asimddp")
OPENVINO_ARCHES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class Target:
    id: str
    runtime: Runtime
    format: ArtifactFormat
    precision: Precision
    float16: bool = False  # float parts in FP16 (an INT4 variant's activations): for GPUs

    @property
    def for_gpu(self) -> bool:
        """ONNX with FP16 arithmetic: ONNX Runtime's CPU provider has few FP16 kernels and
        casts around the rest, so such a variant is for GPUs (CUDA/TensorRT providers)."""
        return self.runtime == "onnxruntime" and (self.precision == "fp16" or self.float16)

    @property
    def accelerator_is_cpu(self) -> bool:
        """Whether the build host (a CPU) is a meaningful place to time this variant."""
        return not self.for_gpu


TARGETS: dict[str, Target] = {
    t.id: t
    for t in (
        Target("onnx-fp32", "onnxruntime", "onnx", "fp32"),
        Target("onnx-fp16", "onnxruntime", "onnx", "fp16"),
        Target("onnx-int8", "onnxruntime", "onnx", "int8"),
        Target("openvino-fp16", "openvino", "openvino-ir", "fp16"),
        Target("openvino-int8", "openvino", "openvino-ir", "int8"),
        Target("onnx-int4", "onnxruntime", "onnx", "int4"),
        Target("onnx-int4-fp16", "onnxruntime", "onnx", "int4", float16=True),
        Target("openvino-int4", "openvino", "openvino-ir", "int4"),
    )
}


@dataclass(frozen=True)
class BuildRequest:
    name: str
    version: str
    source: _onnx.SourceModel
    source_sha256: str
    targets: tuple[str, ...]
    budget: float
    calibration: SampleSet | None
    validation: SampleSet | None
    golden: SampleSet | None
    task: Task | None = None  # None: the source's declared task, else inferred from outputs
    preprocessing: Preprocessing | None = None  # declared at upload, for every variant
    search: _int8.Int8Search = DEFAULT_SEARCH


def _tool_versions() -> dict[str, str]:
    tools: dict[str, str] = {}
    for dist in ("edgefleet", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            tools[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return tools


def _major_minor(version: str) -> str:
    parts = version.split(".")
    return ".".join(parts[:2])


def _ort_runtime_min(path: Path) -> str:
    """The oldest ONNX Runtime that reads the file's IR version and opset."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    opset = _onnx.default_opset(model)
    if model.ir_version <= 9 and opset <= 20:
        return "1.17"
    if model.ir_version <= 10 and opset <= 21:
        return "1.18"
    return _major_minor(ort.__version__)


def _constraints(target: Target, artifact: Path) -> TargetConstraints:
    if target.runtime == "openvino":
        import openvino as ov

        # IR written by a newer OpenVINO may use operation sets an older runtime lacks.
        year = ov.__version__.split(".")[0]
        return TargetConstraints(arch=OPENVINO_ARCHES, runtime_min=f"{year}.0")
    runtime_min = _ort_runtime_min(artifact)
    if target.for_gpu:
        # FP16 ONNX (an INT4 variant's FP16 activations too) is for GPUs; CPUs get FP32, INT8,
        # INT4 with FP32 activations or OpenVINO IR.
        return TargetConstraints(accelerator="nvidia-gpu", runtime_min=runtime_min)
    return TargetConstraints(accelerator="cpu", runtime_min=runtime_min)


class _Build:
    def __init__(self, request: BuildRequest, bundle: Path, work: Path, progress: Progress) -> None:
        self.request = request
        self.bundle = bundle
        self.work = work
        self.progress = progress
        self.source = request.source
        self.batch = batchable(self.source.inputs)
        self.output_names = [o.name for o in self.source.outputs]
        self.log = log.bind(model=request.name, version=request.version)
        # GPTQ's blocks, computed once for both INT4 targets of a build (25 s for MiniLM)
        self._gptq_cache: dict[str, dict[str, _gptq.Blocks]] = {}

    # -- steps ---------------------------------------------------------------------------

    def run(self) -> BundleManifest:
        reference_path = self._reference()
        self.progress(0.15, "measuring the FP32 reference")
        reference = _measure.ort_runner(reference_path, self.output_names)
        golden_set = self._golden_set()
        golden_ref = _measure.run_samples(reference, golden_set, batch=False)
        golden = self._write_golden(golden_set, golden_ref)
        eval_set = self.request.validation or self.request.calibration or golden_set
        eval_ref = _measure.run_samples(reference, eval_set, batch=self.batch)
        task = self._task(eval_ref[0], labelled=eval_set.labels is not None)
        self.log.info("task_gate", task=task, budget=self.request.budget, samples=len(eval_set))
        gate = _measure.Gate(task, eval_set, eval_ref, self.request.budget, self.batch)
        plan = self._plan(reference_path)
        variants: list[Variant] = []
        skipped: dict[str, str] = {}
        for index, target in enumerate(plan):
            start = 0.2 + 0.75 * index / len(plan)
            self.progress(start, f"building {target.id}")
            try:
                variant = self._variant(
                    target,
                    reference_path=reference_path,
                    golden_set=golden_set,
                    golden_ref=golden_ref,
                    gate=gate,
                )
            except VariantBuildError as exc:
                shutil.rmtree(self.bundle / target.id, ignore_errors=True)
                skipped[target.id] = str(exc)
                self.log.warning("variant_skipped", target=target.id, error=str(exc))
                self.progress(start, f"{target.id} skipped: {exc}")
                continue
            variants.append(variant)
            self.progress(0.2 + 0.75 * (index + 1) / len(plan), f"{target.id} {variant.status}")
        if not variants:
            raise BuildError(f"no variant could be built: {skipped}")
        self.progress(0.95, "writing the manifest")
        manifest = BundleManifest(
            name=self.request.name,
            version=self.request.version,
            variants=tuple(variants),
            golden=golden,
            preprocessing=self.request.preprocessing,
            provenance=Provenance(
                source_sha256=self.request.source_sha256,
                tools=_tool_versions(),
                built_at=datetime.now(timezone.utc),
            ),
        )
        write_manifest(self.bundle, manifest)
        return manifest

    def _task(self, first_output: np.ndarray[Any, Any], *, labelled: bool) -> Task:
        """The declared task (upload, else the source's metadata), else inferred: a classifier
        output is ``classification``, anything else ``generic``."""
        classifier = is_classifier(first_output)
        task = self.request.task or self.source.task
        if task is None:
            task = "classification" if classifier else "generic"
        if labelled and not (task == "classification" and classifier):
            raise BuildInputError(
                f"labels were given but the first output {self.output_names[0]!r} is not one"
                f" score vector per sample (shape {first_output.shape[1:]}) of a classifier"
                f" (task {task})",
                field="validation",
            )
        if task == "classification" and not classifier:
            raise BuildInputError(
                f"task classification needs a first output of one score vector per sample,"
                f" {self.output_names[0]!r} has shape {first_output.shape[1:]}",
                field="task",
            )
        return task

    def _reference(self) -> Path:
        """The FP32 model every variant is measured against (the source if it is quantized)."""
        if self.source.quantized:
            self.log.info("source_quantized", opset=self.source.opset)
            self.progress(0.1, "source is already quantized: kept as it is")
            return self.source.path
        self.progress(0.05, "normalizing: opset upgrade and graph optimization")
        normalized = _onnx.normalize(self.source, self.work / "fp32.onnx", self.work)
        self.progress(
            0.12,
            f"normalized: opset {normalized.opset_from} -> {normalized.opset_to},"
            f" {'optimized' if normalized.optimized else 'not optimized'}",
        )
        return normalized.path

    def _golden_set(self) -> SampleSet:
        if self.request.golden is not None:
            return self.request.golden.head(MAX_GOLDEN)
        samples = self.request.calibration or self.request.validation
        assert samples is not None  # checked by the caller
        return SampleSet(samples.head(GOLDEN_FROM_SAMPLES).feeds)

    def _write_golden(
        self, golden_set: SampleSet, golden_ref: list[np.ndarray[Any, Any]]
    ) -> tuple[GoldenCase, ...]:
        cases = []
        for i in range(len(golden_set)):
            outputs = {n: golden_ref[k][i] for k, n in enumerate(self.output_names)}
            cases.append(write_golden(self.bundle, f"golden/{i}.npz", golden_set.feed(i), outputs))
        return tuple(cases)

    def _plan(self, reference_path: Path) -> list[Target]:
        wanted = self.request.targets
        if not self.source.quantized:
            int4 = [t for t in wanted if TARGETS[t].precision == "int4"]
            if int4 and not _int4.wants_int4(reference_path):
                matrix, total = _int4.matrix_weights(reference_path)
                # weight-only INT4 pays where MatMul/Gemm/embedding tables hold the weights
                self.log.info(
                    "int4_not_planned", targets=int4, matrix_bytes=matrix, weight_bytes=total
                )
                wanted = tuple(t for t in wanted if t not in int4)
            return [TARGETS[t] for t in wanted]
        # A quantized source is the INT8 ONNX variant; OpenVINO reads its QDQ pairs as is.
        plan = []
        if any(TARGETS[t].runtime == "onnxruntime" for t in wanted):
            plan.append(TARGETS["onnx-int8"])
        if any(TARGETS[t].runtime == "openvino" for t in wanted):
            plan.append(TARGETS["openvino-int8"])
        return plan

    def _variant(
        self,
        target: Target,
        *,
        reference_path: Path,
        golden_set: SampleSet,
        golden_ref: list[np.ndarray[Any, Any]],
        gate: _measure.Gate,
    ) -> Variant:
        started = time.monotonic()
        folder = self.bundle / target.id
        folder.mkdir()
        entry = folder / ("model.onnx" if target.format == "onnx" else "model.xml")
        outcome = self._make(target, reference_path, entry, gate)
        try:
            golden_runs = []
            default = None  # OpenVINO with the CPU plugin's own choice of float type
            if target.runtime == "onnxruntime":
                runner = _measure.ort_runner(entry, self.output_names)
            else:
                default = _measure.openvino_runner(entry, self.output_names)
                golden_runs.append(_measure.run_samples(default, golden_set, batch=False))
                runner = _measure.openvino_runner(entry, self.output_names, precision_hint="f32")
            golden_runs.append(_measure.run_samples(runner, golden_set, batch=False))
            accuracy: AccuracyReport | None = None
            timed = runner  # as a device runs it: f32 unless the gate accepts the reduced type
            if target.precision != "fp32" and not self.source.quantized:
                accuracy = _measure.accuracy_report(gate.run(runner), budget=self.request.budget)
                reduced = _measure.host_reduced_type()
                if default is not None and reduced is not None:
                    # A device's CPU plugin computes this variant's float parts in its reduced
                    # type only where the gate accepted that type: measure it where this host can.
                    accuracy = _measure.with_reduced_compute(accuracy, reduced, gate.run(default))
                    if all(c.accepted for c in accuracy.reduced_compute.values()):
                        timed = default
            latency = None
            if target.accelerator_is_cpu:
                latency = round(_measure.latency_ms(timed, golden_set.feed(0)), 3)
        except Exception as exc:  # a runtime refusing the artifact, any type
            raise VariantBuildError(
                f"the built file does not run in {target.runtime}: {first_line(exc)}",
                target=target.id,
            ) from exc
        tolerance, measured = _measure.tolerance(golden_ref, golden_runs, target.precision)
        files = tuple(file_entry(self.bundle, p) for p in sorted(folder.iterdir()))
        status: Literal["accepted", "rejected"] = (
            "accepted" if accuracy is None or accuracy.accepted else "rejected"
        )
        if target.format == "onnx":
            census = _census.onnx_census(entry)
        else:
            census = _census.openvino_census(entry)
        seconds = round(time.monotonic() - started, 2)
        build = BuildReport(
            latency_ms=latency,
            weight_bytes=census.weight_bytes,
            precisions=census.precisions,
            kept_float=outcome.kept_float[:MAX_KEPT_LISTED] if outcome else (),
            recipe=outcome.recipe if outcome else None,
            steps=outcome.steps if outcome else (),
            seconds=seconds,
        )
        variant = Variant(
            id=target.id,
            runtime=target.runtime,
            format=target.format,
            precision=target.precision,
            entrypoint=entry.relative_to(self.bundle).as_posix(),
            files=files,
            inputs=self.source.inputs,
            outputs=self.source.outputs,
            target=_constraints(target, entry if target.format == "onnx" else reference_path),
            tolerance=tolerance,
            accuracy=accuracy,
            status=status,
            build=build,
        )
        fields: dict[str, Any] = {
            "target": target.id,
            "seconds": seconds,
            "golden_rel_l2": float(f"{measured:.3g}"),
            "latency_ms": latency,
            "weight_bytes": census.weight_bytes,
            "precisions": census.precisions,
        }
        if outcome is not None:
            fields |= {"recipe": outcome.recipe, "kept_float": list(outcome.kept_float)}
        if accuracy is not None:
            fields |= {"metric": accuracy.metric, "value": accuracy.value, "delta": accuracy.delta}
            for kind, check in accuracy.reduced_compute.items():
                fields[f"{kind}_value"] = check.value
                fields[f"{kind}_accepted"] = check.accepted
        if status == "rejected":
            self.log.warning("variant_rejected", reason=accuracy and accuracy.reason, **fields)
        else:
            self.log.info("variant_built", **fields)
        return variant

    def _make(
        self, target: Target, reference_path: Path, entry: Path, gate: _measure.Gate
    ) -> _int8.Int8Outcome | None:
        """Write the target's files next to ``entry``; INT8 searches say what they did."""
        if self.source.quantized:
            if target.runtime == "onnxruntime":
                shutil.copyfile(self.source.path, entry)
            else:
                _openvino.convert_ir(self.source.path, entry, target=target.id)
            return None
        calibration = self.request.calibration
        if target.precision == "int8" and calibration is None:
            raise VariantBuildError("needs a calibration set", target=target.id)
        if target.id == "onnx-fp32":
            shutil.copyfile(reference_path, entry)
        elif target.id == "onnx-fp16":
            _onnx.convert_fp16(reference_path, entry)
        elif target.id == "onnx-int8":
            assert calibration is not None
            return _int8.search_onnx_int8(
                reference_path,
                entry,
                calibration,
                batch=self.batch,
                gate=gate,
                output_names=self.output_names,
                work=self.work / "onnx-int8",
                search=self.request.search,
            )
        elif target.id == "openvino-fp16":
            _openvino.convert_ir(reference_path, entry, target=target.id)
        elif target.id in ("onnx-int4", "onnx-int4-fp16"):
            work = self.work / target.id
            base = None
            if target.float16:
                # the same search over the FP16 graph: GPTQ's blocks (from the FP32 model) and
                # the 8-bit steps as for onnx-int4, FP16 scales and activations
                base = work / "fp16.onnx"
                base.parent.mkdir(parents=True, exist_ok=True)
                _onnx.convert_fp16(reference_path, base)
            return _int4.search_onnx_int4(
                reference_path,
                entry,
                gate=gate,
                output_names=self.output_names,
                work=work,
                search=_int4.Int4Search(seconds=limits.seconds, max_steps=limits.max_steps)
                if (limits := self.request.search) is not None
                else None,
                calibration=calibration,
                base=base,
                target=target.id,
                gptq_cache=self._gptq_cache,
            )
        elif target.id == "openvino-int4":
            _int4.compress_ir_int4(reference_path, entry, target=target.id)
        else:
            assert calibration is not None
            return _int8.search_openvino_int8(
                reference_path,
                entry,
                calibration,
                gate=gate,
                output_names=self.output_names,
                search=self.request.search,
            )
        return None


def run_build(
    request: BuildRequest, bundle: Path, work: Path, progress: Progress
) -> BundleManifest:
    """Build every planned variant into ``bundle`` (a staging directory) and write the manifest."""
    return _Build(request, bundle, work, progress).run()

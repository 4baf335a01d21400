"""Variant builds: from an uploaded ONNX model to a bundle directory of runnable variants.

``build_variants`` checks the source and the sample sets, normalizes the model (opset upgrade
where quantization needs it, ONNX Runtime's portable offline optimizations), builds ONNX
FP32/FP16/INT8 (static QDQ, accuracy-aware) and OpenVINO IR FP16/INT8 (NNCF, accuracy-aware)
variants, measures each against FP32 with the model's task metric (accuracy gate, golden
tolerances, build-host latency, weights) and publishes ``out_dir`` in one rename:
``manifest.json`` (``agent.contracts.manifest.BundleManifest``), each variant's files under
``<variant-id>/``, golden cases under ``golden/``. Jobs, storage and the HTTP API are the
service's; which variant a device runs is ``agent.contracts.fit``'s.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agent._fs import file_sha256
from agent.contracts.accuracy import TASKS, Task
from agent.contracts.manifest import NAME_RE, BundleManifest, Preprocessing, semver_key
from agent.logs import get_logger
from control_plane.builds._bundle import check_destination, staged_bundle
from control_plane.builds._int8 import Int8Search
from control_plane.builds._onnx import Int8Recipe, read_source
from control_plane.builds._pipeline import TARGETS, BuildRequest, run_build
from control_plane.builds._samples import load_samples
from control_plane.builds.errors import BuildError, BuildInputError, VariantBuildError

__all__ = [
    "DEFAULT_TARGETS",
    "TARGETS",
    "BuildError",
    "BuildInputError",
    "Int8Recipe",
    "Int8Search",
    "VariantBuildError",
    "build_variants",
]

log = get_logger(__name__)

DEFAULT_TARGETS: tuple[str, ...] = (
    "onnx-fp32",
    "onnx-fp16",
    "onnx-int8",
    "openvino-fp16",
    "openvino-int8",
    "onnx-int4",  # planned only for models whose weights are mostly MatMul/Gemm/Gather tables
    "onnx-int4-fp16",  # ... the same over the FP16 graph, for NVIDIA GPUs
    "openvino-int4",
)


def _no_progress(_fraction: float, _message: str) -> None:
    return None


def _check_request(
    name: str, version: str, targets: Sequence[str], budget: float, task: str | None
) -> tuple[str, ...]:
    if task is not None and task not in TASKS:
        raise BuildInputError(f"unknown task {task!r} (known: {list(TASKS)})", field="task")
    if not re.match(NAME_RE, name):
        raise BuildInputError(f"invalid model name {name!r}", field="name")
    try:
        semver_key(version)
    except ValueError as exc:
        raise BuildInputError(str(exc), field="version") from exc
    if not budget >= 0.0:  # also refuses NaN
        raise BuildInputError(
            f"accuracy budget must be >= 0, got {budget}", field="accuracy_budget"
        )
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise BuildInputError(
            f"unknown targets {unknown} (known: {list(TARGETS)})", field="targets"
        )
    wanted = tuple(dict.fromkeys(targets))
    if not wanted:
        raise BuildInputError("no targets requested", field="targets")
    return wanted


def build_variants(
    source_onnx: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    calibration: Path | None,
    validation: Path | None,
    golden: Path | None,
    accuracy_budget: float = 1.0,
    progress: Callable[[float, str], None] | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    task: Task | None = None,
    search: Int8Search | None = None,
    preprocessing: Preprocessing | None = None,
) -> BundleManifest:
    """Build the bundle for one model version into ``out_dir`` and return its manifest.

    ``out_dir`` must not exist (or be empty); it appears complete or not at all.
    ``calibration``: ``.npz`` of arrays keyed by input name, N samples on axis 0 (INT8 targets
    are skipped without it). ``validation``: the same plus ``labels`` (integer class ids) for a
    top-1 gate; without it, accuracy is measured against FP32 on the calibration set.
    ``golden``: inputs for the on-device golden check; without it, a few calibration samples.
    ``task`` (``agent.contracts.accuracy.TASKS``) picks the gate's metric; ``None`` takes the
    one the ONNX file declares in its metadata, else ``classification`` for a classifier
    output and ``generic`` (relative L2) for anything else.
    ``accuracy_budget``: points of the deciding metric a quantized or FP16 variant may lose
    before it is ``rejected`` (kept in the manifest with its numbers, never offered).
    ``preprocessing``: how a device's loop turns frames into the first input, written into
    the manifest (every variant's archive carries it).
    ``search`` bounds the accuracy-aware INT8 searches (time per variant, steps).
    ``progress`` is called with (fraction 0..1, message) at each step. Raises
    ``BuildInputError`` for an unusable upload, ``BuildError`` when nothing could be built.
    """
    report = progress or _no_progress
    wanted = _check_request(name, version, targets, accuracy_budget, task)
    check_destination(out_dir)
    blog = log.bind(model=name, version=version)
    started = time.monotonic()
    blog.info("build_started", source=str(source_onnx), targets=list(wanted), task=task)
    report(0.0, "checking the source model and sample sets")
    source = read_source(source_onnx)
    cal = load_samples(calibration, source.inputs, field="calibration") if calibration else None
    val = (
        load_samples(validation, source.inputs, field="validation", labelled=True)
        if validation
        else None
    )
    gold = load_samples(golden, source.inputs, field="golden") if golden else None
    if cal is None and val is None and gold is None:
        raise BuildInputError(
            "no sample inputs: give a calibration, validation or golden set", field="calibration"
        )
    blog.info(
        "source_checked",
        opset=source.opset,
        quantized=source.quantized,
        inputs=[s.name for s in source.inputs],
        calibration=len(cal) if cal else 0,
        validation=len(val) if val else 0,
    )
    request = BuildRequest(
        name=name,
        version=version,
        source=source,
        source_sha256=file_sha256(source_onnx),
        targets=wanted,
        budget=accuracy_budget,
        calibration=cal,
        validation=val,
        golden=gold,
        task=task,
        preprocessing=preprocessing,
        search=search or Int8Search(),
    )
    try:
        with (
            tempfile.TemporaryDirectory(prefix="edgefleet-build-") as work,
            staged_bundle(out_dir) as bundle,
        ):
            manifest = run_build(request, bundle, Path(work), report)
    except BuildError as exc:
        blog.warning("build_failed", error=str(exc))
        raise
    blog.info(
        "bundle_written",
        out_dir=str(out_dir),
        variants={v.id: v.status for v in manifest.variants},
        seconds=round(time.monotonic() - started, 2),
    )
    report(1.0, "done")
    return manifest

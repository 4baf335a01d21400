"""Backend and precision chosen by measurement.

A model comes with candidate artifacts (ONNX FP32, ONNX INT8, OpenVINO IR, ...) and each ONNX file
can run on more than one backend. This module owns:

- ``Candidate``: one (backend, artifact, tolerance) combination, built from files
  (``candidates_for_files``) or a bundle manifest (``candidates_from_manifest``);
- ``runnable``: whether a hardware profile can run a candidate, and why not;
- ``decide``: the pure decision core. It takes ``Measurement`` records and the configured pins
  and returns the fastest candidate whose outputs stay within its tolerance of the FP32
  reference (candidates within ``tie_margin`` of the fastest are tied and the most accurate wins);
- ``measure``: the thin driver that loads candidates and times them in interleaved rounds inside
  a time budget (time source injectable);
- ``choose``: cache lookup, measure, decide, and an atomic write of the decision as JSON under
  ``state_dir/choices/``, keyed by model digest and ``HardwareProfile.digest_key()``.

Loading artifacts is left to the backends; which bundle a device runs is left to the store.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from agent._fs import write_file_atomic
from agent.backends.base import Artifact, Backend, LoadOptions, Session
from agent.config import BackendConfig
from agent.contracts.manifest import (
    ArtifactFormat,
    BundleManifest,
    Precision,
    TargetConstraints,
    Tolerance,
)
from agent.contracts.profile import HardwareProfile
from agent.contracts.tensors import loaded
from agent.errors import AgentError, BundleError, ConfigError
from agent.errors import ValidationError as ModelValidationError
from agent.logs import get_logger

__all__ = [
    "DEFAULT_TOLERANCE",
    "Candidate",
    "Choice",
    "Feeds",
    "Measurement",
    "candidates_for_files",
    "candidates_from_manifest",
    "choose",
    "decide",
    "decision_path",
    "golden_from_manifest",
    "measure",
    "rel_l2",
    "runnable",
]

log = get_logger(__name__)

Feeds = dict[str, np.ndarray[Any, Any]]
Status = Literal["measured", "inaccurate", "failed", "unsupported", "skipped"]

# Used where no manifest states a variant's tolerance (files given on the command line).
DEFAULT_TOLERANCE: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_l2=1e-3),
    "fp16": Tolerance(max_rel_l2=2e-2),
    "int8": Tolerance(max_rel_l2=1e-1),
    "int4": Tolerance(max_rel_l2=1e-1),
}
_PRECISION_RANK = {"fp32": 0, "fp16": 1, "int8": 2, "int4": 3}
_FORMATS_BY_BACKEND: dict[str, tuple[ArtifactFormat, ...]] = {
    "onnxruntime": ("onnx",),
    "openvino": ("onnx", "openvino-ir"),
    "tensorrt": ("onnx", "tensorrt-plan"),
}


@dataclass(frozen=True)
class Candidate:
    """One way to run a model: a backend, an artifact it loads, and the accuracy budget."""

    backend: str
    artifact: Artifact
    tolerance: Tolerance = field(default_factory=Tolerance)
    target: TargetConstraints = field(default_factory=TargetConstraints)
    label: str | None = None  # the variant id, when the candidate comes from a manifest

    @property
    def precision(self) -> Precision:
        return self.artifact.precision

    @property
    def id(self) -> str:
        return f"{self.backend}:{self.precision}:{self.label or self.artifact.path.name}"


class Measurement(BaseModel):
    """What measuring one candidate found; ``decide`` needs nothing else."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidate: str
    backend: str
    format: str
    precision: Precision
    path: str
    status: Status
    detail: str | None = None
    device: str | None = None
    runs: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    throughput: float | None = None  # inferences per second, one stream
    rel_l2: float | None = None  # worst over outputs and golden cases
    max_abs: float | None = None
    allowed_rel_l2: float
    allowed_abs: float | None = None

    @property
    def accurate(self) -> bool:
        if self.rel_l2 is None or not self.rel_l2 <= self.allowed_rel_l2:
            return False
        return self.allowed_abs is None or (
            self.max_abs is not None and self.max_abs <= self.allowed_abs
        )


class Choice(BaseModel):
    """A decision, as cached on disk and printed by ``edge-agent bench``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    key: str
    model: str
    chosen: str
    backend: str
    precision: Precision
    format: str
    path: str
    reason: str
    decided_at: float
    measurements: tuple[Measurement, ...]

    def measurement(self, candidate_id: str) -> Measurement:
        return next(m for m in self.measurements if m.candidate == candidate_id)


# --------------------------------------------------------------------------- candidates


def candidates_for_files(
    fp32: Path,
    *,
    int8: Sequence[Path] = (),
    ir: Sequence[Path] = (),
    backends: Sequence[str] = ("onnxruntime", "openvino", "tensorrt"),
    name: str = "model",
    tolerances: Mapping[str, Tolerance] | None = None,
) -> list[Candidate]:
    """Every (backend, file, precision) combination for a model given as files.

    ``fp32`` is the reference ONNX file; ``int8`` are quantized ONNX (QDQ) or IR files; ``ir`` are
    OpenVINO IR files of the FP32 model. OpenVINO and TensorRT also get an ``fp16`` candidate of
    the FP32 ONNX (OpenVINO's reduced float: bf16 on AVX512-BF16/AMX CPUs, f16 on ARM and GPUs).
    """
    tol = {**DEFAULT_TOLERANCE, **(tolerances or {})}
    out: list[Candidate] = []

    def add(backend: str, path: Path, fmt: ArtifactFormat, precision: Precision) -> None:
        if backend in backends and fmt in _FORMATS_BY_BACKEND.get(backend, ()):
            artifact = Artifact(path, format=fmt, precision=precision, name=name)
            out.append(Candidate(backend, artifact, tol[precision]))

    for backend in ("onnxruntime", "openvino", "tensorrt"):
        add(backend, fp32, "onnx", "fp32")
    for backend in ("openvino", "tensorrt"):
        add(backend, fp32, "onnx", "fp16")
    for path in int8:
        fmt: ArtifactFormat = "openvino-ir" if path.suffix == ".xml" else "onnx"
        for backend in ("onnxruntime", "openvino", "tensorrt"):
            add(backend, path, fmt, "int8")
    for path in ir:
        add("openvino", path, "openvino-ir", "fp32")
    return out


def candidates_from_manifest(
    manifest: BundleManifest, bundle_dir: Path, *, backends: Sequence[str] | None = None
) -> list[Candidate]:
    """Candidates of a bundle's accepted variants; an ONNX variant also runs on every other
    backend that reads ONNX (with the variant's tolerance)."""
    out: list[Candidate] = []
    for variant in manifest.variants:
        if variant.status != "accepted":
            continue
        entry = variant.file(variant.entrypoint)
        artifact = Artifact(
            bundle_dir / variant.entrypoint,
            format=variant.format,
            precision=variant.precision,
            name=manifest.name,
            digest=entry.sha256,
            reduced_compute=frozenset(),  # another runtime: its reduced types were not gated
        )
        gated = replace(artifact, reduced_compute=variant.reduced_compute)  # its own runtime
        runtimes: list[str] = [variant.runtime]
        if variant.format == "onnx":
            runtimes += [b for b in _FORMATS_BY_BACKEND if b != variant.runtime]
        for runtime in runtimes:
            if backends is not None and runtime not in backends:
                continue
            if variant.format not in _FORMATS_BY_BACKEND.get(runtime, ()):
                continue
            out.append(
                Candidate(
                    runtime,
                    gated if runtime == variant.runtime else artifact,
                    variant.tolerance,
                    variant.target,
                    label=variant.id,
                )
            )
    return out


def golden_from_manifest(
    manifest: BundleManifest, bundle_dir: Path
) -> tuple[list[Feeds], list[Feeds]]:
    """Inputs (``in:<name>``) and FP32 reference outputs (``out:<name>``) of the golden cases."""
    inputs: list[Feeds] = []
    refs: list[Feeds] = []
    for case in manifest.golden:
        path = bundle_dir / case.file.path
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: loaded(npz[k]) for k in npz.files}
        except (OSError, ValueError) as exc:
            raise BundleError(
                f"cannot read golden case {path}: {exc}", model=manifest.name
            ) from exc
        inputs.append({k[3:]: v for k, v in arrays.items() if k.startswith("in:")})
        refs.append({k[4:]: v for k, v in arrays.items() if k.startswith("out:")})
    return inputs, refs


def runnable(candidate: Candidate, profile: HardwareProfile) -> str | None:
    """Why ``profile`` cannot run ``candidate``; ``None`` when it can."""
    runtime = profile.runtime(candidate.backend)
    if runtime is None:
        other = next((r for r in profile.runtimes if r.name == candidate.backend), None)
        why = other.reason if other and other.reason else "not installed"
        return f"{candidate.backend} not usable here: {why}"
    target = candidate.target
    if target.arch and profile.arch not in target.arch:
        return f"built for {', '.join(target.arch)}, this device is {profile.arch}"
    missing = [f for f in target.cpu_flags if f not in profile.cpu.flags]
    if missing:
        return f"needs CPU flags {', '.join(missing)}"
    nvidia = [g for g in profile.gpus if g.vendor == "nvidia"]
    if (candidate.backend == "tensorrt" or target.accelerator == "nvidia-gpu") and not nvidia:
        return "needs an NVIDIA GPU"
    cc = profile.compute_capability()
    if target.compute_capability and target.compute_capability != cc:
        return f"built for compute capability {target.compute_capability}, this GPU is {cc}"
    return None


# --------------------------------------------------------------------------- decision core


def decide(
    measurements: Sequence[Measurement],
    *,
    pin_backend: str | None = None,
    pin_precision: str | None = None,
    tie_margin: float = 0.10,
    model: str = "model",
) -> tuple[Measurement, str]:
    """The chosen measurement and a one-line reason. Pure: no clock, no disk, no runtime.

    Pins narrow the field; among measured candidates within tolerance, those no slower than the
    fastest by ``tie_margin`` are tied and the most accurate (then the higher precision) wins.
    """
    pool = [
        m
        for m in measurements
        if (pin_backend is None or m.backend == pin_backend)
        and (pin_precision is None or m.precision == pin_precision)
    ]
    pins = ", ".join(
        f"{k}={v}" for k, v in (("backend", pin_backend), ("precision", pin_precision)) if v
    )
    if not pool:
        raise ConfigError(f"{model}: no candidate matches the pinned {pins}")
    timed = [m for m in pool if m.status == "measured" and m.p50_ms is not None and m.accurate]
    if not timed:
        why = "; ".join(f"{m.candidate}: {m.status} ({m.detail})" for m in pool)
        raise ModelValidationError(f"no candidate runs within tolerance: {why}", model=model)
    fastest = min(m.p50_ms for m in timed if m.p50_ms is not None)
    tied = [m for m in timed if m.p50_ms is not None and m.p50_ms <= fastest * (1 + tie_margin)]
    best = min(
        tied,
        key=lambda m: (m.rel_l2 or 0.0, _PRECISION_RANK[m.precision], m.p50_ms or 0.0),
    )
    reason = f"p50 {best.p50_ms:.3f} ms, rel_l2 {best.rel_l2:.2g}"
    if best.p50_ms != fastest:
        reason += f" (within {tie_margin:.0%} of the fastest, {fastest:.3f} ms, and more accurate)"
    else:
        reason += " (fastest within tolerance)"
    if pins:
        reason += f"; pinned {pins}"
    return best, reason


# --------------------------------------------------------------------------- measuring driver


def rel_l2(
    out: Mapping[str, np.ndarray[Any, Any]], ref: Mapping[str, np.ndarray[Any, Any]]
) -> tuple[float, float]:
    """Worst ``||out - ref|| / ||ref||`` and worst absolute difference over ``ref``'s outputs."""
    worst_rel = worst_abs = 0.0
    for name, want in ref.items():
        got = out.get(name)
        if got is None or got.shape != want.shape:
            return math.inf, math.inf
        if object in (want.dtype, got.dtype):  # BYTES: exact, or not at all
            same = np.array_equal(got, want)
            worst_rel = worst_rel if same else math.inf
            worst_abs = worst_abs if same else math.inf
            continue
        diff = got.astype(np.float64) - want.astype(np.float64)
        denom = max(float(np.linalg.norm(want.astype(np.float64))), 1e-12)
        worst_rel = max(worst_rel, float(np.linalg.norm(diff)) / denom)
        worst_abs = max(worst_abs, float(np.abs(diff).max()) if diff.size else 0.0)
    return worst_rel, worst_abs


def _reference_index(candidates: Sequence[Candidate]) -> int | None:
    order = [
        i
        for i, c in enumerate(candidates)
        if c.precision == "fp32" and c.artifact.format == "onnx" and c.backend == "onnxruntime"
    ]
    order += [i for i, c in enumerate(candidates) if c.precision == "fp32"]
    return order[0] if order else None


@dataclass
class _Live:
    candidate: Candidate
    session: Session
    rel: float
    abs: float
    accurate: bool
    times: list[float] = field(default_factory=list)
    total_s: float = 0.0


def measure(
    candidates: Sequence[Candidate],
    golden_inputs: Sequence[Feeds],
    *,
    reference_outputs: Sequence[Feeds] | None = None,
    backends: Mapping[str, Backend] | None = None,
    options: LoadOptions | None = None,
    budget_s: float = 20.0,
    now: Callable[[], float] = time.perf_counter,
    min_runs: int = 5,
    max_runs: int = 200,
    warmup: int = 2,
    prune_ratio: float = 1.5,
    time_inaccurate: bool = False,
) -> list[Measurement]:
    """Load each candidate, check its outputs on ``golden_inputs`` against the reference, then
    time the accurate ones on the first golden input in interleaved rounds until ``budget_s`` is
    spent or each has ``max_runs`` runs and a quarter of its share of the budget. Once every
    contender has ``min_runs`` runs (and 50 ms of samples), candidates slower than
    ``prune_ratio`` x the leader stop being timed, so the budget goes to the contenders.

    Without ``reference_outputs`` the reference is computed by the FP32 candidate measured first
    (ONNX Runtime's, when there is one).
    """
    if not golden_inputs:
        raise ConfigError("choosing a backend needs at least one golden input")
    from agent.backends import all_backends

    table = dict(backends) if backends is not None else {b.name: b for b in all_backends()}
    opts = options or LoadOptions()
    deadline = now() + budget_s
    order = list(range(len(candidates)))
    ref_index = _reference_index(candidates) if reference_outputs is None else None
    if ref_index is not None:
        order.remove(ref_index)
        order.insert(0, ref_index)
    refs: list[Feeds] | None = list(reference_outputs) if reference_outputs is not None else None
    results: dict[int, Measurement] = {}
    live: dict[int, _Live] = {}

    def record(i: int, status: Status, detail: str, **extra: Any) -> None:
        c = candidates[i]
        results[i] = Measurement(
            candidate=c.id,
            backend=c.backend,
            format=c.artifact.format,
            precision=c.precision,
            path=str(c.artifact.path),
            status=status,
            detail=detail,
            allowed_rel_l2=c.tolerance.max_rel_l2,
            allowed_abs=c.tolerance.max_abs,
            **extra,
        )

    try:
        for i in order:
            c = candidates[i]
            if now() >= deadline:
                record(i, "skipped", "time budget spent before loading")
                continue
            backend = table.get(c.backend)
            if backend is None:
                record(i, "unsupported", f"{c.backend} backend not available")
                continue
            try:
                session = backend.load(c.artifact, opts)
            except AgentError as exc:
                record(i, "failed", str(exc))
                continue
            try:
                outs = [session.run(feeds) for feeds in golden_inputs]
                for _ in range(warmup):
                    session.run(golden_inputs[0])
            except AgentError as exc:
                session.close()
                record(i, "failed", str(exc), device=session.device)
                continue
            if refs is None:
                refs = outs  # this is the FP32 reference candidate
            errs = [rel_l2(o, r) for o, r in zip(outs, refs, strict=False)]
            worst_rel = max(e[0] for e in errs)
            worst_abs = max(e[1] for e in errs)
            tol = c.tolerance
            ok = worst_rel <= tol.max_rel_l2 and (tol.max_abs is None or worst_abs <= tol.max_abs)
            live[i] = _Live(c, session, worst_rel, worst_abs, ok)
            log.debug("choice_candidate_loaded", candidate=c.id, rel_l2=worst_rel)

        timed = {i: lv for i, lv in live.items() if lv.accurate or time_inaccurate}
        active = set(timed)
        # A fast model needs many runs before a median means anything: a candidate stops only
        # with ``max_runs`` runs AND a fair share of the budget spent, and pruning waits until
        # every contender has ``min_runs`` runs and a few tens of milliseconds of samples.
        enough_s = budget_s / (4 * max(len(timed), 1))
        settle_s = min(0.05, enough_s)
        feeds = golden_inputs[0]
        rounds = 0
        # One round always runs, so every loaded contender has a timing however tight the budget.
        while active and (rounds == 0 or now() < deadline):
            for i in sorted(active):
                lv = timed[i]
                start = now()
                lv.session.run(feeds)
                elapsed = now() - start
                lv.times.append(elapsed)
                lv.total_s += elapsed
            rounds += 1
            active = {
                i for i in active if len(timed[i].times) < max_runs or timed[i].total_s < enough_s
            }
            settled = all(
                len(timed[i].times) >= min_runs and timed[i].total_s >= settle_s for i in active
            )
            if settled and len(active) > 1:
                medians = {i: float(np.median(timed[i].times)) for i in active}
                # Only a candidate that may win sets the pace; inaccurate ones are timed for show.
                contenders = [medians[i] for i in active if timed[i].accurate] or list(
                    medians.values()
                )
                leader = min(contenders)
                active = {i for i in active if medians[i] <= leader * prune_ratio}
    finally:
        for lv in live.values():
            lv.session.close()

    for i, lv in live.items():
        times = np.asarray(lv.times, dtype=np.float64)
        timing: dict[str, Any] = {}
        if times.size:
            timing = {
                "runs": int(times.size),
                "p50_ms": float(np.percentile(times, 50)) * 1e3,
                "p99_ms": float(np.percentile(times, 99)) * 1e3,
                "throughput": float(times.size / times.sum()) if times.sum() > 0 else None,
            }
        status: Status = "measured" if lv.accurate else "inaccurate"
        detail = (
            None
            if lv.accurate
            else (f"rel_l2 {lv.rel:.3g} > {lv.candidate.tolerance.max_rel_l2:g}")
        )
        if lv.accurate and not times.size:
            status, detail = "skipped", "time budget spent before timing"
        record(
            i,
            status,
            detail or "",
            device=lv.session.device,
            rel_l2=lv.rel,
            max_abs=lv.abs,
            **timing,
        )
    return [results[i] for i in range(len(candidates))]


# --------------------------------------------------------------------------- cache + driver


def decision_key(
    candidates: Sequence[Candidate],
    profile: HardwareProfile,
    *,
    pin_backend: str | None,
    pin_precision: str | None,
) -> str:
    """``<model digest>-<profile and candidate-set digest>``: a new model file, runtime version,
    GPU or pin gives a new key."""
    ref = _reference_index(candidates)
    model_digest = candidates[ref if ref is not None else 0].artifact.sha256()[:16]
    parts = [profile.digest_key(), f"pin={pin_backend}/{pin_precision}"]
    parts += sorted(f"{c.id}={c.artifact.sha256()}={c.tolerance.max_rel_l2}" for c in candidates)
    rest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{model_digest}-{rest}"


def decision_path(state_dir: Path, key: str) -> Path:
    return state_dir / "choices" / f"{key}.json"


def _read_cached(path: Path, key: str) -> Choice | None:
    try:
        choice = Choice.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as exc:
        log.warning("choice_cache_unreadable", path=str(path), reason=str(exc).splitlines()[0])
        return None
    return choice if choice.key == key else None


def choose(
    candidates: Sequence[Candidate],
    profile: HardwareProfile,
    golden_inputs: Sequence[Feeds],
    *,
    config: BackendConfig | None = None,
    state_dir: Path | None = None,
    reference_outputs: Sequence[Feeds] | None = None,
    options: LoadOptions | None = None,
    backends: Mapping[str, Backend] | None = None,
    now: Callable[[], float] = time.perf_counter,
    wall: Callable[[], float] = time.time,
    model: str = "model",
    use_cache: bool = True,
    time_inaccurate: bool = False,
) -> Choice:
    """Pick the backend and precision for a model: from the cache under ``state_dir`` when this
    profile already decided for these candidates, else by measuring within
    ``config.choice_budget_s`` (the decision is then cached)."""
    if not candidates:
        raise ConfigError(f"{model}: no candidate artifacts to choose from")
    cfg = config or BackendConfig()
    key = decision_key(
        candidates, profile, pin_backend=cfg.pin_backend, pin_precision=cfg.pin_precision
    )
    path = decision_path(state_dir, key) if state_dir is not None else None
    if path is not None and use_cache:
        cached = _read_cached(path, key)
        if cached is not None:
            log.info("choice_cached", model=model, chosen=cached.chosen)
            return cached

    ref = _reference_index(candidates)
    to_measure: list[int] = []
    skipped: dict[int, Measurement] = {}
    for i, c in enumerate(candidates):
        why = runnable(c, profile)
        pinned_out = (cfg.pin_backend and c.backend != cfg.pin_backend) or (
            cfg.pin_precision and c.precision != cfg.pin_precision
        )
        if why is None and (not pinned_out or (i == ref and reference_outputs is None)):
            to_measure.append(i)
            continue
        skipped[i] = Measurement(
            candidate=c.id,
            backend=c.backend,
            format=c.artifact.format,
            precision=c.precision,
            path=str(c.artifact.path),
            status="unsupported" if why else "skipped",
            detail=why or "excluded by the pinned backend/precision",
            allowed_rel_l2=c.tolerance.max_rel_l2,
            allowed_abs=c.tolerance.max_abs,
        )
    measured = measure(
        [candidates[i] for i in to_measure],
        golden_inputs,
        reference_outputs=reference_outputs,
        backends=backends,
        options=options,
        budget_s=cfg.choice_budget_s,
        now=now,
        time_inaccurate=time_inaccurate,
    )
    by_index = dict(zip(to_measure, measured, strict=True)) | skipped
    measurements = tuple(by_index[i] for i in range(len(candidates)))
    best, reason = decide(
        measurements,
        pin_backend=cfg.pin_backend,
        pin_precision=cfg.pin_precision,
        tie_margin=cfg.choice_tolerance,
        model=model,
    )
    choice = Choice(
        key=key,
        model=model,
        chosen=best.candidate,
        backend=best.backend,
        precision=best.precision,
        format=best.format,
        path=best.path,
        reason=reason,
        decided_at=wall(),
        measurements=measurements,
    )
    log.info("choice_made", model=model, chosen=choice.chosen, reason=reason)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomic(path, json.dumps(choice.model_dump(mode="json"), indent=2).encode())
    return choice

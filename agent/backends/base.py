"""The one small interface every inference runtime implements.

``Backend.load(artifact, options)`` -> ``Session``; ``Session.run(feeds)`` -> outputs;
``Session.close()``. A backend that cannot run here raises ``BackendUnavailableError`` from
``probe()`` or ``load()`` with the reason; the registry (``agent.backends``) skips it and tries the
next. Backends check feeds against the session's specs so a bad frame fails with ``InputError``
naming the tensor, never with a runtime's stack trace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import numpy as np

from agent._fs import file_sha256
from agent.contracts.manifest import ArtifactFormat, Precision
from agent.contracts.tensors import TensorSpec, check_feed
from agent.errors import InputError

__all__ = [
    "Artifact",
    "Backend",
    "LoadOptions",
    "Probe",
    "Session",
    "cache_key",
    "validate_feeds",
]

Feeds = Mapping[str, np.ndarray[Any, Any]]
Outputs = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class Artifact:
    """A model file a runtime can load, with what the caller knows about it."""

    path: Path
    format: ArtifactFormat = "onnx"
    precision: Precision = "fp32"
    name: str = "model"
    digest: str | None = None  # sha256 of the file; computed lazily when a cache key needs it
    # Reduced float types (bf16, f16) an accuracy gate accepted for an fp16/int4 artifact; a
    # runtime that would compute its float parts in another reduced type pins f32 instead.
    # None: no gate judged it (a bare file), the runtime's default stands.
    reduced_compute: frozenset[str] | None = None

    def sha256(self) -> str:
        return self.digest or file_sha256(self.path)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How to load: thread caps, caches, runtime hints. Keyword-only by convention."""

    intra_op_threads: int | None = None  # None: the runtime's default (all cores)
    cache_dir: Path | None = None  # engine/timing/model caches live under it
    openvino_hint: Literal["LATENCY", "THROUGHPUT"] = "LATENCY"
    openvino_device: str = "AUTO"
    # "gated": ``Artifact.reduced_compute`` decides whether the CPU computes an fp16/int4
    # artifact in its reduced float type; "device": the CPU plugin's own choice, always.
    openvino_reduced_float: Literal["gated", "device"] = "gated"
    ort_provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    ort_disable_providers: tuple[str, ...] = ()
    compute_capability: str | None = None  # part of the engine cache key on NVIDIA
    # Fixed shapes for dynamic inputs (name -> shape): TensorRT profiles, CUDA graphs.
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # Let idle runtime threads spin between runs: lower latency when unthrottled, a busy core
    # when not. Off by default for a robot running at a fixed rate.
    spin_wait: bool = False
    # ONNX Runtime with CUDA graphs: run every call of a session on one thread of its own, so a
    # graph captured by the warm-up is replayed from any thread (see docs/gpu.md).
    ort_graph_runner: bool = True
    # ONNX Runtime sessions in a worker process of their own (``agent.backends.ort_worker``):
    # "gpu" for sessions on a device provider (creating and releasing those holds the GIL of
    # the process that does it), "always", or "never".
    ort_process: Literal["gpu", "always", "never"] = "gpu"
    # A retired session's worker is kept (one at most, its CUDA context included) and loads the
    # next version, instead of exiting: no context is created or torn down beside a serving one.
    ort_spare_worker: bool = True
    # A retired session's worker lets its model go this long after the close (the switch): a
    # release in one worker just as the next version's worker starts serving slowed that
    # worker's first frames (docs/gpu.md, "The release, after the switch").
    ort_release_delay_s: float = 0.3
    # The load runs beside a version that serves (a swap's loader): keep its CPU work out of
    # the serving process where the runtime allows. OpenVINO compiles in a child process at the
    # lowest priority into its model cache, and this process only imports the compiled blob.
    background_load: bool = False
    # With ``background_load``: called before the load's own in-process step (OpenVINO's import
    # of the blob its child compiled), so that step starts just after a frame (a quiet swap's
    # slot waits there for a gap between the hot loop's frames).
    between_frames: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether a runtime is usable here, its version, and its devices/providers."""

    name: str
    usable: bool
    version: str | None = None
    reason: str | None = None
    devices: tuple[str, ...] = ()


@runtime_checkable
class Session(Protocol):
    """A loaded model, ready to run. Thread-safe for concurrent ``run`` calls."""

    backend: str
    device: str  # the provider or device actually running it, e.g. "CPUExecutionProvider"
    precision: Precision
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Feeds) -> Outputs: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """A runtime; implementations live in ``agent.backends.<name>``."""

    name: ClassVar[str]
    formats: ClassVar[tuple[ArtifactFormat, ...]]

    def probe(self) -> Probe: ...

    def load(self, artifact: Artifact, options: LoadOptions) -> Session: ...


def cache_key(
    *,
    digest: str,
    runtime_versions: Mapping[str, str],
    precision: str,
    compute_capability: str | None,
) -> str:
    """Engine/timing cache directory name: any change of model, runtime, GPU or precision
    gives a new key, so an upgraded JetPack or TensorRT never loads a stale engine."""
    parts = [digest, precision, f"sm{compute_capability or 'none'}"]
    parts += [f"{k}-{v}" for k, v in sorted(runtime_versions.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def validate_feeds(model: str, specs: tuple[TensorSpec, ...], feeds: Feeds) -> None:
    """Raise ``InputError`` if ``feeds`` misses, adds or mis-shapes a tensor."""
    names = {s.name for s in specs}
    unknown = set(feeds) - names
    if unknown:
        raise InputError(f"{model}: unknown input(s) {sorted(unknown)}; expected {sorted(names)}")
    for spec in specs:
        if spec.name not in feeds:
            raise InputError(f"{model}: missing input {spec.name!r}")
        arr = feeds[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"{model}: input {spec.name!r} is not an array")
        problem = check_feed(spec, arr)
        if problem:
            raise InputError(f"{model}: {problem}")

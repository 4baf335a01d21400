"""One loaded version of a model: a runtime session with its in-flight count and live health.

A ``LoadedVersion`` closes its session only once the last request in flight has left, and hands
the freed memory back to the OS. Choosing, loading and swapping versions is left to
``agent.models.slots``; deciding to keep or roll back a version to ``agent.models.probation``.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import Session
from agent.contracts.manifest import Variant
from agent.contracts.tensors import TensorSpec
from agent.errors import InferenceError, InputError
from agent.logs import get_logger
from agent.models.probation import Health, judged_p99
from agent.models.serving import Computed

__all__ = ["DYNAMIC_BATCH_LIMIT", "LoadedVersion", "batch_limit"]

# The largest batch a model with a dynamic batch dimension takes through the API's dynamic
# batching (``[api.batching] max_batch_size`` lowers it per model).
DYNAMIC_BATCH_LIMIT = 32

log = get_logger(__name__)

Array = np.ndarray[Any, Any]
Feeds = Mapping[str, Array]


def batch_limit(inputs: tuple[TensorSpec, ...]) -> int:
    """``max_batch_size`` of a session with these inputs: ``DYNAMIC_BATCH_LIMIT`` when every
    input's first dimension is dynamic (a batch dimension), else 0 (requests run as sent)."""
    if inputs and all(s.shape and s.shape[0] < 0 for s in inputs):
        return DYNAMIC_BATCH_LIMIT
    return 0


class LoadedVersion:
    """One version of a model in a runtime session; an ``agent.models.serving.ServedModel``.

    Counts requests in flight so that a retired version closes its session only once the last
    one has finished, and keeps live health (requests, errors, recent latencies).
    """

    def __init__(
        self,
        name: str,
        version: str,
        variant: Variant,
        session: Session,
        *,
        bundle_dir: Path,
        measured_p99_s: float,
        choice: str = "",
        clock: Callable[[], float] = time.perf_counter,
        window: int = 2048,
        closer: Callable[[Sequence[Callable[[], None]]], bool] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.variant = variant
        self.variant_id = variant.id
        self.backend = session.backend
        self.device = session.device
        # The float type it computes in where the runtime says (OpenVINO: "f32", "bf16", "f16")
        self.compute: str = str(getattr(session, "compute", ""))
        # The runtime's specs, with the bounds the manifest gives (token ids' range, the longest
        # sequence): the local API checks them before a runtime sees the values.
        declared = {s.name: s for s in variant.inputs}
        self.inputs: tuple[TensorSpec, ...] = tuple(
            _bounded(s, declared.get(s.name)) for s in session.inputs
        )
        self.outputs: tuple[TensorSpec, ...] = session.outputs
        self.max_batch_size = batch_limit(self.inputs)
        self.choice = choice  # why this variant serves (measured figures), for reports
        self.computed = Computed(version, variant.id)
        self.bundle_dir = bundle_dir
        self.measured_p99_s = measured_p99_s
        self._session: Session | None = session
        self._clock = clock
        self._closer = closer
        self._lock = threading.Lock()
        self._inflight = 0
        self._retired = False
        self._closed = threading.Event()
        self._latencies: collections.deque[float] = collections.deque(maxlen=window)
        self._requests = 0
        self._errors = 0

    @property
    def ready(self) -> bool:
        return not self._closed.is_set() and not self._retired

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def infer(self, feeds: Feeds) -> dict[str, Array]:
        """Run on this version; ``InferenceError`` once it has been unloaded."""
        if not self._enter():
            raise InferenceError(f"{self.name} {self.version} is no longer loaded")
        try:
            return self._run(feeds)
        finally:
            self._exit()

    def infer_versioned(self, feeds: Feeds) -> tuple[Computed, dict[str, Array]]:
        return self.computed, self.infer(feeds)

    def _enter(self) -> bool:
        with self._lock:
            if self._closed.is_set():
                return False
            self._inflight += 1
            return True

    def _exit(self) -> None:
        with self._lock:
            self._inflight -= 1
            close = self._retired and self._inflight == 0
        if close:
            self._close_session()

    def _run(self, feeds: Feeds) -> dict[str, Array]:
        session = self._session
        assert session is not None  # a session is dropped only once nothing is in flight
        start = self._clock()
        try:
            outputs = session.run(feeds)
        except InputError:
            raise  # the caller's fault, not the version's
        except Exception as exc:
            with self._lock:
                self._requests += 1
                self._errors += 1
            if isinstance(exc, InferenceError):
                raise
            raise InferenceError(f"{self.name} {self.version}: run failed: {exc}") from exc
        self._latencies.append(self._clock() - start)
        with self._lock:
            self._requests += 1
        return outputs

    def retire(self) -> None:
        """No new requests; the session closes when those in flight are done."""
        with self._lock:
            self._retired = True
            close = self._inflight == 0
        if close:
            self._close_session()

    def wait_closed(self, timeout_s: float | None = None) -> bool:
        return self._closed.wait(timeout_s)

    def _close_session(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            session, self._session = self._session, None
            self._closed.set()
        if session is not None:
            # Two steps, each short enough for a closer to place between two frames: the
            # runtime's release (which may hold the GIL), then handing the freed heap back
            # (which holds the allocator's locks while it walks the arenas).
            # A session in a worker process frees its memory there, as the worker exits.
            elsewhere = getattr(session, "memory_elsewhere", False) is True
            steps = (session.close,) if elsewhere else (session.close, return_freed_memory)
            del session
            if self._closer is None or not self._closer(steps):
                for step in steps:
                    step()
        log.info("slot_version_unloaded", model=self.name, version=self.version)

    def health(self) -> Health:
        with self._lock:
            requests, errors = self._requests, self._errors
        return Health(requests=requests, errors=errors, p99_s=judged_p99(list(self._latencies)))

    def latencies(self) -> list[float]:
        return list(self._latencies)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim


def return_freed_memory() -> None:
    """Give the pages of an unloaded session back to the OS. glibc keeps freed memory in its
    arenas (one per thread that allocated), so without this RSS creeps up with every swap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _bounded(spec: TensorSpec, declared: TensorSpec | None) -> TensorSpec:
    """The runtime's ``spec`` with the manifest's bounds for that input, a ``max_shape`` of
    another rank than the runtime's input left out (bundle and file would differ)."""
    if declared is None or (declared.value_range is None and declared.max_shape is None):
        return spec
    most = declared.max_shape
    if most is not None and len(most) != len(spec.shape):
        most = None
    return spec.model_copy(update={"value_range": declared.value_range, "max_shape": most})

"""The inference API's core, shared by the HTTP and gRPC transports.

Owns: resolving a model and version through the ``ModelRepository`` on every request (no
reference to a loaded version is kept between requests, so a swap takes effect at once while an
accepted request finishes on the version it was accepted on), checking each request against
the model's tensors before it runs or queues, choosing between the model's batcher and the
thread pool, and counting metrics. Loading, version policy and swaps belong to the repository
(``agent.models.slots``); wire formats to ``agent.api.codec``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from agent import __version__ as agent_version
from agent.api.batching import Batcher, BatchPolicy, RunResult
from agent.api.codec import InferRequest, InferResponse, RequestError
from agent.api.metrics import InferenceMetrics
from agent.api.shm import SharedMemoryRegistry
from agent.backends.base import validate_feeds
from agent.config import ApiConfig, BatchingConfig
from agent.errors import AgentError, InferenceError, InputError, ModelError
from agent.logs import get_logger
from agent.models.serving import ModelRepository, ServedModel

__all__ = [
    "EXTENSIONS",
    "SERVER_NAME",
    "ApiStartError",
    "InferenceService",
    "ModelNotReadyError",
]

log = get_logger(__name__)

SERVER_NAME = "edgefleet-agent"
EXTENSIONS = ("binary_tensor_data",)
_PLATFORMS = {
    "onnxruntime": "onnxruntime_onnx",
    "openvino": "openvino",
    "tensorrt": "tensorrt_plan",
}


class ApiStartError(AgentError):
    """The API cannot listen where it is configured to (port taken, socket path unusable)."""


class ModelNotReadyError(InferenceError):
    """The model exists but its version cannot take requests now (HTTP 503, gRPC UNAVAILABLE)."""


class InferenceService:
    """Health, metadata and inference over a ``ModelRepository``; thread-safe."""

    def __init__(
        self,
        repository: ModelRepository,
        config: ApiConfig | None = None,
        metrics: InferenceMetrics | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.repository = repository
        self.config = config or ApiConfig()
        self.metrics = metrics or InferenceMetrics()
        self._clock = clock
        self._pool = ThreadPoolExecutor(self.config.infer_threads, thread_name_prefix="infer")
        self._batchers: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.shared_memory = SharedMemoryRegistry(
            max_regions=self.config.shm_max_regions,
            max_bytes=self.config.shm_max_bytes,
            enabled=self.config.shared_memory,
        )

    # -- health and metadata -------------------------------------------------------------

    def live(self) -> bool:
        return not self._closed

    def ready(self) -> bool:
        """Every model the repository names has a ready active version."""
        if self._closed:
            return False
        try:
            return all(self.repository.get(name).ready for name in self.repository.names())
        except ModelError:
            return False

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The loaded version (``ModelError`` if unknown), looked up now."""
        if version == "":
            version = None
        return self.repository.get(name, version)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.model(name, version).ready

    def server_metadata(self) -> dict[str, Any]:
        extensions = [*EXTENSIONS, *self.shared_memory.extensions()]
        return {"name": SERVER_NAME, "version": agent_version, "extensions": extensions}

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        served = self.model(name, version)
        return {
            "name": served.name,
            "versions": list(self.repository.versions(name)),
            "platform": _PLATFORMS.get(served.backend, served.backend),
            # What serves and why, beside the protocol's fields (clients ignore extra keys).
            "parameters": {
                "version": served.version,
                "variant": served.variant_id,
                "backend": served.backend,
                "device": served.device,
                "compute": served.compute,
                "choice": served.choice,
            },
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in served.inputs
            ],
            "outputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in served.outputs
            ],
        }

    # -- inference ----------------------------------------------------------------------

    def submit(self, request: InferRequest) -> Future[InferResponse]:
        """Check ``request`` and start it; errors in the request raise here (nothing queued),
        errors while running arrive through the future."""
        started = self._clock()
        # Unknown names are not counted: a client must not be able to mint label sets.
        served = self.model(request.model, request.version)
        try:
            if not served.ready:
                raise ModelNotReadyError(
                    f"model {served.name!r} version {served.version!r} is not ready"
                )
            binary = self._check(served, request)
            items = (
                _batch_size(served, request, self._batch_limit(served))
                if served.max_batch_size > 0
                else 1
            )
            input_s = self._clock() - started
            batcher = self._batcher(served)
            if batcher is not None:
                run: Future[RunResult] = batcher.submit(served, request.inputs, items)
            else:
                run = self._pool.submit(self._run_alone, served, request.inputs, self._clock())
        except Exception:
            self.metrics.failure(served.name, served.version, request_s=self._clock() - started)
            raise
        self.metrics.started(served.name, served.version)
        done: Future[InferResponse] = Future()
        run.add_done_callback(
            lambda fut: self._finish(
                fut,
                done=done,
                label=(served.name, served.version),
                request=request,
                binary=binary,
                items=items,
                started=started,
                input_s=input_s,
            )
        )
        return done

    def infer(self, request: InferRequest, timeout_s: float | None = None) -> InferResponse:
        """``submit`` and wait (for the gRPC thread pool and in-process callers)."""
        return self.submit(request).result(timeout_s)

    def _check(self, served: ServedModel, request: InferRequest) -> dict[str, bool]:
        validate_feeds(served.name, served.inputs, request.inputs)
        names = [s.name for s in served.outputs]
        if request.outputs is None:
            return dict.fromkeys(names, request.binary_outputs)
        known = set(names)
        for out in request.outputs:
            if out.name not in known:
                raise RequestError(
                    f"{served.name}: unknown output {out.name!r}; expected {sorted(known)}"
                )
        return {out.name: out.binary for out in request.outputs}

    def _batch_limit(self, served: ServedModel) -> int:
        cfg = self.config.model_batching.get(served.name, self.config.batching)
        return _policy(cfg, served).max_batch_size

    def _batcher(self, served: ServedModel) -> Batcher | None:
        if served.max_batch_size <= 0:
            return None
        batcher = self._batchers.get(served.name)
        if batcher is not None:
            return batcher
        cfg = self.config.model_batching.get(served.name, self.config.batching)
        if not cfg.enabled:
            return None
        with self._lock:
            if self._closed:
                raise InferenceError("the inference server is stopping")
            batcher = self._batchers.get(served.name)
            if batcher is None:
                batcher = Batcher(served.name, _policy(cfg, served), clock=self._clock)
                self._batchers[served.name] = batcher
                log.info(
                    "batcher_started",
                    model=served.name,
                    max_batch_size=batcher.policy.max_batch_size,
                    max_queue_delay_us=cfg.max_queue_delay_us,
                )
        return batcher

    def _run_alone(self, served: ServedModel, feeds: dict[str, Any], queued: float) -> RunResult:
        start = self._clock()
        computed, outputs = served.infer_versioned(feeds)
        return RunResult(outputs, computed, start - queued, self._clock() - start, 1)

    def _finish(
        self,
        run: Future[RunResult],
        *,
        done: Future[InferResponse],
        label: tuple[str, str],
        request: InferRequest,
        binary: dict[str, bool],
        items: int,
        started: float,
        input_s: float = 0.0,
    ) -> None:
        try:
            self._complete(
                run,
                done=done,
                label=label,
                request=request,
                binary=binary,
                items=items,
                started=started,
                input_s=input_s,
            )
        except Exception as exc:  # a callback must resolve the caller's future, always
            log.exception("inference_finish_failed", model=request.model)
            if not done.done():
                done.set_exception(InferenceError(f"{request.model}: {exc}"))
        finally:
            self.metrics.finished(*label)

    def _complete(
        self,
        run: Future[RunResult],
        *,
        done: Future[InferResponse],
        label: tuple[str, str],
        request: InferRequest,
        binary: dict[str, bool],
        items: int,
        started: float,
        input_s: float = 0.0,
    ) -> None:
        exc = run.exception()
        if exc is not None:
            self.metrics.failure(*label, request_s=self._clock() - started)
            if not isinstance(exc, (InputError, InferenceError, ModelError)):
                log.error("inference_failed", model=request.model, error=repr(exc))
                exc = InferenceError(f"{request.model}: {exc}")
            done.set_exception(exc)
            return
        result = run.result()
        output_start = self._clock()
        outputs = {name: result.outputs[name] for name in binary}
        output_s = self._clock() - output_start
        self.metrics.success(
            request.model,
            result.computed.version,
            items=items,
            executions=1 if result.counts_execution else 0,
            request_s=self._clock() - started,
            queue_s=result.queue_s,
            compute_s=result.compute_s,
            input_s=input_s,
            output_s=output_s,
        )
        done.set_result(
            InferResponse(
                request.model,
                result.computed.version,
                outputs,
                binary,
                request.id,
                variant=result.computed.variant_id,
            )
        )

    def close(self) -> None:
        """Stop taking requests; queued ones finish."""
        with self._lock:
            self._closed = True
            batchers = list(self._batchers.values())
        for batcher in batchers:
            batcher.stop()
        self._pool.shutdown(wait=True)
        self.shared_memory.close()


def _policy(cfg: BatchingConfig, served: ServedModel) -> BatchPolicy:
    limit = served.max_batch_size
    size = min(cfg.max_batch_size, limit) if cfg.max_batch_size else limit
    return BatchPolicy(
        max_batch_size=size,
        max_queue_delay_s=cfg.max_queue_delay_us / 1e6,
        preferred_batch_sizes=tuple(p for p in cfg.preferred_batch_sizes if p <= size),
    )


def _batch_size(served: ServedModel, request: InferRequest, limit: int) -> int:
    """The request's batch size, within ``limit`` (the model's own ``max_batch_size``, lowered
    by ``[api.model_batching.<name>] max_batch_size``)."""
    sizes = {int(a.shape[0]) for a in request.inputs.values() if a.ndim > 0}
    if len(sizes) != 1:
        raise RequestError(
            f"{served.name}: inputs must share the batch dimension (axis 0); got {sorted(sizes)}"
        )
    size = sizes.pop()
    if size < 1 or size > limit:
        raise RequestError(f"{served.name}: batch of {size} where 1..{limit} is allowed")
    return size

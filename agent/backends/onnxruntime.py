"""ONNX Runtime backend: provider order TensorRT EP -> CUDA EP -> OpenVINO EP -> CPU.

Owns the provider list, provider options and the TensorRT EP's engine/timing caches (kept under
``cache_dir/<cache_key>``). Leaves the choice between backends to ``agent.backends.choice``.

On CPU the hot path is ``InferenceSession.run`` and nothing else; feeds are checked against the
specs only when the runtime rejects them, to say which tensor was wrong.

On the CUDA (or TensorRT) provider, ``OrtBoundSession`` binds inputs and outputs to device memory
(I/O binding): each input is copied once into a persistent device ``OrtValue``, outputs stay on
the device until one copy back. With the CUDA provider's ``enable_cuda_graph`` (on by default when
the CUDA provider runs the whole model), each input shape gets its own captured CUDA graph
(``gpu_graph_id``) replayed over fixed device addresses. ``LoadOptions.input_shapes`` pins dynamic
dimensions (free-dimension overrides) so a model with dynamic axes can be captured too.
"""

from __future__ import annotations

import ctypes
import functools
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from agent.backends.base import (
    Artifact,
    Feeds,
    LoadOptions,
    Outputs,
    Probe,
    cache_key,
    validate_feeds,
)
from agent.backends.ort_worker import OrtWorkerSession, worker_supported
from agent.contracts.manifest import ArtifactFormat, Precision
from agent.contracts.tensors import TensorSpec
from agent.cuda import CAPTURE_GATE
from agent.errors import BackendUnavailableError, InferenceError, InputError, ModelLoadError
from agent.logs import get_logger

__all__ = [
    "PROVIDER_ORDER",
    "OnnxRuntimeBackend",
    "OrtBoundSession",
    "OrtSession",
    "ort_type_to_datatype",
]

log = get_logger(__name__)

_T = TypeVar("_T")

PROVIDER_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)
_DEVICE_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
MAX_BOUND_SHAPES = 8  # distinct input shapes kept bound (and, with CUDA graphs, captured)
# The CUDA provider captures a graph on the third run of a graph id on each thread (two regular
# runs fill its memory arena first): runs before that take the capture gate exclusively.
CAPTURE_RUNS = 3

_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


def ort_type_to_datatype(ort_type: str) -> str:
    try:
        return _ORT_TYPES[ort_type]
    except KeyError as exc:
        raise ModelLoadError(f"unsupported tensor type {ort_type}") from exc


def _specs(args: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(
            name=a.name,
            datatype=ort_type_to_datatype(a.type),  # type: ignore[arg-type]
            shape=tuple(d if isinstance(d, int) else -1 for d in a.shape),
        )
        for a in args
    )


class OrtSession:
    """A loaded ONNX Runtime session."""

    backend = "onnxruntime"

    def __init__(self, sess: Any, *, name: str, precision: Precision) -> None:
        self._sess = sess
        self._name = name
        self.precision: Precision = precision
        self.device: str = sess.get_providers()[0]
        self.inputs = _specs(sess.get_inputs())
        self.outputs = _specs(sess.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        self._closed = False

    @property
    def raw(self) -> Any:
        """The ``onnxruntime.InferenceSession``, for I/O binding on GPU paths."""
        return self._sess

    def run(self, feeds: Feeds) -> Outputs:
        try:
            results = self._sess.run(self._output_names, feeds)
        except Exception as exc:
            if self._closed:
                raise InferenceError(f"{self._name}: session is closed") from exc
            validate_feeds(self._name, self.inputs, feeds)  # raises InputError if it can say why
            raise InferenceError(f"{self._name}: onnxruntime run failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._closed = True
        self._sess = _ClosedSession()


class OrtStringSession(OrtSession):
    """A session whose model has string tensors: the protocol's BYTES travel as ``bytes``,
    ONNX Runtime wants ``str``; UTF-8 both ways. Only such models pay for the conversion."""

    def run(self, feeds: Feeds) -> Outputs:
        converted = {
            name: _to_str(arr) if arr.dtype == object else arr for name, arr in feeds.items()
        }
        outputs = super().run(converted)
        return {
            name: _to_bytes(arr) if arr.dtype == object else arr for name, arr in outputs.items()
        }


def _to_str(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    try:
        out: np.ndarray[Any, Any] = np.vectorize(
            lambda v: v.decode("utf-8") if isinstance(v, bytes | bytearray) else v, otypes=[object]
        )(arr)
    except UnicodeDecodeError as exc:
        raise InputError(f"string tensor is not valid UTF-8: {exc}") from exc
    return out


def _to_bytes(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out: np.ndarray[Any, Any] = np.vectorize(
        lambda v: v.encode("utf-8") if isinstance(v, str) else v, otypes=[object]
    )(arr)
    return out


class _ClosedSession:
    def run(self, *_: Any) -> Any:
        raise RuntimeError("closed")


class _Binding:
    """One input shape bound to device memory: persistent input ``OrtValue``s and, for a
    captured CUDA graph, persistent output ``OrtValue``s at fixed addresses."""

    def __init__(
        self,
        ort: Any,
        sess: Any,
        feeds: list[np.ndarray[Any, Any]],
        input_names: list[str],
        output_names: list[str],
        *,
        device: str,
        device_id: int,
        graph_id: int | None,
        graphs_enabled: bool,
    ) -> None:
        self._sess = sess
        self.io = sess.io_binding()
        self.inputs = [ort.OrtValue.ortvalue_from_numpy(a, device, device_id) for a in feeds]
        for name, value in zip(input_names, self.inputs, strict=True):
            self.io.bind_ortvalue_input(name, value)
        for name in output_names:
            self.io.bind_output(name, device, device_id)
        # The first run is never captured: it tells the output shapes (and warms the kernels).
        self.run_options = ort.RunOptions()
        if graphs_enabled:
            self.run_options.add_run_config_entry("gpu_graph_id", "-1")
        sess.run_with_iobinding(self.io, self.run_options)
        self.first: list[np.ndarray[Any, Any]] | None = self.io.copy_outputs_to_cpu()
        self.outputs: list[Any] | None = None
        self._runs_by_thread: dict[int, int] = {}
        if graph_id is not None and self.first is not None:
            # Captured graphs replay over fixed addresses: give the outputs persistent memory.
            self.outputs = [
                ort.OrtValue.ortvalue_from_shape_and_type(r.shape, r.dtype, device, device_id)
                for r in self.first
            ]
            self.io.clear_binding_outputs()
            for name, value in zip(output_names, self.outputs, strict=True):
                self.io.bind_ortvalue_output(name, value)
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def may_capture(self) -> bool:
        """Whether the next run on this thread may capture a CUDA graph (and must run alone)."""
        if self.outputs is None or self.first is not None:
            return False
        return self._runs_by_thread.get(threading.get_ident(), 0) < CAPTURE_RUNS

    def run(self, feeds: list[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        if self.first is not None:  # the binding's own first run already answered these feeds
            first, self.first = self.first, None
            return first
        if self.outputs is not None:
            tid = threading.get_ident()
            runs = self._runs_by_thread.get(tid, 0)
            if runs < CAPTURE_RUNS:
                self._runs_by_thread[tid] = runs + 1
        for value, arr in zip(self.inputs, feeds, strict=True):
            value.update_inplace(arr)
        self._sess.run_with_iobinding(self.io, self.run_options)
        if self.outputs is not None:
            return [value.numpy() for value in self.outputs]
        results: list[np.ndarray[Any, Any]] = self.io.copy_outputs_to_cpu()
        return results


class _NoGate:
    @contextmanager
    def shared(self) -> Iterator[None]:
        yield

    exclusive = shared


_NO_GATE = _NoGate()


class _GraphRunner:
    """The one thread a CUDA-graph session runs on.

    ONNX Runtime's CUDA provider keeps captured graphs per thread (in its per-thread context),
    so a session run from several threads captures once per thread, and a serving thread that
    meets a new session after a swap captures on the hot path. Every run of a graph session is
    handed to this thread instead: the loader's warm-up runs capture here before the switch, and
    every later run (loop, API threads) replays. The hand-off costs two thread wake-ups.
    """

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], _Call] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"ort-graph-{name}", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        call = _Call()
        self._calls.put((fn, call))
        call.done.acquire()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[no-any-return]

    def _serve(self) -> None:
        _serving_priority()
        while True:
            item = self._calls.get()
            if item is None:
                return
            fn, call = item
            try:
                call.result = fn()
            except BaseException as exc:
                call.error = exc
            call.done.release()

    def stop(self) -> None:
        self._calls.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)


def _serving_priority() -> None:
    """A runner made by the swap's loader thread inherits its raised nice value (Linux keeps it
    per thread): go back to the process's own, where allowed (root, or RLIMIT_NICE)."""
    try:
        own = os.getpriority(os.PRIO_PROCESS, 0)
        base = os.getpriority(os.PRIO_PROCESS, os.getpid())  # the main thread's
        if own > base:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), base)
    except OSError as exc:
        log.debug("graph_runner_priority_kept", reason=str(exc))


class _Call:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None


class OrtBoundSession(OrtSession):
    """An ONNX Runtime session whose inputs and outputs are bound to device memory.

    One ``_Binding`` per input signature (shapes and dtypes), at most ``MAX_BOUND_SHAPES`` kept;
    with CUDA graphs each of the first ``MAX_BOUND_SHAPES`` signatures is captured under its own
    ``gpu_graph_id`` and later ones run uncaptured. Runs are serialised by a lock: the bindings
    hold the device buffers one run writes and the next reads. With graphs, every run goes
    through the session's ``_GraphRunner`` thread, so graphs are captured once (by the warm-up
    before a swap) and replayed whatever thread asks (``graph_runner=False``: on the caller's).
    """

    def __init__(
        self,
        sess: Any,
        *,
        name: str,
        precision: Precision,
        device: str = "cuda",
        device_id: int = 0,
        cuda_graph: bool = False,
        graph_runner: bool = True,
    ) -> None:
        super().__init__(sess, name=name, precision=precision)
        import onnxruntime as ort

        self._ort = ort
        self._device_kind = device
        self._device_id = device_id
        self.cuda_graph = cuda_graph
        self._input_names = [s.name for s in self.inputs]
        self._bindings: OrderedDict[tuple[Any, ...], _Binding] = OrderedDict()
        self._graphs_captured = 0
        self._run_lock = threading.Lock()
        self._gate = CAPTURE_GATE if device == "cuda" else _NO_GATE
        self._runner = _GraphRunner(name) if cuda_graph and graph_runner else None
        # A graph session runs from a runner thread that takes the process's priority back.
        self.serves_as_loaded = self._runner is not None

    def run(self, feeds: Feeds) -> Outputs:
        try:
            arrays = [np.ascontiguousarray(feeds[n]) for n in self._input_names]
            signature = tuple((a.shape, a.dtype.char) for a in arrays)
        except (KeyError, TypeError, AttributeError):
            validate_feeds(self._name, self.inputs, feeds)  # raises InputError naming the tensor
            raise
        if len(feeds) != len(arrays):
            validate_feeds(self._name, self.inputs, feeds)
        runner = self._runner
        if runner is not None:
            return runner.call(lambda: self._run_bound(feeds, arrays, signature))
        return self._run_bound(feeds, arrays, signature)

    def _run_bound(
        self, feeds: Feeds, arrays: list[np.ndarray[Any, Any]], signature: tuple[Any, ...]
    ) -> Outputs:
        with self._run_lock:
            if self._closed:
                raise InferenceError(f"{self._name}: session is closed")
            try:
                binding = self._bindings.get(signature)
                if binding is None:
                    validate_feeds(self._name, self.inputs, feeds)
                    with self._gate.shared():
                        binding = self._bind(arrays, signature)
                else:
                    self._bindings.move_to_end(signature)
                gate = self._gate.exclusive if binding.may_capture() else self._gate.shared
                with gate():
                    results = binding.run(arrays)
            except InputError:
                raise
            except Exception as exc:
                raise InferenceError(f"{self._name}: onnxruntime run failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def _bind(self, arrays: list[np.ndarray[Any, Any]], signature: tuple[Any, ...]) -> _Binding:
        graph_id = None
        if self.cuda_graph and self._graphs_captured < MAX_BOUND_SHAPES:
            self._graphs_captured += 1
            graph_id = self._graphs_captured
        binding = _Binding(
            self._ort,
            self._sess,
            arrays,
            self._input_names,
            self._output_names,
            device=self._device_kind,
            device_id=self._device_id,
            graph_id=graph_id,
            graphs_enabled=self.cuda_graph,
        )
        # Captured bindings stay (their graph lives as long as the session); others rotate.
        self._bindings[signature] = binding
        while len(self._bindings) > MAX_BOUND_SHAPES:
            for key, old in self._bindings.items():
                if old.outputs is None:
                    del self._bindings[key]
                    break
            else:
                break
        log.debug(
            "ort_shape_bound",
            model=self._name,
            shapes=[list(a.shape) for a in arrays],
            graph_id=graph_id,
        )
        return binding

    def close(self) -> None:
        with self._run_lock, self._gate.shared():  # freeing device memory is no capture-safe call
            self._bindings.clear()
            super().close()
            # No full gc.collect(): it holds the GIL for tens of milliseconds on a big heap, a
            # stall of every serving thread. The bindings are dropped explicitly above.
        if self._runner is not None:
            self._runner.stop()


class OnnxRuntimeBackend:
    """Loads ONNX files with the best available execution provider."""

    name: ClassVar[str] = "onnxruntime"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx",)
    _lock = threading.Lock()

    def probe(self) -> Probe:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return Probe(self.name, usable=False, reason=f"onnxruntime not installed ({exc})")
        return Probe(
            self.name,
            usable=True,
            version=ort.__version__,
            devices=tuple(ort.get_available_providers()),
        )

    def providers(self, artifact: Artifact, options: LoadOptions) -> list[Any]:
        """The provider list with options, in preference order, for what is installed.

        The CUDA provider asks for CUDA graphs (``enable_cuda_graph``) when it is the first
        provider; ``load`` drops the request if the model cannot be captured. Options in
        ``LoadOptions.ort_provider_options`` override every default here.
        """
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        if "TensorrtExecutionProvider" in available:
            missing = _tensorrt_libraries_missing()
            if missing:
                # onnxruntime-gpu lists the TensorRT provider whenever it was built with it; it
                # only loads when TensorRT does, and falls back noisily at every session if not.
                available.discard("TensorrtExecutionProvider")
                log.debug(
                    "ort_provider_skipped", provider="TensorrtExecutionProvider", reason=missing
                )
        chosen: list[Any] = []
        key_dir: Path | None = None
        if options.cache_dir is not None and (
            available & {"TensorrtExecutionProvider", "OpenVINOExecutionProvider"}
        ):
            key = cache_key(
                digest=artifact.sha256(),
                precision=artifact.precision,
                runtime_versions={"onnxruntime": ort.__version__, **_trt_version()},
                compute_capability=options.compute_capability,
            )
            key_dir = options.cache_dir / "ort" / key
            key_dir.mkdir(parents=True, exist_ok=True)
        for provider in PROVIDER_ORDER:
            if provider not in available or provider in options.ort_disable_providers:
                continue
            opts: dict[str, str] = {}
            if provider == "TensorrtExecutionProvider" and key_dir is not None:
                opts = {
                    "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(key_dir / "engines"),
                    "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(key_dir / "timing"),
                    "trt_fp16_enable": str(artifact.precision in ("fp16", "int8")),
                    "trt_int8_enable": str(artifact.precision == "int8"),
                }
            elif provider == "CUDAExecutionProvider" and not chosen:
                opts = {"enable_cuda_graph": "1"}
            elif provider == "OpenVINOExecutionProvider" and key_dir is not None:
                opts = {"cache_dir": str(key_dir / "openvino")}
            opts.update(options.ort_provider_options.get(provider, {}))
            chosen.append((provider, opts) if opts else provider)
        return chosen

    def load(self, artifact: Artifact, options: LoadOptions) -> OrtSession | OrtWorkerSession:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(self.name, "onnxruntime not installed") from exc
        if artifact.format != "onnx":
            raise BackendUnavailableError(self.name, f"cannot load {artifact.format} artifacts")
        if not artifact.path.is_file():
            raise ModelLoadError(f"model file not found: {artifact.path}", model=artifact.name)
        providers = self.providers(artifact, options)
        on_gpu = any((p if isinstance(p, str) else p[0]) in _DEVICE_PROVIDERS for p in providers)
        if options.ort_process == "always" or (options.ort_process == "gpu" and on_gpu):
            unsupported = worker_supported()
            if unsupported is None:
                return OrtWorkerSession.start(artifact, options)
            log.debug("ort_worker_unavailable", model=artifact.name, reason=unsupported)
        so = ort.SessionOptions()
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
            so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if not options.spin_wait:
            # Idle intra-op threads otherwise spin after every run: at 30 Hz that is half a core
            # burnt on a robot for a few microseconds of latency.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if options.input_shapes:
            _pin_input_shapes(ort, so, artifact, options.input_shapes)
        graph = _wants_cuda_graph(providers)
        with CAPTURE_GATE.shared() if on_gpu else nullcontext():
            sess, graph, providers = self._create(ort, artifact, so, providers, graph)
        first = sess.get_providers()[0]
        session: OrtSession
        if first in _DEVICE_PROVIDERS:
            session = OrtBoundSession(
                sess,
                name=artifact.name,
                precision=artifact.precision,
                device=_DEVICE_PROVIDERS[first],
                device_id=_device_id(providers, first),
                cuda_graph=graph and first == "CUDAExecutionProvider",
                graph_runner=options.ort_graph_runner,
            )
        else:
            plain = OrtSession(sess, name=artifact.name, precision=artifact.precision)
            if any(t.datatype == "BYTES" for t in (*plain.inputs, *plain.outputs)):
                plain = OrtStringSession(sess, name=artifact.name, precision=artifact.precision)
            session = plain
        if options.input_shapes:
            session.inputs = tuple(
                s.model_copy(update={"shape": tuple(options.input_shapes[s.name])})
                if s.name in options.input_shapes
                else s
                for s in session.inputs
            )
        log.debug(
            "ort_session_loaded",
            model=artifact.name,
            provider=session.device,
            providers=[p if isinstance(p, str) else p[0] for p in providers],
            cuda_graph=isinstance(session, OrtBoundSession) and session.cuda_graph,
        )
        return session

    @staticmethod
    def _create(
        ort: Any, artifact: Artifact, so: Any, providers: list[Any], graph: bool
    ) -> tuple[Any, bool, list[Any]]:
        """The ``InferenceSession``; without CUDA graphs when the model cannot be captured."""
        try:
            try:
                sess = ort.InferenceSession(
                    str(artifact.path), sess_options=so, providers=providers
                )
            except Exception as exc:
                if not graph:
                    raise
                # Typically some nodes fall back to the CPU (shape arithmetic on dynamic axes):
                # such a model cannot be captured, but runs fine on the CUDA provider.
                log.info("cuda_graph_unavailable", model=artifact.name, reason=_load_reason(exc))
                graph = False
                providers = _without_cuda_graph(providers)
                sess = ort.InferenceSession(
                    str(artifact.path), sess_options=so, providers=providers
                )
        except Exception as exc:  # ORT raises its own pybind classes: translate them all
            raise ModelLoadError(_load_reason(exc), model=artifact.name) from exc
        return sess, graph, providers


@functools.lru_cache(maxsize=1)
def _tensorrt_libraries_missing() -> str | None:
    """Why ONNX Runtime's TensorRT provider cannot load here, or ``None`` when it can."""
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so", "nvinfer.dll"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return None
    return "TensorRT libraries (libnvinfer) not found"


def _wants_cuda_graph(providers: list[Any]) -> bool:
    first = providers[0] if providers else None
    return (
        isinstance(first, tuple)
        and first[0] == "CUDAExecutionProvider"
        and str(first[1].get("enable_cuda_graph", "0")).lower() in ("1", "true")
    )


def _without_cuda_graph(providers: list[Any]) -> list[Any]:
    out: list[Any] = []
    for p in providers:
        if isinstance(p, tuple) and p[0] == "CUDAExecutionProvider":
            opts = {k: v for k, v in p[1].items() if k != "enable_cuda_graph"}
            out.append((p[0], opts) if opts else p[0])
        else:
            out.append(p)
    return out


def _device_id(providers: list[Any], name: str) -> int:
    for p in providers:
        if isinstance(p, tuple) and p[0] == name:
            return int(p[1].get("device_id", 0))
    return 0


def _pin_input_shapes(
    ort: Any, so: Any, artifact: Artifact, shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Override the model's symbolic dimensions with the sizes in ``shapes``.

    A static graph lets ONNX Runtime fold the shape arithmetic away, so every node can run on
    the GPU and the model can be captured as a CUDA graph. The symbolic names are read from an
    unoptimised CPU session (cheap: nothing is compiled).
    """
    meta_opts = ort.SessionOptions()
    meta_opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    meta_opts.log_severity_level = 3
    try:
        meta = ort.InferenceSession(
            str(artifact.path), sess_options=meta_opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelLoadError(_load_reason(exc), model=artifact.name) from exc
    inputs = {i.name: i.shape for i in meta.get_inputs()}
    unknown = set(shapes) - set(inputs)
    if unknown:
        raise ModelLoadError(
            f"input_shapes names unknown input(s) {sorted(unknown)}; the model has "
            f"{sorted(inputs)}",
            model=artifact.name,
        )
    pinned: dict[str, int] = {}
    for name, want in shapes.items():
        have = inputs[name]
        if len(have) != len(want):
            raise ModelLoadError(
                f"input_shapes[{name!r}] has rank {len(want)}; the model's input has {len(have)}",
                model=artifact.name,
            )
        for dim, size in zip(have, want, strict=True):
            if isinstance(dim, int) and dim >= 0:
                if dim != size:
                    raise ModelLoadError(
                        f"input_shapes[{name!r}]={tuple(want)} does not fit the model's "
                        f"{tuple(have)}",
                        model=artifact.name,
                    )
            elif isinstance(dim, str) and dim:
                if pinned.setdefault(dim, size) != size:
                    raise ModelLoadError(
                        f"input_shapes give dimension {dim!r} two sizes", model=artifact.name
                    )
            else:
                raise ModelLoadError(
                    f"input {name!r} has an unnamed dynamic dimension: it cannot be pinned",
                    model=artifact.name,
                )
    for dim, size in pinned.items():
        so.add_free_dimension_override_by_name(dim, size)


def _trt_version() -> dict[str, str]:
    try:
        import tensorrt
    except ImportError:
        return {}
    return {"tensorrt": str(tensorrt.__version__)}


def _load_reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    low = text.lower()
    if "protobuf parsing failed" in low or "invalidprotobuf" in type(exc).__name__.lower():
        return f"corrupt or not an ONNX file ({text})"
    if "opset" in low:
        return f"unsupported opset ({text})"
    return f"onnxruntime cannot load the model ({text})"

"""TensorRT backend (TensorRT 10 Python API): plans from disk or built from ONNX, run with
``execute_async_v3`` on a CUDA stream.

Owns the plan build (``Builder`` + ``OnnxParser`` + ``BuilderConfig`` with FP16/INT8 flags, a
timing cache loaded before and saved after each build, one optimization profile for dynamic
inputs), the engine cache under ``cache_dir/tensorrt/<cache_key>/`` (key: model digest, TensorRT
version, GPU compute capability, precision, so a JetPack or TensorRT upgrade never loads a stale
engine), plan deserialisation (``IRuntime.deserialize_cuda_engine``) and the session that binds
device buffers by name (``set_tensor_address``). Leaves buffers, streams and copies to
``agent.cuda`` and the choice between backends to the registry and the chooser.

TensorRT comes from JetPack's system packages on Jetson (or NVIDIA's wheels on x86); the
``tensorrt`` extra adds cuda-python for the plumbing. Every TensorRT import is lazy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from agent import cuda
from agent._fs import write_file_atomic
from agent.backends.base import (
    Artifact,
    Feeds,
    LoadOptions,
    Outputs,
    Probe,
    cache_key,
    validate_feeds,
)
from agent.contracts.manifest import ArtifactFormat, Precision
from agent.contracts.tensors import TensorSpec, datatype_of
from agent.errors import (
    BackendError,
    BackendUnavailableError,
    InferenceError,
    ModelLoadError,
)
from agent.logs import get_logger

__all__ = ["DEFAULT_MAX_BATCH", "TensorRTBackend", "TensorRTSession", "build_plan"]

log = get_logger(__name__)

DEFAULT_MAX_BATCH = 8  # a dynamic batch dimension gets the profile 1 / 1 / this
WORKSPACE_BYTES = 1 << 30  # builder scratch memory; Orin Nano has 8 GiB shared with the CPU
_NAME = "tensorrt"


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            _NAME,
            "tensorrt Python bindings not installed (JetPack's python3-libnvinfer, "
            f"or NVIDIA's tensorrt wheel on x86): {exc}",
        ) from exc
    major = int(str(trt.__version__).split(".", 1)[0])
    if major < 10:
        raise BackendUnavailableError(
            _NAME, f"TensorRT {trt.__version__} found; this backend needs TensorRT 10 or newer"
        )
    return trt


class _Logger:
    """One TensorRT logger per process (TensorRT wants it to outlive every object it made)."""

    _instance: Any = None
    _lock = threading.Lock()

    @classmethod
    def get(cls, trt: Any) -> Any:
        with cls._lock:
            if cls._instance is None:
                cls._instance = trt.Logger(trt.Logger.WARNING)
            return cls._instance


def _write_cache(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, data)


def _profile_shapes(
    name: str, shape: tuple[int, ...], fixed: Mapping[str, tuple[int, ...]]
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """min/opt/max for one network input, or ``None`` when the input is fully static."""
    if name in fixed:
        want = tuple(fixed[name])
        if len(want) != len(shape) or any(
            d >= 0 and d != w for d, w in zip(shape, want, strict=True)
        ):
            raise ModelLoadError(f"input_shapes[{name!r}]={want} does not fit the model's {shape}")
        return want, want, want
    if all(d >= 0 for d in shape):
        return None
    if any(d < 0 for d in shape[1:]):
        raise ModelLoadError(
            f"input {name!r} has dynamic dimensions besides the batch ({shape}); "
            "give its shape in input_shapes to build a TensorRT plan"
        )
    rest = shape[1:]
    return (1, *rest), (1, *rest), (DEFAULT_MAX_BATCH, *rest)


def build_plan(
    onnx_path: Path,
    *,
    precision: Precision,
    timing_cache: Path | None = None,
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
    model: str = "model",
) -> bytes:
    """Parse ``onnx_path`` and build a serialized TensorRT plan.

    ``fp16`` sets ``BuilderFlag.FP16``; ``int8`` sets ``INT8`` (and ``FP16`` for the layers left in
    float) and expects explicit quantization (Q/DQ nodes), since TensorRT 10 deprecates implicit
    calibration. The timing cache at ``timing_cache`` is loaded when present (a mismatched one is
    ignored) and written back after the build, so the next build of a similar model is faster.
    """
    trt = _import_trt()
    logger = _Logger.get(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelLoadError(f"TensorRT cannot parse the ONNX file ({errors})", model=model)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    needs_profile = False
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        try:
            shapes = _profile_shapes(tensor.name, tuple(tensor.shape), input_shapes or {})
        except ModelLoadError as exc:
            raise ModelLoadError(str(exc), model=model) from exc
        if shapes is not None:
            profile.set_shape(tensor.name, *shapes)
            needs_profile = True
    if needs_profile:
        config.add_optimization_profile(profile)
    cached = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cached)
    config.set_timing_cache(cache, ignore_mismatch=True)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelLoadError(
            f"TensorRT could not build a {precision} plan (see the TensorRT log above)", model=model
        )
    if timing_cache is not None:
        _write_cache(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


class TensorRTSession:
    """A deserialized engine with one execution context, one stream and its staging buffers.

    ``run`` is serialised by a lock (one context); load a second session for parallel streams.
    """

    backend = _NAME
    device = "cuda"

    def __init__(self, engine: Any, *, name: str, precision: Precision, device: int = 0) -> None:
        trt = _import_trt()
        self._trt = trt
        self._name = name
        self.precision: Precision = precision
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ModelLoadError("TensorRT could not create an execution context", model=name)
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        self._dtypes: dict[str, np.dtype[Any]] = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
            self._dtypes[tensor] = dtype
            spec = TensorSpec(
                name=tensor,
                datatype=datatype_of(dtype),
                shape=tuple(int(d) for d in engine.get_tensor_shape(tensor)),
            )
            is_input = engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(spec)
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self._dynamic = {s.name for s in self.inputs if any(d < 0 for d in s.shape)}
        self._stream = cuda.Stream(device=device)
        self._buffers = cuda.IoBuffers(self._stream, device=device)
        self._lock = threading.Lock()
        self._closed = False

    def run(self, feeds: Feeds) -> Outputs:
        validate_feeds(self._name, self.inputs, feeds)  # TensorRT reads raw memory: check first
        with self._lock, cuda.CAPTURE_GATE.shared():
            if self._closed:
                raise InferenceError(f"{self._name}: session is closed")
            ctx = self._context
            for spec in self.inputs:
                if spec.name in self._dynamic and not ctx.set_input_shape(
                    spec.name, feeds[spec.name].shape
                ):
                    raise InferenceError(
                        f"{self._name}: input {spec.name!r}: shape {feeds[spec.name].shape} is "
                        "outside the plan's optimization profile"
                    )
            try:
                addresses = self._buffers.upload(feeds)
                shapes: dict[str, tuple[Any, tuple[int, ...]]] = {}
                for spec in self.outputs:
                    shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
                    if any(d < 0 for d in shape):
                        raise InferenceError(
                            f"{self._name}: output {spec.name!r} has a data-dependent shape, "
                            "which this backend does not support"
                        )
                    dtype = self._dtypes[spec.name]
                    nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
                    addresses[spec.name] = self._buffers.address(spec.name, nbytes)
                    shapes[spec.name] = (dtype, shape)
                for tensor, address in addresses.items():
                    ctx.set_tensor_address(tensor, address)
                if not ctx.execute_async_v3(self._stream.handle):
                    raise InferenceError(f"{self._name}: TensorRT execute_async_v3 failed")
                return self._buffers.download(shapes)
            except BackendError as exc:
                raise InferenceError(f"{self._name}: {exc}") from exc

    def close(self) -> None:
        with self._lock, cuda.CAPTURE_GATE.shared():
            if self._closed:
                return
            self._closed = True
            self._stream.synchronize()
            self._buffers.close()
            self._stream.close()
            self._context = None
            self._engine = None


class TensorRTBackend:
    """Runs TensorRT plans, building and caching them from ONNX when given ONNX."""

    name: ClassVar[str] = _NAME
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx", "tensorrt-plan")

    def probe(self) -> Probe:
        try:
            trt = _import_trt()
            cuda.require_device()
            gpu = cuda.device_info()
        except BackendUnavailableError as exc:
            return Probe(self.name, usable=False, reason=exc.reason)
        except BackendError as exc:
            return Probe(self.name, usable=False, reason=str(exc))
        return Probe(
            self.name,
            usable=True,
            version=str(trt.__version__),
            devices=(f"{gpu.name} (sm {gpu.compute_capability})",),
        )

    def engine_dir(self, artifact: Artifact, options: LoadOptions) -> Path | None:
        """Where the plan built from ``artifact`` is cached, or ``None`` without a cache dir."""
        if options.cache_dir is None:
            return None
        trt = _import_trt()
        key = cache_key(
            digest=artifact.sha256(),
            precision=artifact.precision,
            runtime_versions={"tensorrt": str(trt.__version__)},
            compute_capability=options.compute_capability or cuda.compute_capability(),
        )
        return options.cache_dir / "tensorrt" / key

    def load(self, artifact: Artifact, options: LoadOptions) -> TensorRTSession:
        trt = _import_trt()
        cuda.require_device()
        if artifact.format not in self.formats:
            raise BackendUnavailableError(self.name, f"cannot load {artifact.format} artifacts")
        if not artifact.path.is_file():
            raise ModelLoadError(f"model file not found: {artifact.path}", model=artifact.name)
        if artifact.format == "tensorrt-plan":
            plan = artifact.path.read_bytes()
        else:
            plan = self._plan_from_onnx(artifact, options)
        runtime = trt.Runtime(_Logger.get(trt))
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise ModelLoadError(
                "TensorRT could not deserialize the plan (built by another TensorRT version "
                "or for another GPU?)",
                model=artifact.name,
            )
        session = TensorRTSession(engine, name=artifact.name, precision=artifact.precision)
        log.debug("trt_session_loaded", model=artifact.name, precision=artifact.precision)
        return session

    def _plan_from_onnx(self, artifact: Artifact, options: LoadOptions) -> bytes:
        key_dir = self.engine_dir(artifact, options)
        plan_file = key_dir / "engine.plan" if key_dir else None
        if plan_file is not None and plan_file.is_file():
            log.info("trt_engine_cache_hit", model=artifact.name, path=str(plan_file))
            return plan_file.read_bytes()
        timing = None
        if options.cache_dir is not None:
            trt = _import_trt()
            cc = options.compute_capability or cuda.compute_capability()
            timing = (
                options.cache_dir
                / "tensorrt"
                / "timing"
                / f"trt{trt.__version__}-sm{cc}-{artifact.precision}.cache"
            )
        log.info("trt_plan_building", model=artifact.name, precision=artifact.precision)
        plan = build_plan(
            artifact.path,
            precision=artifact.precision,
            timing_cache=timing,
            input_shapes=options.input_shapes,
            model=artifact.name,
        )
        if plan_file is not None:
            _write_cache(plan_file, plan)
            log.info("trt_engine_cached", model=artifact.name, path=str(plan_file))
        return plan

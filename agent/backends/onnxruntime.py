"""ONNX Runtime backend: provider order TensorRT EP -> CUDA EP -> OpenVINO EP -> CPU.

Owns the provider list, provider options and the TensorRT EP's engine/timing caches (kept under
``cache_dir/<cache_key>``). Leaves the choice between backends to ``agent.backends.choice``.
The hot path is ``InferenceSession.run`` and nothing else; feeds are checked against the specs
only when the runtime rejects them, to say which tensor was wrong.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, ClassVar

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
from agent.contracts.tensors import TensorSpec
from agent.errors import BackendUnavailableError, InferenceError, ModelLoadError
from agent.logs import get_logger

__all__ = ["PROVIDER_ORDER", "OnnxRuntimeBackend", "OrtSession", "ort_type_to_datatype"]

log = get_logger(__name__)

PROVIDER_ORDER = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)

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


class _ClosedSession:
    def run(self, *_: Any) -> Any:
        raise RuntimeError("closed")


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
        """The provider list with options, in preference order, for what is installed."""
        import onnxruntime as ort

        available = set(ort.get_available_providers())
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
                    "trt_fp16_enable": str(artifact.precision == "fp16"),
                }
            elif provider == "OpenVINOExecutionProvider" and key_dir is not None:
                opts = {"cache_dir": str(key_dir / "openvino")}
            opts.update(options.ort_provider_options.get(provider, {}))
            chosen.append((provider, opts) if opts else provider)
        return chosen

    def load(self, artifact: Artifact, options: LoadOptions) -> OrtSession:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(self.name, "onnxruntime not installed") from exc
        if artifact.format != "onnx":
            raise BackendUnavailableError(self.name, f"cannot load {artifact.format} artifacts")
        if not artifact.path.is_file():
            raise ModelLoadError(f"model file not found: {artifact.path}", model=artifact.name)
        so = ort.SessionOptions()
        if options.intra_op_threads:
            so.intra_op_num_threads = options.intra_op_threads
            so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        providers = self.providers(artifact, options)
        try:
            sess = ort.InferenceSession(str(artifact.path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own pybind classes: translate them all
            raise ModelLoadError(_load_reason(exc), model=artifact.name) from exc
        session = OrtSession(sess, name=artifact.name, precision=artifact.precision)
        log.debug(
            "ort_session_loaded",
            model=artifact.name,
            provider=session.device,
            providers=[p if isinstance(p, str) else p[0] for p in providers],
        )
        return session


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

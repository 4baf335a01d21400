"""OpenVINO backend: ONNX files and OpenVINO IR (``.xml`` + ``.bin``) on CPU, GPU, NPU or AUTO.

Owns the compile configuration (performance hint, thread cap, inference precision, the model
cache under ``cache_dir/openvino/<cache_key>``), the per-thread infer requests and the translation
of OpenVINO's errors into ``ModelLoadError``/``InputError``. Leaves the choice between backends to
``agent.backends.choice``.

Precision is honoured, not guessed: an ``fp32`` artifact compiles with
``INFERENCE_PRECISION_HINT=f32`` (the CPU plugin would otherwise run bf16 on AVX512-BF16/AMX
machines and f16 on ARM, which moves outputs by far more than FP32 tolerance); ``fp16`` lets the
device use its reduced float type (bf16/f16); ``int8`` leaves QDQ graphs to the plugin's
low-precision transformations and runs what stays in float at f32 too (with the default, bf16
on an AMX machine, OpenVINO 2026.4 refused to compile ONNX Runtime's QDQ digits model: "No
suitable implementations").

The hot path is: one ``ov.Tensor`` wrapping each feed without a copy, ``InferRequest.infer()``
(which releases the GIL), and a copy of each output (the request's buffers are reused by the next
call). ``InferRequest.infer(dict)`` is avoided: its Python-side conversion costs several times a
small model's inference.

A background load (``LoadOptions.background_load``: a swap's loader, beside a version that
serves) compiles in a child process at the lowest CPU priority, into the model cache
(``cache_dir/openvino/<cache_key>``, or a temporary directory without a ``cache_dir``), and this
process imports the compiled blob. Compiling in-process slows the serving thread's frames by
half again or more, although the compile is single-threaded (the GIL and the plugin's shared
state); an import takes about a fifth of the time and fits between two frames. A child that
fails or times out is logged, and the model is compiled here instead.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

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
from agent.backends.quiet import GATE
from agent.contracts.manifest import ArtifactFormat, Precision
from agent.contracts.tensors import TensorSpec, datatype_of
from agent.errors import BackendUnavailableError, InferenceError, InputError, ModelLoadError
from agent.logs import get_logger

__all__ = ["MAX_ONNX_OPSET", "OpenVinoBackend", "OpenVinoSession", "onnx_header"]

log = get_logger(__name__)

# OpenVINO maps each ONNX node to the highest op version it knows, so a model stamped with an
# opset from the future loads silently and may compute something else. Default-domain opsets
# above the newest one ONNX has released (opset 28, ONNX 1.23) are refused.
MAX_ONNX_OPSET = 28

CHILD_COMPILE_TIMEOUT_S = 600.0  # a background compile taking longer is abandoned
_CHILD_ERROR_MAX = 300  # characters of a failed child's stderr kept in the log
# The child: lowest CPU priority, then the same compile as here, into the CACHE_DIR in cfg.
_CHILD_COMPILE = (
    "import json, os, sys\n"
    "os.nice(19)\n"
    "import openvino as ov\n"
    "ov.Core().compile_model(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))\n"
)


class OpenVinoSession:
    """A compiled OpenVINO model; each concurrent call gets an infer request of its own.

    Requests are pooled rather than tied to threads: a request warmed up by a loader thread
    (its first inference allocates and primes the plugin's buffers) serves the hot path after
    a swap, instead of the serving thread paying for a fresh request on its first frame.
    """

    backend = "openvino"

    def __init__(
        self,
        compiled: Any,
        *,
        name: str,
        precision: Precision,
        onnx_outputs: tuple[str, ...] = (),
    ) -> None:
        import openvino as ov

        self._ov_tensor = ov.Tensor
        self._compiled = compiled
        self._name = name
        self.precision: Precision = precision
        devices = _execution_devices(compiled)
        self.device: str = ",".join(devices) if devices else "unknown"
        # The float type the plugin computes in ("f32", "bf16", "f16"), read back from the
        # compiled model; "" where the device does not say (AUTO, MULTI).
        self.compute: str = _compute_type(compiled)
        self.inputs = tuple(_spec(port, ()) for port in compiled.inputs)
        self.outputs = tuple(_spec(port, onnx_outputs) for port in compiled.outputs)
        self._input_order = tuple((i, s.name, s.dtype) for i, s in enumerate(self.inputs))
        self._output_order = tuple((i, s.name) for i, s in enumerate(self.outputs))
        self._idle: list[Any] = []  # requests not in use; list.pop/append are atomic
        self._requests: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def raw(self) -> Any:
        """The ``openvino.CompiledModel``, for async queues and device properties."""
        return self._compiled

    def _request(self) -> Any:
        try:
            return self._idle.pop()
        except IndexError:
            pass
        with self._lock:
            if self._closed:
                raise InferenceError(f"{self._name}: session is closed")
            request = self._compiled.create_infer_request()
            self._requests.append(request)
        return request

    def run(self, feeds: Feeds) -> Outputs:
        if self._closed:
            raise InferenceError(f"{self._name}: session is closed")
        request = self._request()
        try:
            return self._run_on(request, feeds)
        finally:
            if not self._closed:
                self._idle.append(request)

    def _run_on(self, request: Any, feeds: Feeds) -> Outputs:
        if len(feeds) != len(self._input_order):
            validate_feeds(self._name, self.inputs, feeds)
        tensor = self._ov_tensor
        # The request shares the arrays' memory but holds no reference to them: the copies made
        # here must outlive the inference (the caller keeps its own feeds alive).
        copies: list[np.ndarray[Any, Any]] = []
        try:
            for index, name, dtype in self._input_order:
                array = feeds.get(name)
                # OpenVINO converts a wrong dtype silently: check it here, cheaply.
                if array is None or array.dtype != dtype:
                    validate_feeds(self._name, self.inputs, feeds)
                    raise InputError(f"{self._name}: input {name!r} does not fit")  # unreachable
                if not array.flags.c_contiguous or not array.flags.writeable:
                    # OpenVINO shares only writeable memory; the API's binary tensors are
                    # read-only views of the request body.
                    array = np.array(array, order="C")
                    copies.append(array)
                request.set_input_tensor(index, tensor(array, shared_memory=True))
            request.infer()
        except InputError:
            raise
        except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
            if self._closed:
                raise InferenceError(f"{self._name}: session is closed") from exc
            validate_feeds(self._name, self.inputs, feeds)  # raises InputError if it can say why
            raise InferenceError(f"{self._name}: openvino run failed: {_first_line(exc)}") from exc
        return {name: request.get_output_tensor(i).data.copy() for i, name in self._output_order}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._requests.clear()
            self._idle.clear()
        self._compiled = None


# Device plugins asked for their devices only where the kernel shows such a device: asking a
# plugin loads it, and ``Core.available_devices`` asks every one (the GPU and NPU plugins cost
# about 28 MiB of resident memory in a process on a machine with neither: a Raspberry Pi's agent).
DEVICE_NODES: dict[str, tuple[str, str]] = {
    "GPU": ("/dev/dri", "renderD"),  # Intel GPUs: a DRM render node
    "NPU": ("/dev/accel", "accel"),  # Intel NPUs: a compute accelerator node
}


def available_devices(core: Any, nodes: Mapping[str, tuple[str, str]] | None = None) -> list[str]:
    """``Core.available_devices`` (``CPU``, ``GPU``, ``GPU.0``/``GPU.1``, ``NPU``) without loading
    the plugin of a device kind whose device node is absent. A plugin missing from this build of
    OpenVINO, or one that cannot start, has no devices, as in ``available_devices``."""
    nodes = DEVICE_NODES if nodes is None else nodes
    found: list[str] = []
    for kind in ("CPU", *nodes):
        if kind in nodes:
            folder, prefix = nodes[kind]
            try:
                present = any(n.name.startswith(prefix) for n in Path(folder).iterdir())
            except OSError:
                present = False
            if not present:
                continue
        try:
            ids = [str(i) for i in core.get_property(kind, "AVAILABLE_DEVICES")]
        except RuntimeError:
            continue
        if len(ids) > 1:
            found.extend(f"{kind}.{i}" for i in ids)
        elif ids:
            found.append(kind)
    return found


class OpenVinoBackend:
    """Compiles ONNX files and OpenVINO IR with the OpenVINO runtime."""

    name: ClassVar[str] = "openvino"
    formats: ClassVar[tuple[ArtifactFormat, ...]] = ("onnx", "openvino-ir")
    _core: ClassVar[Any] = None
    _cpu_type: ClassVar[str | None] = None
    _devices: ClassVar[tuple[str, ...] | None] = None  # available_devices(), once per process
    _core_lock = threading.Lock()

    @classmethod
    def core(cls) -> Any:
        """The process-wide ``openvino.Core`` (creating one loads every plugin: do it once)."""
        with cls._core_lock:
            if cls._core is None:
                import openvino as ov

                cls._core = ov.Core()
            return cls._core

    @classmethod
    def cpu_inference_type(cls) -> str:
        """The float type the CPU plugin computes in by default: ``bf16`` on AVX512-BF16 and
        AMX CPUs, ``f16`` on ARM, ``f32`` elsewhere (or without a CPU plugin)."""
        if cls._cpu_type is None:
            try:
                hint = cls.core().get_property("CPU", "INFERENCE_PRECISION_HINT")
                cls._cpu_type = str(hint.get_type_name())
            except Exception:  # no CPU plugin in this build: nothing computes in its type
                cls._cpu_type = "f32"
        return cls._cpu_type

    @classmethod
    def compile_device(cls, requested: str) -> str:
        """The device string to compile for: ``requested``, except that ``AUTO`` on a machine
        whose only OpenVINO device is its CPU is ``CPU``. AUTO asks every device plugin for its
        devices, which loads it (the GPU and NPU plugins and AUTO's own: 43 MB resident on a
        machine with neither, measured on MiniLM INT4), to pick the CPU anyway."""
        if requested != "AUTO":
            return requested
        if cls._devices is None:
            try:
                cls._devices = tuple(available_devices(cls.core()))
            except RuntimeError:
                cls._devices = ()
        return "CPU" if cls._devices == ("CPU",) else requested

    def probe(self) -> Probe:
        try:
            import openvino as ov
        except ImportError as exc:
            return Probe(self.name, usable=False, reason=f"openvino not installed ({exc})")
        try:
            devices = tuple(available_devices(self.core()))
        except RuntimeError as exc:
            return Probe(
                self.name,
                usable=False,
                version=_version(ov),
                reason=f"openvino runtime cannot start ({_first_line(exc)})",
            )
        if not devices:
            return Probe(self.name, usable=False, version=_version(ov), reason="no devices found")
        type(self)._devices = devices
        return Probe(self.name, usable=True, version=_version(ov), devices=devices)

    def config(self, artifact: Artifact, options: LoadOptions) -> dict[str, Any]:
        """The compile properties for ``artifact`` (public so the docs and tests can show it)."""
        import openvino as ov

        cfg: dict[str, Any] = {"PERFORMANCE_HINT": options.openvino_hint}
        if artifact.precision == "fp32" or (
            artifact.precision == "int8" and artifact.reduced_compute is None
        ):
            cfg["INFERENCE_PRECISION_HINT"] = "f32"
        elif artifact.reduced_compute is not None and options.openvino_reduced_float == "gated":
            # An fp16/int4/int8 artifact lets the CPU plugin compute its float parts in its
            # reduced type; where the accuracy gate did not accept that type, the CPU computes
            # in f32 (a GPU keeps f16). An INT8 artifact known to no gate stays f32.
            reduced = self.cpu_inference_type()
            if reduced != "f32" and reduced not in artifact.reduced_compute:
                device = self.compile_device(options.openvino_device)
                if device == "CPU" or device.startswith("CPU."):
                    cfg["INFERENCE_PRECISION_HINT"] = "f32"
                elif not device.startswith(("GPU", "NPU")):  # AUTO, MULTI, HETERO
                    cfg["DEVICE_PROPERTIES"] = {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
        if options.intra_op_threads:
            cfg["INFERENCE_NUM_THREADS"] = options.intra_op_threads
        if options.cache_dir is not None:
            key = cache_key(
                digest=artifact.sha256(),
                precision=artifact.precision,
                runtime_versions={"openvino": _version(ov), "device": options.openvino_device},
                compute_capability=None,
            )
            cache = options.cache_dir / "openvino" / key
            cache.mkdir(parents=True, exist_ok=True)
            cfg["CACHE_DIR"] = str(cache)
        return cfg

    def load(self, artifact: Artifact, options: LoadOptions) -> OpenVinoSession:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError(self.name, "openvino not installed") from exc
        if artifact.format not in self.formats:
            raise BackendUnavailableError(self.name, f"cannot load {artifact.format} artifacts")
        path = artifact.path
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}", model=artifact.name)
        onnx_outputs: tuple[str, ...] = ()
        if artifact.format == "onnx":
            onnx_outputs = _check_onnx(path, artifact.name)
        else:
            weights = path.with_suffix(".bin")
            if not weights.is_file():
                raise ModelLoadError(
                    f"OpenVINO IR weights not found: {weights}", model=artifact.name
                )
        cfg = self.config(artifact, options)
        device = self.compile_device(options.openvino_device)
        with ExitStack() as stack:
            if options.background_load:
                if "CACHE_DIR" not in cfg:  # kept until this process has imported the blob
                    cfg["CACHE_DIR"] = stack.enter_context(
                        tempfile.TemporaryDirectory(prefix="edgefleet-ov-")
                    )
                _compile_in_child(path, device, cfg, artifact.name)
                if options.between_frames is not None:
                    options.between_frames()  # the import (about 30 ms) starts after a frame
            try:
                compiled = self.core().compile_model(str(path), device, cfg)
            except RuntimeError as exc:
                raise _load_error(exc, artifact, options.openvino_device) from exc
        session = OpenVinoSession(
            compiled, name=artifact.name, precision=artifact.precision, onnx_outputs=onnx_outputs
        )
        log.debug(
            "openvino_model_compiled",
            model=artifact.name,
            device=session.device,
            hint=options.openvino_hint,
            precision=artifact.precision,
            compute=session.compute or ("f32" if _pins_f32(cfg) else "device default"),
        )
        return session


def _pins_f32(cfg: Mapping[str, Any]) -> bool:
    cpu = cfg.get("DEVICE_PROPERTIES", {}).get("CPU", {})
    return "f32" in (cfg.get("INFERENCE_PRECISION_HINT"), cpu.get("INFERENCE_PRECISION_HINT"))


def _compile_in_child(
    path: Path, device: str, cfg: dict[str, Any], model: str, timeout_s: float | None = None
) -> bool:
    """Compile ``path`` into ``cfg["CACHE_DIR"]`` in a child process at nice 19, stopped while
    requests are served (``quiet.GATE``); whether it did.

    A cache directory that already holds this compile (a marker per configuration, written after
    a child succeeded) is not compiled again. Failures are logged, not raised: the caller's own
    compile then does the work (and reports the model's errors as load errors)."""
    cache = Path(cfg["CACHE_DIR"])
    settings = json.dumps({"device": device, **cfg}, sort_keys=True, default=str)
    marker = cache / f"compiled-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"
    if marker.is_file():
        return True
    timeout_s = timeout_s or CHILD_COMPILE_TIMEOUT_S
    try:
        # held still while the serving process runs a request (agent.backends.quiet)
        done = GATE.run(
            [sys.executable, "-c", _CHILD_COMPILE, str(path), device, json.dumps(cfg)],
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        reason = f"timed out after {timeout_s:g} s"
        log.warning("openvino_child_compile_failed", model=model, reason=reason)
        return False
    except OSError as exc:
        log.warning("openvino_child_compile_failed", model=model, reason=_first_line(exc))
        return False
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace").strip()[-_CHILD_ERROR_MAX:]
        log.warning(
            "openvino_child_compile_failed",
            model=model,
            reason=f"exit status {done.returncode}: {tail}",
        )
        return False
    try:
        marker.touch()
    except OSError as exc:  # only costs a second child compile next time
        log.debug("openvino_compile_marker_unwritten", reason=str(exc))
    return True


def _version(ov: Any) -> str:
    return str(ov.__version__).split("-")[0]


_OV_NOISE = re.compile(r"Exception from \S+:\d+:|Check '.*?' failed at \S+:\d+:")


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """OpenVINO's message without its "Exception from src/...:NN:" source locations."""
    text = " ".join(_OV_NOISE.sub(" ", str(exc)).split())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_error(exc: RuntimeError, artifact: Artifact, device: str) -> ModelLoadError:
    text = _first_line(exc)
    low = str(exc).lower()
    if "is not registered" in low or "cannot load library" in low or "failed to load" in low:
        return ModelLoadError(
            f"openvino device {device} is not usable ({text})", model=artifact.name
        )
    if "unable to read the model" in low or "cannot be found" in low or "bin file" in low:
        return ModelLoadError(f"corrupt or unreadable model file ({text})", model=artifact.name)
    return ModelLoadError(f"openvino cannot load the model ({text})", model=artifact.name)


def _execution_devices(compiled: Any) -> list[str]:
    try:
        return [str(d) for d in compiled.get_property("EXECUTION_DEVICES")]
    except RuntimeError:
        return []


def _compute_type(compiled: Any) -> str:
    try:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    except (RuntimeError, AttributeError):
        return ""


def _spec(port: Any, preferred_names: tuple[str, ...]) -> TensorSpec:
    names = port.get_names()
    name = next((n for n in preferred_names if n in names), None) or port.get_any_name()
    pshape = port.get_partial_shape()
    shape: tuple[int, ...] = ()
    if pshape.rank.is_static:
        shape = tuple(d.get_length() if d.is_static else -1 for d in pshape)
    try:
        datatype = datatype_of(np.dtype(port.get_element_type().to_dtype()))
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ModelLoadError(
            f"unsupported tensor type {port.get_element_type()} of {name}"
        ) from exc
    return TensorSpec(name=name, datatype=datatype, shape=shape)


def _check_onnx(path: Path, model: str) -> tuple[str, ...]:
    """Refuse a file that is not an ONNX model or needs a newer opset; return its output names."""
    header = onnx_header(path)
    if header is None:
        raise ModelLoadError(f"corrupt or not an ONNX file ({path.name})", model=model)
    opset = header["opsets"].get("", header["opsets"].get("ai.onnx"))
    if opset is not None and opset > MAX_ONNX_OPSET:
        raise ModelLoadError(
            f"unsupported opset {opset} (openvino reads ONNX opsets up to {MAX_ONNX_OPSET})",
            model=model,
        )
    outputs: tuple[str, ...] = header["outputs"]
    return outputs


def onnx_header(path: Path) -> dict[str, Any] | None:
    """The opset imports and graph output names of an ONNX file, read from its protobuf wire
    format without the ``onnx`` package; ``None`` when the bytes are not a ModelProto."""
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                return None
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                header = _parse_or_none(buf)
    except OSError:
        return None
    return header


def _parse_or_none(buf: mmap.mmap) -> dict[str, Any] | None:
    # The views into ``buf`` die with this frame, so the caller can close the mapping.
    try:
        return _parse_model(memoryview(buf))
    except ValueError:
        return None


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> list[tuple[int, int, Any]]:
    """Top-level (field, wire type, value) of one protobuf message; raises ``ValueError``."""
    out: list[tuple[int, int, Any]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field 0")
        value: Any = None
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise ValueError("truncated field")
        out.append((field, wire, value))
    return out


def _parse_model(buf: memoryview) -> dict[str, Any] | None:
    # ModelProto: 1 ir_version, 7 graph, 8 opset_import; GraphProto: 12 output; ValueInfo: 1 name
    fields = _fields(buf)
    if not any(f == 1 and w == 0 for f, w, _ in fields):
        return None
    opsets: dict[str, int] = {}
    outputs: list[str] = []
    for field, wire, value in fields:
        if field == 8 and wire == 2:
            domain, version = "", 1
            for f2, w2, v2 in _fields(value):
                if f2 == 1 and w2 == 2:
                    domain = bytes(v2).decode("utf-8", "replace")
                elif f2 == 2 and w2 == 0:
                    version = v2
            opsets[domain] = version
        elif field == 7 and wire == 2:
            for f2, w2, v2 in _fields(value):
                if f2 == 12 and w2 == 2:
                    for f3, w3, v3 in _fields(v2):
                        if f3 == 1 and w3 == 2:
                            outputs.append(bytes(v3).decode("utf-8", "replace"))
    if not opsets:
        return None
    return {"opsets": opsets, "outputs": tuple(outputs)}

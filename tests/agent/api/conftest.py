"""A small real ``ModelRepository`` over ONNX Runtime sessions, and running API servers.

``OnnxRepository`` stands in for the model slots (``agent.models.slots``) with the same protocol
(``agent.models.serving``): several models, several loaded versions each, one active version, and
``activate`` to swap. The models are real: the digits CNN, the PP-OCR detector, and an "echo"
graph (Identity per protocol datatype) that covers every datatype including BYTES and FP16.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.api import ApiServer, start_api
from agent.backends import Artifact, LoadOptions, load_first
from agent.backends.base import Session
from agent.config import ApiConfig
from agent.contracts.tensors import DTYPES, TensorSpec
from agent.errors import ModelError

ECHO_TYPES = tuple(DTYPES)  # every protocol datatype


class OrtServedModel:
    """One loaded version: an ONNX Runtime session behind the ``ServedModel`` protocol."""

    backend = "onnxruntime"

    def __init__(
        self, name: str, version: str, session: Session, max_batch_size: int | None = None
    ) -> None:
        self.name = name
        self.version = version
        self.session = session
        self.inputs: tuple[TensorSpec, ...] = session.inputs
        self.outputs: tuple[TensorSpec, ...] = session.outputs
        batchable = all(s.shape and s.shape[0] == -1 for s in self.inputs)
        self.max_batch_size = (
            max_batch_size if max_batch_size is not None else (32 if batchable else 0)
        )
        self.calls = 0  # model executions, to tell batched runs from single ones
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready

    def infer(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        self.calls += 1
        # ONNX Runtime's Python binding takes and returns strings as ``str``; the protocol's
        # BYTES are ``bytes`` (UTF-8 here).
        run_feeds = {
            name: _to_str(arr) if arr.dtype == object else arr for name, arr in feeds.items()
        }
        outputs = self.session.run(run_feeds)
        return {
            name: _to_bytes(arr) if arr.dtype == object or arr.dtype.kind == "U" else arr
            for name, arr in outputs.items()
        }


def _to_str(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out = np.empty(arr.shape, dtype=object)
    out.ravel()[:] = [x.decode("utf-8") if isinstance(x, bytes) else x for x in arr.ravel()]
    return out


def _to_bytes(arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    out = np.empty(arr.shape, dtype=object)
    out.ravel()[:] = [x.encode("utf-8") if isinstance(x, str) else x for x in arr.ravel()]
    return out


class OnnxRepository:
    """Models by name, loaded versions by name, one active version per model."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, OrtServedModel]] = {}
        self._active: dict[str, str] = {}

    def load(
        self,
        name: str,
        version: str,
        path: Path,
        *,
        max_batch_size: int | None = None,
        activate: bool = True,
    ) -> OrtServedModel:
        session = load_first(Artifact(path, name=name), LoadOptions(intra_op_threads=1))
        served = OrtServedModel(name, version, session, max_batch_size)
        with self._lock:
            self._models.setdefault(name, {})[version] = served
            if activate or name not in self._active:
                self._active[name] = version
        return served

    def activate(self, name: str, version: str) -> None:
        with self._lock:
            if version not in self._models.get(name, {}):
                raise ModelError(f"version {version!r} is not loaded", model=name)
            self._active[name] = version

    def names(self) -> Sequence[str]:
        with self._lock:
            return sorted(self._models)

    def versions(self, name: str) -> Sequence[str]:
        with self._lock:
            if name not in self._models:
                raise ModelError("unknown model", model=name)
            return sorted(self._models[name])

    def get(self, name: str, version: str | None = None) -> OrtServedModel:
        with self._lock:
            loaded = self._models.get(name)
            if loaded is None:
                raise ModelError("unknown model", model=name)
            key = version if version is not None else self._active[name]
            served = loaded.get(key)
            if served is None:
                raise ModelError(f"version {key!r} is not loaded", model=name)
            return served


def echo_model(path: Path) -> Path:
    """An ONNX graph with one ``Nx2`` input per datatype, each echoed by Identity."""
    if path.exists():
        return path
    from onnx import TensorProto, helper, save

    elem = {
        "BOOL": TensorProto.BOOL,
        "UINT8": TensorProto.UINT8,
        "UINT16": TensorProto.UINT16,
        "UINT32": TensorProto.UINT32,
        "UINT64": TensorProto.UINT64,
        "INT8": TensorProto.INT8,
        "INT16": TensorProto.INT16,
        "INT32": TensorProto.INT32,
        "INT64": TensorProto.INT64,
        "FP16": TensorProto.FLOAT16,
        "FP32": TensorProto.FLOAT,
        "FP64": TensorProto.DOUBLE,
        "BYTES": TensorProto.STRING,
    }
    inputs, outputs, nodes = [], [], []
    for dt in ECHO_TYPES:
        low = dt.lower()
        inputs.append(helper.make_tensor_value_info(f"in_{low}", elem[dt], ["n", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{low}", elem[dt], ["n", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{low}"], [f"out_{low}"]))
    graph = helper.make_graph(nodes, "echo", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    tmp = path.with_suffix(".tmp")
    save(model, str(tmp))
    tmp.replace(path)
    return path


def echo_feeds(rows: int = 2, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    """One array per echo input, with values that exercise each type's range."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for dt in ECHO_TYPES:
        name = f"in_{dt.lower()}"
        if dt == "BOOL":
            feeds[name] = rng.integers(0, 2, (rows, 2)).astype(bool)
        elif dt == "BYTES":
            words = [b"a", "\u00e9t\u00e9".encode(), b"", b"robot", b"x" * 40]
            feeds[name] = np.array(
                [[words[(r + c) % len(words)] for c in range(2)] for r in range(rows)],
                dtype=object,
            )
        elif dt.startswith("FP"):
            feeds[name] = rng.normal(0, 100, (rows, 2)).astype(np.dtype(dt.replace("FP", "float")))
        else:
            info = np.iinfo(np.dtype(dt.lower()))
            feeds[name] = np.array([[info.min, info.max]] * rows, dtype=np.dtype(dt.lower()))
    return feeds


@pytest.fixture(scope="session")
def repository(digits_path: Path, ppocr_path: Path, samples_dir: Path) -> OnnxRepository:
    repo = OnnxRepository()
    repo.load("digits", "1", digits_path)
    repo.load("digits", "2", digits_path, activate=True)
    repo.load("ppocr-det", "1", ppocr_path, max_batch_size=4)
    repo.load("echo", "1", echo_model(samples_dir / "echo-all-types.onnx"), max_batch_size=0)
    return repo


@pytest.fixture(scope="session")
def api(
    repository: OnnxRepository, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiServer]:
    """One server for the session: HTTP + gRPC on free loopback ports, and a Unix socket."""
    sock = tmp_path_factory.mktemp("api") / "agent.sock"
    config = ApiConfig(http_port=0, grpc_port=0, unix_socket=sock, max_body_bytes=4 * 1024 * 1024)
    server = start_api(repository, config)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def http_url(api: ApiServer) -> str:
    return f"127.0.0.1:{api.http_port}"


@pytest.fixture(scope="session")
def grpc_url(api: ApiServer) -> str:
    return f"127.0.0.1:{api.grpc_port}"


@pytest.fixture(autouse=True)
def _finalize_clients_here() -> Iterator[None]:
    """tritonclient's HTTP client closes its gevent pool again in ``__del__``, which raises when
    the garbage collector happens to run on another thread (a server thread, say). Collect on
    the test's own thread, right after it, so finalizers always run where the client lived."""
    yield
    gc.collect()

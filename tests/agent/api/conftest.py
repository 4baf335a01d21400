"""The local API's tests run over the daemon's own repository: a real ``SlotRegistry`` of
``ModelSlot``s serving bundles installed in a real ``ModelStore``.

The models are real: the digits CNN (versions 1.0.0 and 2.0.0, 2.0.0 serving), the PP-OCR
detector, and an "echo" graph (Identity per protocol datatype) that covers every datatype
including BYTES and FP16. ``swap`` makes another installed version serve, as an update does.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.api import ApiServer, start_api
from agent.backends import Artifact, LoadOptions, load_first
from agent.config import ApiConfig, BackendConfig, BatchingConfig, SwapConfig
from agent.contracts.tensors import DTYPES
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.slots import ModelSlot, SlotRegistry
from agent.models.store import ModelStore

ECHO_TYPES = tuple(DTYPES)  # every protocol datatype
DIGITS_SERVING = "2.0.0"
# What a user would configure for these models (the PP-OCR detector's batches stay small).
MODEL_BATCHING = {"ppocr-det": BatchingConfig(max_batch_size=4)}


def serve(
    root: Path,
    models: Mapping[str, tuple[Path, Mapping[str, np.ndarray[Any, Any]], tuple[str, ...]]],
) -> SlotRegistry:
    """A registry serving each model: ``name -> (onnx file, golden feeds, versions)``; every
    version is installed, the last one serves."""
    store = ModelStore(root)
    registry = SlotRegistry()
    for name, (path, golden, versions) in models.items():
        for version in versions:
            bundle = root.parent / f"{root.name}-bundles" / name / version
            build_bundle(bundle, name, version, [VariantSpec(path)], golden_inputs=dict(golden))
            store.install(bundle)
        slot = ModelSlot(
            name,
            store,
            swap_config=SwapConfig(warmup_runs=1, loader_threads=1),
            backend_config=BackendConfig(measure=False, intra_op_threads=1),
            load_options=LoadOptions(intra_op_threads=1),
            latency_runs=1,
        )
        slot.start(versions[-1])
        registry.add(slot)
    return registry


def reference(path: Path) -> Any:
    """An in-process session of ``path``: the outputs the API must return."""
    return load_first(Artifact(path), LoadOptions(intra_op_threads=1))


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
def repository(
    digits_path: Path, ppocr_path: Path, samples_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlotRegistry]:
    from agent.samples import text_page

    root = tmp_path_factory.mktemp("api-models") / "state"
    registry = serve(
        root,
        {
            "digits": (
                digits_path,
                {"input": np.zeros((1, 1, 8, 8), np.float32)},
                ("1.0.0", DIGITS_SERVING),
            ),
            "ppocr-det": (ppocr_path, {"x": text_page(1, 0, size=64)}, ("1.0.0",)),
            "echo": (echo_model(samples_dir / "echo-all-types.onnx"), echo_feeds(), ("1.0.0",)),
        },
    )
    yield registry
    registry.close()


@pytest.fixture(scope="session")
def digits_reference(digits_path: Path) -> Iterator[Any]:
    session = reference(digits_path)
    yield session
    session.close()


@pytest.fixture(scope="session")
def api(repository: SlotRegistry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """One server for the session: HTTP + gRPC on free loopback ports, and a Unix socket."""
    sock = tmp_path_factory.mktemp("api") / "agent.sock"
    config = ApiConfig(
        http_port=0,
        grpc_port=0,
        unix_socket=sock,
        max_body_bytes=4 * 1024 * 1024,
        model_batching=MODEL_BATCHING,
    )
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

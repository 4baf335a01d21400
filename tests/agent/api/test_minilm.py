"""A real transformer through the local API: all-MiniLM-L6-v2 with INT64 token inputs, served
by real ``ModelSlot``s, FP32 and its INT4 weight-only (``MatMulNBits``) build, over HTTP and gRPC
with the unmodified Triton clients."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from agent import minilm
from agent.api import ApiServer, start_api
from agent.backends import LoadOptions
from agent.config import ApiConfig, BackendConfig, SwapConfig
from agent.contracts.manifest import Tolerance
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.slots import ModelSlot, SlotRegistry
from agent.models.store import ModelStore
from control_plane.builds._int4 import quantize_onnx_int4

SENTENCES = ["The forecast warns of heavy rain.", "It will pour this afternoon.", "Goal!"]


@pytest.fixture(scope="module")
def served(
    samples_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ApiServer, dict[str, Path]]]:
    fp32 = minilm.minilm_onnx(samples_dir)
    int4 = samples_dir / "all-minilm-l6-v2-int4.onnx"
    if not int4.exists():
        quantize_onnx_int4(fp32, int4)
    root = tmp_path_factory.mktemp("minilm-api") / "state"
    store = ModelStore(root)
    registry = SlotRegistry()
    golden = minilm.encode(SENTENCES[:1])
    for name, path, precision in (("minilm", fp32, "fp32"), ("minilm-int4", int4, "int4")):
        bundle = root.parent / "bundles" / name
        # the build gate's golden tolerance for INT4 (measured x headroom): weight-only 4 bits
        # moves each embedding by about 20 % in L2 and keeps its meaning (tests/control_plane)
        tolerance = Tolerance(max_rel_l2=0.3) if precision == "int4" else None
        spec = VariantSpec(path, precision=precision, tolerance=tolerance)
        build_bundle(bundle, name, "1.0.0", [spec], golden_inputs=golden, reference_model=fp32)
        store.install(bundle)
        slot = ModelSlot(
            name,
            store,
            swap_config=SwapConfig(warmup_runs=1, loader_threads=1),
            backend_config=BackendConfig(measure=False, intra_op_threads=1),
            load_options=LoadOptions(intra_op_threads=1),
            latency_runs=1,
        )
        slot.start("1.0.0")
        registry.add(slot)
    server = start_api(registry, ApiConfig(http_port=0, grpc_port=0))
    yield server, {"minilm": fp32, "minilm-int4": int4}
    server.stop()
    registry.close()


def _in_process(path: Path, feeds: dict[str, np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out: np.ndarray[Any, Any] = session.run([minilm.OUTPUT_NAME], feeds)[0]
    return out


@pytest.mark.parametrize("model", ["minilm", "minilm-int4"])
def test_minilm_over_http_with_int64_tokens(
    served: tuple[ApiServer, dict[str, Path]], model: str
) -> None:
    server, paths = served
    feeds = minilm.encode(SENTENCES)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    meta = client.get_model_metadata(model)
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == dict.fromkeys(
        minilm.INPUT_NAMES, "INT64"
    )
    inputs = []
    for name, array in feeds.items():
        item = httpclient.InferInput(name, list(array.shape), "INT64")
        item.set_data_from_numpy(array, binary_data=True)
        inputs.append(item)
    result = client.infer(model, inputs)
    got = result.as_numpy(minilm.OUTPUT_NAME)
    client.close()
    np.testing.assert_allclose(got, _in_process(paths[model], feeds), rtol=1e-4, atol=1e-5)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-4)
    assert float(got[0] @ got[1]) > float(got[0] @ got[2])  # rain is nearer rain than football
    assert result.get_response()["parameters"]["variant"] == (
        "onnxruntime-fp32" if model == "minilm" else "onnxruntime-int4"
    )


def test_minilm_over_grpc_and_a_float_token_tensor_is_refused(
    served: tuple[ApiServer, dict[str, Path]],
) -> None:
    server, paths = served
    feeds = minilm.encode(SENTENCES[:2])
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = []
    for name, array in feeds.items():
        item = grpcclient.InferInput(name, list(array.shape), "INT64")
        item.set_data_from_numpy(array)
        inputs.append(item)
    got = client.infer("minilm", inputs).as_numpy(minilm.OUTPUT_NAME)
    np.testing.assert_allclose(got, _in_process(paths["minilm"], feeds), rtol=1e-4, atol=1e-5)
    wrong = []
    for name, array in feeds.items():
        item = grpcclient.InferInput(name, list(array.shape), "FP32")
        item.set_data_from_numpy(array.astype(np.float32))
        wrong.append(item)
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="INT64"):
        client.infer("minilm", wrong)
    client.close()

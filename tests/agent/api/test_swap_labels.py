"""Honest labels: while versions swap under load, every answer of the local API (HTTP and gRPC,
batched and alone) names the version and the variant that computed it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from agent.api import start_api
from agent.config import ApiConfig, BackendConfig, BatchingConfig, SwapConfig
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.slots import ModelSlot, SlotRegistry
from agent.models.store import ModelStore
from tests.agent.store import models

SHIFT = {"1.0.0": 0.0, "2.0.0": 5.0}
VARIANT = {"1.0.0": "first-fp32", "2.0.0": "second-fp32"}


@pytest.fixture
def registry(tmp_path: Path, digits_path: Path) -> Any:
    store = ModelStore(tmp_path / "state")
    x = np.zeros((1, 1, 8, 8), np.float32)
    for version, delta in SHIFT.items():
        model = models.shifted(digits_path, tmp_path / f"{version}.onnx", delta)
        bundle = tmp_path / "bundles" / version
        build_bundle(
            bundle,
            "digits",
            version,
            [VariantSpec(model, id=VARIANT[version])],
            golden_inputs={"input": x},
        )
        store.install(bundle)
    slot = ModelSlot(
        "digits",
        store,
        swap_config=SwapConfig(warmup_runs=1, loader_threads=1),
        backend_config=BackendConfig(measure=False, intra_op_threads=1),
        latency_runs=1,
    )
    slot.start("1.0.0")
    reg = SlotRegistry([slot])
    yield reg
    reg.close()


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "alone"])
def test_every_answer_names_what_computed_it(
    registry: SlotRegistry, digits: Any, batching: bool
) -> None:
    config = ApiConfig(
        http_port=0,
        grpc_port=0,
        batching=BatchingConfig(enabled=batching, max_queue_delay_us=2000),
    )
    x = digits.x_test[:4].astype(np.float32)
    base = registry.slot("digits").infer({"input": x})["logits"] - SHIFT["1.0.0"]
    answers: list[tuple[str, str, np.ndarray[Any, Any]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()
    with start_api(registry, config) as server:
        http_url = f"http://127.0.0.1:{server.http_port}/v2/models/digits/infer"
        grpc_url = f"127.0.0.1:{server.grpc_port}"

        def http_client(rows: int) -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    body = {
                        "inputs": [
                            {
                                "name": "input",
                                "datatype": "FP32",
                                "shape": [rows, 1, 8, 8],
                                "data": x[:rows].ravel().tolist(),
                            }
                        ]
                    }
                    try:
                        doc = client.post(http_url, json=body).json()
                        out = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(rows, -1)
                        with lock:
                            answers.append(
                                (doc["model_version"], doc["parameters"]["variant"], out)
                            )
                    except BaseException as exc:
                        errors.append(exc)
                        return

        def grpc_client(rows: int) -> None:
            client = grpcclient.InferenceServerClient(grpc_url)
            try:
                while not stop.is_set():
                    item = grpcclient.InferInput("input", [rows, 1, 8, 8], "FP32")
                    item.set_data_from_numpy(x[:rows])
                    result = client.infer("digits", [item])
                    response = result.get_response()
                    with lock:
                        answers.append(
                            (
                                response.model_version,
                                response.parameters["variant"].string_param,
                                result.as_numpy("logits"),
                            )
                        )
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=http_client, args=(r,)) for r in (1, 2)]
        threads += [threading.Thread(target=grpc_client, args=(r,)) for r in (1, 3)]
        for t in threads:
            t.start()
        slot = registry.slot("digits")
        for i in range(6):  # bounded: six swaps under load
            slot.swap("2.0.0" if i % 2 == 0 else "1.0.0")
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert len(answers) > 20
    seen = set()
    for version, variant, out in answers:
        assert variant == VARIANT[version], (version, variant)
        rows = out.shape[0]
        np.testing.assert_allclose(out, base[:rows] + SHIFT[version], rtol=1e-4, atol=1e-4)
        seen.add(version)
    assert seen == set(SHIFT)

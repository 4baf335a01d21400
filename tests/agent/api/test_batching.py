"""Dynamic batching: the pure plan, the worker on real models, and concurrent HTTP clients."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from agent.api import Batcher, BatchPolicy, plan_batch, start_api
from agent.config import ApiConfig, BackendConfig, BatchingConfig
from agent.errors import InferenceError
from agent.models.slots import ModelSlot, SlotRegistry
from tests.agent.api.conftest import DIGITS_SERVING, ECHO_TYPES, echo_feeds, serve


@pytest.mark.parametrize(
    ("sizes", "policy", "waited", "closed", "want"),
    [
        ([], BatchPolicy(8), 1.0, False, None),
        ([1], BatchPolicy(8, 0.0), 0.0, False, 1),  # no delay: run what is there
        ([1, 1], BatchPolicy(8, 0.01), 0.0, False, None),  # within the delay: wait
        ([1, 1], BatchPolicy(8, 0.01), 0.01, False, 2),  # delay over
        ([1, 1], BatchPolicy(8, 0.01), 0.0, True, 2),  # nothing more can join
        ([4, 4], BatchPolicy(8, 1.0), 0.0, False, 2),  # full
        ([4, 3, 2], BatchPolicy(8, 1.0), 0.0, False, 2),  # the next would overflow
        ([9], BatchPolicy(8, 1.0), 0.0, False, 1),  # larger than max alone: still runs
        ([2, 2, 1], BatchPolicy(8, 1.0, (4,)), 0.0, False, 2),  # preferred size reached
        ([2, 1, 1], BatchPolicy(8, 0.01, (2, 4)), 0.0, False, 3),
        ([1, 1, 1], BatchPolicy(8, 0.01, (2, 4)), 0.02, False, 2),  # largest preferred prefix
        ([3], BatchPolicy(8, 0.01, (2, 4)), 0.02, False, 1),  # no preferred prefix: all
    ],
)
def test_plan_batch(
    sizes: list[int], policy: BatchPolicy, waited: float, closed: bool, want: int | None
) -> None:
    assert plan_batch(sizes, policy, waited_s=waited, closed=closed) == want


def _grpc_infer(url: str, x: np.ndarray[Any, Any], model: str = "digits") -> np.ndarray[Any, Any]:
    # The gRPC client is thread-safe; tritonclient.http's gevent pool must stay on one thread.
    client = grpcclient.InferenceServerClient(url)
    try:
        item = grpcclient.InferInput("input", list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        result = client.infer(model, [item])
        out: np.ndarray[Any, Any] = result.as_numpy("logits")
        return out
    finally:
        client.close()


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"http://{url}/metrics").text.splitlines():
        if line.startswith(f'{name}{{model="digits",version="{DIGITS_SERVING}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_concurrent_clients_are_batched_and_match_unbatched(
    repository: SlotRegistry, digits_reference: Any, digits: Any
) -> None:
    config = ApiConfig(
        http_port=0,
        grpc_port=0,
        model_batching={"digits": BatchingConfig(max_queue_delay_us=50_000, max_batch_size=16)},
    )
    clients = 8
    # Different clients, different batch sizes (1..3 rows each), several rounds.
    requests = [digits.x_test[i * 3 : i * 3 + 1 + i % 3] for i in range(clients * 3)]
    expected = [digits_reference.run({"input": x})["logits"] for x in requests]
    results: dict[int, np.ndarray[Any, Any]] = {}
    errors: list[BaseException] = []
    with start_api(repository, config) as server:
        url = f"127.0.0.1:{server.http_port}"
        grpc_url = f"127.0.0.1:{server.grpc_port}"
        barrier = threading.Barrier(clients)

        def client(index: int) -> None:
            try:
                for j in range(index, len(requests), clients):
                    if j < clients:
                        barrier.wait(timeout=10)  # the first round starts together
                    results[j] = _grpc_infer(grpc_url, requests[j])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors
        executions = _metric(url, "nv_inference_exec_count")
        answered = _metric(url, "nv_inference_request_success")
        inferences = _metric(url, "nv_inference_count")
    assert len(results) == len(requests)
    for j, want in enumerate(expected):
        np.testing.assert_allclose(results[j], want, rtol=1e-5, atol=1e-5)
    assert answered == len(requests)
    assert inferences == sum(len(x) for x in requests)
    assert executions < answered  # some requests shared a run


def test_bad_requests_never_join_or_stall_a_batch(
    repository: SlotRegistry, digits_reference: Any
) -> None:
    config = ApiConfig(
        http_port=0,
        grpc_port=0,
        model_batching={"digits": BatchingConfig(max_queue_delay_us=20_000)},
    )
    good = np.random.default_rng(1).random((2, 1, 8, 8), dtype=np.float32)
    want = digits_reference.run({"input": good})["logits"]
    outcomes: list[Any] = []
    with start_api(repository, config) as server:
        grpc_url = f"127.0.0.1:{server.grpc_port}"

        def send(x: np.ndarray[Any, Any]) -> None:
            try:
                outcomes.append(_grpc_infer(grpc_url, x))
            except InferenceServerException as exc:
                outcomes.append(exc)

        bad_inputs = [good[:, :, :4], good.astype(np.float64)[:, :, :, :]]
        threads = [threading.Thread(target=send, args=(good,)) for _ in range(4)]
        threads += [threading.Thread(target=send, args=(b,)) for b in bad_inputs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(b.queued() for b in server.service._batchers.values()) == 0
    goods = [o for o in outcomes if isinstance(o, np.ndarray)]
    bads = [o for o in outcomes if isinstance(o, InferenceServerException)]
    assert len(goods) == 4
    assert len(bads) == 2
    for got in goods:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _fixed_batch_model(path: Path) -> Path:
    """Input ``[-1, 4]`` that only runs with one row: Reshape to a fixed ``[1, 4]``."""
    from onnx import TensorProto, helper, numpy_helper, save

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input", "shape"], ["logits"])],
        "one_row",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.array([1, 4], np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))
    return path


def test_failed_batch_is_retried_one_by_one(tmp_path: Path) -> None:
    model = _fixed_batch_model(tmp_path / "one_row.onnx")
    golden = {"input": np.ones((1, 4), np.float32)}
    registry = serve(tmp_path / "state", {"one-row": (model, golden, ("1.0.0",))})
    served = registry.slot("one-row").current
    assert served is not None
    batcher = Batcher("one-row", BatchPolicy(max_batch_size=8, max_queue_delay_s=5.0))
    try:
        rows = [np.full((1, 4), i, np.float32) for i in range(3)]
        futures = [batcher.submit(served, {"input": r}, 1) for r in rows]
        two = batcher.submit(served, {"input": np.ones((2, 4), np.float32)}, 2)
        # Preferred/max not reached and the delay is long: close the batch by stopping.
        batcher.stop()
        for r, fut in zip(rows, futures, strict=True):
            result = fut.result(10)
            np.testing.assert_array_equal(result.outputs["logits"], r)
            assert result.batch_size == 1
        with pytest.raises(InferenceError):  # its own error, nobody else's
            two.result(10)
        assert served.health().requests == 1 + 4  # the failed batch, then each alone
    finally:
        batcher.stop()
        registry.close()


def test_a_swap_closes_the_batch_and_each_request_keeps_its_version(
    repository: SlotRegistry,
) -> None:
    serving = repository.slot("digits")
    # The version served before, loaded beside it (as during a swap): a slot of its own.
    before = ModelSlot(
        "digits", serving.store, backend_config=BackendConfig(measure=False), latency_runs=1
    )
    before.start("1.0.0")
    v1, v2 = before.current, serving.current
    assert v1 is not None
    assert v2 is not None
    batcher = Batcher("digits", BatchPolicy(max_batch_size=8, max_queue_delay_s=5.0))
    x = np.zeros((1, 1, 8, 8), np.float32)
    try:
        first = [batcher.submit(v1, {"input": x}, 1) for _ in range(2)]
        later = batcher.submit(v2, {"input": x}, 1)  # swapped meanwhile: closes v1's batch
        assert {f.result(10).computed.version for f in first} == {"1.0.0"}
        assert first[0].result().batch_size == 2
        batcher.stop()  # nothing else will join v2's batch: close it
        assert later.result(10).computed.version == DIGITS_SERVING
    finally:
        batcher.stop()
        before.close()


def test_models_without_batch_dimension_are_not_batched(api: Any, tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save

    fixed = tmp_path / "fixed.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["out"])],
        "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(fixed))
    golden = {"input": np.ones((2, 2), np.float32)}
    registry = serve(tmp_path / "state", {"fixed": (fixed, golden, ("1.0.0",))})
    try:
        served = registry.slot("fixed")
        assert served.max_batch_size == 0  # no dynamic first dimension: no batch dimension
        assert api.service._batcher(served) is None
    finally:
        registry.close()
    digits = api.service.repository.get("digits")
    assert digits.max_batch_size == 32  # from its session: a dynamic first dimension


def test_batching_turned_off_for_one_model_runs_each_request_alone(
    repository: SlotRegistry,
) -> None:
    # The echo graph has a batch dimension; a user turns batching off for it alone.
    config = ApiConfig(
        http_port=0,
        grpc_port=0,
        batching=BatchingConfig(max_queue_delay_us=50_000),
        model_batching={"echo": BatchingConfig(enabled=False)},
    )
    echo = repository.slot("echo").current
    assert echo is not None
    assert echo.max_batch_size == 32  # from its session: it could be batched
    feeds = echo_feeds(rows=2, seed=5)
    clients = 4
    results: list[dict[str, np.ndarray[Any, Any]]] = []
    errors: list[BaseException] = []
    before = echo.health().requests
    with start_api(repository, config) as server:

        def call() -> None:
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
            try:
                items = []
                for name, arr in feeds.items():
                    datatype = (
                        "BYTES" if arr.dtype == object else grpcclient.np_to_triton_dtype(arr.dtype)
                    )
                    item = grpcclient.InferInput(name, list(arr.shape), datatype)
                    item.set_data_from_numpy(arr)
                    items.append(item)
                result = client.infer("echo", items)
                results.append(
                    {f"in_{t.lower()}": result.as_numpy(f"out_{t.lower()}") for t in ECHO_TYPES}
                )
            except BaseException as exc:
                errors.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=call) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert "echo" not in server.service._batchers
    assert not errors, errors
    assert len(results) == clients
    for got in results:
        for name, want in feeds.items():
            np.testing.assert_array_equal(got[name], want)
    assert echo.health().requests == before + clients  # one run per request, none shared

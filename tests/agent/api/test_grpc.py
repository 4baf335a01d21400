"""The gRPC binding against the unmodified ``tritonclient.grpc`` client."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from agent.api import start_api
from agent.api._messages import messages
from agent.config import ApiConfig
from agent.models.slots import SlotRegistry
from tests.agent.api.conftest import DIGITS_SERVING, ECHO_TYPES, echo_feeds


def _inputs(feeds: dict[str, np.ndarray[Any, Any]]) -> list[grpcclient.InferInput]:
    out = []
    for name, arr in feeds.items():
        datatype = "BYTES" if arr.dtype == object else grpcclient.np_to_triton_dtype(arr.dtype)
        item = grpcclient.InferInput(name, list(arr.shape), datatype)
        item.set_data_from_numpy(arr)
        out.append(item)
    return out


@pytest.fixture
def client(grpc_url: str) -> Any:
    c = grpcclient.InferenceServerClient(grpc_url)
    yield c
    c.close()


def test_health_and_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", DIGITS_SERVING)
    with pytest.raises(InferenceServerException, match="not loaded"):  # installed only
        client.is_model_ready("digits", "1.0.0")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edgefleet-agent"
    model = client.get_model_metadata("digits", as_json=True)
    assert model["versions"] == [DIGITS_SERVING]
    assert model["inputs"][0] == {
        "name": "input",
        "datatype": "FP32",
        "shape": ["-1", "1", "8", "8"],
    }


def test_digits_match_in_process(client: Any, digits_reference: Any, digits: Any) -> None:
    x = digits.x_test[:7]
    result = client.infer("digits", _inputs({"input": x}))
    want = digits_reference.run({"input": x})["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert response.model_version == DIGITS_SERVING
    assert response.parameters["variant"].string_param == "onnxruntime-fp32"
    named = client.infer("digits", _inputs({"input": x}), model_version=DIGITS_SERVING)
    assert named.get_response().model_version == DIGITS_SERVING


def test_every_datatype_round_trips(client: Any) -> None:
    feeds = echo_feeds(rows=2, seed=3)
    outputs = [grpcclient.InferRequestedOutput(f"out_{t.lower()}") for t in ECHO_TYPES]
    result = client.infer("echo", _inputs(feeds), outputs=outputs)
    for dt in ECHO_TYPES:
        sent = feeds[f"in_{dt.lower()}"]
        got = result.as_numpy(f"out_{dt.lower()}")
        if dt == "BYTES":
            assert list(got.ravel()) == list(sent.ravel())
        else:
            assert got.dtype == sent.dtype, dt
            np.testing.assert_array_equal(got, sent)


def test_typed_contents_are_accepted(grpc_url: str) -> None:
    m = messages()
    request = m["ModelInferRequest"](model_name="digits")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, 1, 8, 8])
    tensor.contents.fp32_contents.extend([0.5] * 64)
    with grpc.insecure_channel(grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=m["ModelInferRequest"].SerializeToString,
            response_deserializer=m["ModelInferResponse"].FromString,
        )
        response = call(request, timeout=10)
        assert list(response.outputs[0].shape) == [1, 10]
        assert len(response.raw_output_contents[0]) == 40
        tensor.contents.fp32_contents.pop()
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "63 elements" in err.value.details()


@pytest.mark.parametrize(
    ("model", "version", "feeds", "status", "message"),
    [
        ("nope", "", {"input": np.ones((1, 1, 8, 8), np.float32)}, "NOT_FOUND", "unknown model"),
        (
            "digits",
            "9.0.0",
            {"input": np.ones((1, 1, 8, 8), np.float32)},
            "NOT_FOUND",
            "9.0.0 is not loaded",
        ),
        ("digits", "", {"x": np.ones((1, 1, 8, 8), np.float32)}, "INVALID_ARGUMENT", "unknown"),
        ("digits", "", {"input": np.ones((1, 1, 8, 7), np.float32)}, "INVALID_ARGUMENT", "shape"),
        ("digits", "", {"input": np.ones((1, 1, 8, 8), np.int64)}, "INVALID_ARGUMENT", "dtype"),
    ],
    ids=["unknown-model", "unknown-version", "wrong-name", "wrong-shape", "wrong-dtype"],
)
def test_bad_requests_get_status_codes(
    client: Any, model: str, version: str, feeds: Any, status: str, message: str
) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, _inputs(feeds), model_version=version)
    assert err.value.status() == f"StatusCode.{status}"
    assert message in err.value.message()
    assert client.is_server_ready()


def test_raw_byte_count_that_lies(grpc_url: str) -> None:
    m = messages()
    request = m["ModelInferRequest"](model_name="digits")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, 1, 8, 8])
    request.raw_input_contents.append(b"\0" * 255)
    with grpc.insecure_channel(grpc_url) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=m["ModelInferRequest"].SerializeToString,
            response_deserializer=m["ModelInferResponse"].FromString,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "255 bytes" in err.value.details()


def test_oversized_message_is_refused(repository: SlotRegistry) -> None:
    config = ApiConfig(http_port=0, grpc_port=0, max_body_bytes=64 * 1024)
    with start_api(repository, config) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        big = np.zeros((1, 3, 128, 128), np.float32)  # 192 KiB
        with pytest.raises(InferenceServerException) as err:
            client.infer("ppocr-det", _inputs({"x": big}))
        assert err.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert client.is_server_live()
        client.close()


def test_token_auth(repository: SlotRegistry) -> None:
    config = ApiConfig(http_port=0, grpc_port=0, token="s3cret-token")
    with start_api(repository, config) as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        with pytest.raises(InferenceServerException) as err:
            client.is_server_live()
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        headers = {"authorization": "Bearer s3cret-token"}
        assert client.is_server_live(headers=headers)
        x = np.ones((1, 1, 8, 8), np.float32)
        assert client.infer("digits", _inputs({"input": x}), headers=headers).as_numpy(
            "logits"
        ).shape == (1, 10)
        client.close()

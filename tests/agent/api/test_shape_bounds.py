"""Tensor shapes are checked before any array is made: arbitrary shapes and data lengths over
HTTP (JSON and binary) and gRPC (raw and typed contents) answer 200 or 400 / INVALID_ARGUMENT,
never 500 / INTERNAL, and the server keeps serving.

Bounded to a few seconds by default; ``EDGEFLEET_SOAK=1`` runs many more examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import ApiServer
from agent.api._messages import messages
from agent.api.codec import MAX_ELEMENTS, RequestError, decode_http_request, shape_size

EXAMPLES = 1500 if os.environ.get("EDGEFLEET_SOAK") == "1" else 120
DATATYPES = ["FP32", "FP16", "INT64", "INT8", "BYTES", "BOOL", "UINT8", "FP64"]
INPUTS = ["input", "in_fp32", "in_bytes", "in_bool", "in_int64"]

# Huge dimensions beside zeros and ones: the shapes that used to reach numpy's reshape.
dims = st.one_of(
    st.integers(0, 3),
    st.sampled_from([2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1]),
    st.integers(0, 2**63 - 1),
)
shapes = st.lists(dims, max_size=6)
ENDPOINTS = ["/v2/models/echo/infer", "/v2/models/digits/infer"]
ISSUE_SHAPES = [[0, 2**63 - 1], [0, 2**62, 2**62], [2**31, 0], [0] * 5 + [2**40]]


@pytest.fixture(scope="module")
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{api.http_port}", timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def infer_call(grpc_url: str) -> Iterator[Any]:
    m = messages()
    with grpc.insecure_channel(grpc_url) as channel:
        yield channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=m["ModelInferRequest"].SerializeToString,
            response_deserializer=m["ModelInferResponse"].FromString,
        )


def _http_ok(resp: httpx.Response) -> None:
    assert resp.status_code in (200, 400, 404, 413), (resp.status_code, resp.text[:300])
    if resp.status_code != 200:
        assert resp.json()["error"], resp.text


def test_shape_size_bounds() -> None:
    for shape in ISSUE_SHAPES:
        with pytest.raises(RequestError) as err:
            shape_size("x", shape)
        assert err.value.status_code == 400
    assert shape_size("x", [0, 1000]) == 0
    assert shape_size("x", [MAX_ELEMENTS]) == MAX_ELEMENTS
    with pytest.raises(RequestError, match="at most 16"):
        shape_size("x", [1] * 17)


@pytest.mark.parametrize("shape", ISSUE_SHAPES)
def test_issue_shapes_answer_400(http: httpx.Client, infer_call: Any, shape: list[int]) -> None:
    body = {"inputs": [{"name": "in_fp32", "datatype": "FP32", "shape": shape, "data": []}]}
    resp = http.post("/v2/models/echo/infer", json=body)
    assert resp.status_code == 400, resp.text
    assert "elements" in resp.json()["error"]
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "in_fp32",
                    "datatype": "FP32",
                    "shape": shape,
                    "parameters": {"binary_data_size": 0},
                }
            ]
        }
    ).encode()
    resp = http.post(
        "/v2/models/echo/infer",
        content=head,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert resp.status_code == 400, resp.text
    m = messages()
    request = m["ModelInferRequest"](model_name="echo")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "in_fp32", "FP32"
    tensor.shape.extend(shape)
    request.raw_input_contents.append(b"")
    with pytest.raises(grpc.RpcError) as err:
        infer_call(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    name=st.sampled_from(INPUTS),
    datatype=st.sampled_from(DATATYPES),
    shape=shapes,
    binary=st.booleans(),
    length=st.integers(0, 4096),
)
def test_http_arbitrary_shapes_and_lengths(
    http: httpx.Client,
    endpoint: str,
    name: str,
    datatype: str,
    shape: list[int],
    binary: bool,
    length: int,
) -> None:
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if binary:
        tensor["parameters"] = {"binary_data_size": length}
        head = json.dumps({"inputs": [tensor]}).encode()
        resp = http.post(
            endpoint,
            content=head + b"\x01" * length,
            headers={"Inference-Header-Content-Length": str(len(head))},
        )
    else:
        element: Any = "a" if datatype == "BYTES" else (True if datatype == "BOOL" else 1)
        tensor["data"] = [element] * min(length, 512)
        resp = http.post(endpoint, json={"inputs": [tensor]})
    _http_ok(resp)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(
    model=st.sampled_from(["echo", "digits"]),
    name=st.sampled_from(INPUTS),
    datatype=st.sampled_from(DATATYPES),
    shape=shapes,
    raw=st.booleans(),
    length=st.integers(0, 4096),
)
def test_grpc_arbitrary_shapes_and_lengths(
    infer_call: Any, model: str, name: str, datatype: str, shape: list[int], raw: bool, length: int
) -> None:
    m = messages()
    request = m["ModelInferRequest"](model_name=model)
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = name, datatype
    tensor.shape.extend(shape)
    if raw:
        request.raw_input_contents.append(b"\x01" * length)
    else:
        count = min(length, 512)
        contents = tensor.contents
        if datatype == "BYTES":
            contents.bytes_contents.extend([b"a"] * count)
        elif datatype == "BOOL":
            contents.bool_contents.extend([True] * count)
        elif datatype in ("FP32", "FP16"):
            contents.fp32_contents.extend([1.0] * count)
        elif datatype == "FP64":
            contents.fp64_contents.extend([1.0] * count)
        elif datatype == "INT64":
            contents.int64_contents.extend([1] * count)
        elif datatype == "UINT8":
            contents.uint_contents.extend([1] * count)
        else:
            contents.int_contents.extend([1] * count)
    code = grpc.StatusCode.OK
    try:
        infer_call(request, timeout=10)
    except grpc.RpcError as exc:
        code = exc.code()
    assert code in (
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ), code


@settings(max_examples=EXAMPLES * 4, deadline=None, derandomize=True)
@given(shape=shapes, datatype=st.sampled_from(DATATYPES), length=st.integers(0, 64))
def test_decoder_never_raises_anything_but_request_error(
    shape: list[int], datatype: str, length: int
) -> None:
    tensor = {
        "name": "x",
        "datatype": datatype,
        "shape": shape,
        "parameters": {"binary_data_size": length},
    }
    head = json.dumps({"inputs": [tensor]}).encode()
    status = 200
    try:
        decode_http_request("m", None, head + b"\x00" * length, str(len(head)))
    except RequestError as exc:
        status = exc.status_code
    assert status in (200, 400)


def test_server_still_serves(http: httpx.Client) -> None:
    assert http.get("/v2/health/ready").status_code == 200

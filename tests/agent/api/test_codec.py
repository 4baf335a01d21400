"""Wire formats without a server: JSON and raw tensors, the binary extension's framing."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from agent.api.codec import (
    InferResponse,
    RequestError,
    decode_http_request,
    decode_json_tensor,
    decode_raw_tensor,
    encode_http_response,
    encode_raw_tensor,
)


def test_bytes_raw_round_trip() -> None:
    arr = np.array([[b"", b"\xff\x00"], [b"robot", "été".encode()]], dtype=object)
    raw = encode_raw_tensor(arr)
    assert raw[:4] == struct.pack("<I", 0)
    back = decode_raw_tensor("t", "BYTES", [2, 2], raw)
    assert back.tolist() == arr.tolist()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00", "truncated"),
        (struct.pack("<I", 9) + b"abc", "overruns"),
        (struct.pack("<I", 1) + b"a", "1 BYTES elements"),
    ],
)
def test_bytes_raw_that_lies(raw: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        decode_raw_tensor("t", "BYTES", [2], raw)


def test_fp16_json_and_raw_agree() -> None:
    values = [0.5, -2.0, 65504.0, 1e-3]
    from_json = decode_json_tensor("h", "FP16", [2, 2], [[0.5, -2.0], [65504.0, 1e-3]])
    from_raw = decode_raw_tensor("h", "FP16", [2, 2], np.array(values, np.float16).tobytes())
    assert from_json.dtype == np.float16
    np.testing.assert_array_equal(from_json, from_raw)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT8", [1, 300], "does not fit"),
        ("INT32", [1.5, 2], "integers"),
        ("BOOL", [1, 0], "true or false"),
        ("FP32", ["a", 1], "numbers"),
        ("BYTES", [1, 2], "strings"),
        ("FP32", [1.0], "1 elements"),
    ],
)
def test_json_data_that_does_not_fit(datatype: str, data: list[object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        decode_json_tensor("t", datatype, [2], data)


def test_binary_framing_and_output_flags() -> None:
    x = np.arange(4, dtype=np.float32)
    head = json.dumps(
        {
            "id": "r1",
            "inputs": [
                {
                    "name": "a",
                    "datatype": "FP32",
                    "shape": [4],
                    "parameters": {"binary_data_size": 16},
                },
                {"name": "b", "datatype": "INT64", "shape": [1], "data": [7]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
        }
    ).encode()
    req = decode_http_request("m", None, head + x.tobytes(), str(len(head)))
    np.testing.assert_array_equal(req.inputs["a"], x)
    assert req.inputs["b"].tolist() == [7]
    assert req.outputs is not None
    assert [(o.name, o.binary) for o in req.outputs] == [("y", True), ("z", False)]
    body, json_len = encode_http_response(
        InferResponse("m", "1", {"y": x, "z": x[:2]}, {"y": True, "z": False}, "r1")
    )
    assert json_len is not None
    doc = json.loads(body[:json_len])
    assert doc["id"] == "r1"
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 16}
    assert doc["outputs"][1]["data"] == [0.0, 1.0]
    assert body[json_len:] == x.tobytes()


def test_binary_data_size_without_header_length() -> None:
    head = (
        b'{"inputs":[{"name":"a","datatype":"FP32","shape":[1],'
        b'"parameters":{"binary_data_size":4}}]}'
    )
    with pytest.raises(RequestError, match="Inference-Header-Content-Length"):
        decode_http_request("m", None, head, None)


def test_non_utf8_bytes_output_needs_binary() -> None:
    arr = np.array([b"\xff"], dtype=object)
    with pytest.raises(RequestError, match="binary_data"):
        encode_http_response(InferResponse("m", "1", {"s": arr}, {"s": False}))
    body, json_len = encode_http_response(InferResponse("m", "1", {"s": arr}, {"s": True}))
    assert json_len is not None
    assert body[json_len:] == struct.pack("<I", 1) + b"\xff"

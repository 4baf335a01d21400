"""The HTTP binding against unmodified ``tritonclient.http`` and raw requests."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from agent.api import ApiServer, start_api
from agent.config import ApiConfig
from agent.models.slots import SlotRegistry
from tests.agent.api.conftest import DIGITS_SERVING, ECHO_TYPES, echo_feeds


def _inputs(feeds: dict[str, np.ndarray[Any, Any]], binary: bool) -> list[httpclient.InferInput]:
    out = []
    for name, arr in feeds.items():
        datatype = "BYTES" if arr.dtype == object else httpclient.np_to_triton_dtype(arr.dtype)
        item = httpclient.InferInput(name, list(arr.shape), datatype)
        item.set_data_from_numpy(arr, binary_data=binary)
        out.append(item)
    return out


def _post(url: str, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"http://{url}{path}", content=body, headers=headers, timeout=10)


def _binary_request(name: str, arr: np.ndarray[Any, Any], datatype: str) -> tuple[bytes, int]:
    raw = arr.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": list(arr.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return head + raw, len(head)


def test_health_and_metadata(http_url: str, repository: SlotRegistry) -> None:
    client = httpclient.InferenceServerClient(http_url)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", DIGITS_SERVING)
    assert not client.is_model_ready("digits", "9.0.0")
    meta = client.get_server_metadata()
    assert meta["name"] == "edgefleet-agent"
    assert "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("digits")
    assert model["versions"] == [DIGITS_SERVING]  # loaded: the one serving
    assert model["parameters"]["version"] == DIGITS_SERVING
    assert model["parameters"]["variant"] == "onnxruntime-fp32"
    assert model["parameters"]["device"] == "CPUExecutionProvider"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert model["outputs"][0]["name"] == "logits"
    assert client.get_model_metadata("digits", DIGITS_SERVING)["name"] == "digits"
    client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_digits_match_in_process(
    http_url: str, digits_reference: Any, digits: Any, binary: bool
) -> None:
    client = httpclient.InferenceServerClient(http_url)
    x = digits.x_test[:5]
    result = client.infer(
        "digits",
        _inputs({"input": x}, binary),
        outputs=[httpclient.InferRequestedOutput("logits", binary_data=binary)],
    )
    want = digits_reference.run({"input": x})["logits"]
    np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
    assert result.get_response()["model_version"] == DIGITS_SERVING  # the active version
    assert result.get_response()["parameters"]["variant"] == "onnxruntime-fp32"
    accuracy = (result.as_numpy("logits").argmax(1) == digits.y_test[:5]).mean()
    assert accuracy >= 0.6
    client.close()


def test_specific_version_and_active_swap(http_url: str, repository: SlotRegistry) -> None:
    client = httpclient.InferenceServerClient(http_url)
    x = np.zeros((1, 1, 8, 8), np.float32)
    named = client.infer("digits", _inputs({"input": x}, True), model_version=DIGITS_SERVING)
    assert named.get_response()["model_version"] == DIGITS_SERVING
    with pytest.raises(InferenceServerException, match="not loaded"):  # installed, not loaded
        client.infer("digits", _inputs({"input": x}, True), model_version="1.0.0")
    slot = repository.slot("digits")
    slot.swap("1.0.0")
    try:
        # No version: the active one, looked up on every request.
        answer = client.infer("digits", _inputs({"input": x}, True)).get_response()
        assert answer["model_version"] == "1.0.0"
    finally:
        slot.swap(DIGITS_SERVING)
    answer = client.infer("digits", _inputs({"input": x}, True)).get_response()
    assert answer["model_version"] == DIGITS_SERVING
    client.close()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(http_url: str, binary: bool) -> None:
    client = httpclient.InferenceServerClient(http_url)
    feeds = echo_feeds(rows=3)
    outputs = [
        httpclient.InferRequestedOutput(f"out_{t.lower()}", binary_data=binary) for t in ECHO_TYPES
    ]
    result = client.infer("echo", _inputs(feeds, binary), outputs=outputs)
    for dt in ECHO_TYPES:
        sent = feeds[f"in_{dt.lower()}"]
        got = result.as_numpy(f"out_{dt.lower()}")
        if dt == "BYTES":
            got = np.array([x if isinstance(x, bytes) else x.encode() for x in got.ravel()])
            assert list(got) == list(sent.ravel())
        else:
            assert got.dtype == sent.dtype, dt
            np.testing.assert_array_equal(got, sent)
    client.close()


def test_binary_data_output_parameter_and_default_outputs(http_url: str) -> None:
    x = np.ones((2, 1, 8, 8), np.float32)
    body, head_len = _binary_request("input", x, "FP32")
    # No "outputs": every output, JSON by default.
    plain = _post(
        http_url,
        "/v2/models/digits/infer",
        body,
        **{"Inference-Header-Content-Length": str(head_len)},
    )
    assert plain.status_code == 200
    assert "inference-header-content-length" not in plain.headers
    assert len(plain.json()["outputs"][0]["data"]) == 20
    # binary_data_output: every output as binary data after the JSON header.
    head = json.loads(body[:head_len])
    head["parameters"] = {"binary_data_output": True}
    head_bytes = json.dumps(head).encode()
    resp = _post(
        http_url,
        "/v2/models/digits/infer",
        head_bytes + x.tobytes(),
        **{"Inference-Header-Content-Length": str(len(head_bytes))},
    )
    assert resp.status_code == 200
    n = int(resp.headers["inference-header-content-length"])
    meta = json.loads(resp.content[:n])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    logits = np.frombuffer(resp.content[n:], np.float32).reshape(2, 10)
    np.testing.assert_allclose(
        logits, np.array(plain.json()["outputs"][0]["data"]).reshape(2, 10), rtol=1e-6
    )


def test_gzip_request_body(http_url: str) -> None:
    import gzip

    client = httpclient.InferenceServerClient(http_url)
    x = np.ones((1, 1, 8, 8), np.float32)
    result = client.infer(
        "digits", _inputs({"input": x}, True), request_compression_algorithm="gzip"
    )
    assert result.as_numpy("logits").shape == (1, 10)
    client.close()
    bad = _post(
        http_url,
        "/v2/models/digits/infer",
        gzip.compress(b"x")[:-4],
        **{"Content-Encoding": "gzip"},
    )
    assert bad.status_code == 400


def _metric(url: str, name: str, model: str, version: str) -> float:
    text = httpx.get(f"http://{url}/metrics").text
    key = f'{name}{{model="{model}",version="{version}"}} '
    for line in text.splitlines():
        if line.startswith(key):
            return float(line[len(key) :])
    return 0.0


# --- bad input: each gets a clear 4xx, and the server keeps answering ----------------------

BAD_CASES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("unknown model", "/v2/models/nope/infer", b'{"inputs":[]}', {}, 404, "unknown model"),
    (
        "unknown version",
        "/v2/models/digits/versions/9/infer",
        b'{"inputs":[]}',
        {},
        404,
        "version 9 is not loaded",
    ),
    ("not json", "/v2/models/digits/infer", b"{nope", {}, 400, "malformed"),
    (
        "wrong tensor name",
        "/v2/models/digits/infer",
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,1,8,8],"data":'
        + json.dumps([0.0] * 64).encode()
        + b"}]}",
        {},
        400,
        "unknown input",
    ),
    (
        "wrong shape",
        "/v2/models/digits/infer",
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,4,16],"data":'
        + json.dumps([0.0] * 64).encode()
        + b"}]}",
        {},
        400,
        "shape",
    ),
    (
        "wrong datatype",
        "/v2/models/digits/infer",
        b'{"inputs":[{"name":"input","datatype":"INT32","shape":[1,1,8,8],"data":'
        + json.dumps([0] * 64).encode()
        + b"}]}",
        {},
        400,
        "dtype",
    ),
    (
        "unknown datatype",
        "/v2/models/digits/infer",
        b'{"inputs":[{"name":"input","datatype":"FP8","shape":[1],"data":[1]}]}',
        {},
        400,
        "unknown datatype",
    ),
    (
        "element count",
        "/v2/models/digits/infer",
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,8,8],"data":[1,2,3]}]}',
        {},
        400,
        "3 elements",
    ),
    (
        "batch over max",
        "/v2/models/ppocr-det/infer",
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[5,3,0,0],"data":[]}]}',
        {},
        400,
        "batch of 5",
    ),
    (
        "unknown output",
        "/v2/models/digits/infer",
        b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1,8,8],"data":'
        + json.dumps([0.0] * 64).encode()
        + b'}],"outputs":[{"name":"nope"}]}',
        {},
        400,
        "unknown output",
    ),
    (
        "header length not a number",
        "/v2/models/digits/infer",
        b"{}",
        {"Inference-Header-Content-Length": "abc"},
        400,
        "not an integer",
    ),
    (
        "header length past the body",
        "/v2/models/digits/infer",
        b"{}",
        {"Inference-Header-Content-Length": "99"},
        400,
        "does not fit",
    ),
    (
        "unsupported encoding",
        "/v2/models/digits/infer",
        b"{}",
        {"Content-Encoding": "br"},
        415,
        "not supported",
    ),
    ("no route", "/v3/whatever", b"", {}, 404, "no route"),
    ("GET on infer", "", b"", {}, 405, "POST"),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_bad_requests_get_clear_errors(
    http_url: str, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    before = _metric(http_url, "nv_inference_request_success", "digits", DIGITS_SERVING)
    if path:
        resp = _post(http_url, path, body, **headers)
    else:
        resp = httpx.get(f"http://{http_url}/v2/models/digits/infer")
    assert resp.status_code == status, resp.text
    assert message in resp.json()["error"]
    assert httpx.get(f"http://{http_url}/v2/health/ready").status_code == 200
    assert _metric(http_url, "nv_inference_request_success", "digits", DIGITS_SERVING) == before


@pytest.mark.parametrize(
    ("declared", "actual"), [(256, 255), (255, 256), (300, 256)], ids=["short", "long", "past"]
)
def test_binary_sizes_that_lie(http_url: str, declared: int, actual: int) -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1, 8, 8],
                    "parameters": {"binary_data_size": declared},
                }
            ]
        }
    ).encode()
    resp = _post(
        http_url,
        "/v2/models/digits/infer",
        head + b"\0" * actual,
        **{"Inference-Header-Content-Length": str(len(head))},
    )
    assert resp.status_code == 400
    assert "bytes" in resp.json()["error"] or "binary_data_size" in resp.json()["error"]


def test_bytes_binary_element_overrun(http_url: str) -> None:
    raw = struct.pack("<I", 50) + b"ab" + struct.pack("<I", 1) + b"c"
    feeds = echo_feeds(rows=1)
    inputs = []
    blobs = b""
    for name, arr in feeds.items():
        if name == "in_bytes":
            inputs.append(
                {
                    "name": name,
                    "datatype": "BYTES",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            blobs += raw
        else:
            dt = httpclient.np_to_triton_dtype(arr.dtype)
            inputs.append(
                {"name": name, "datatype": dt, "shape": [1, 2], "data": arr.ravel().tolist()}
            )
    head = json.dumps({"inputs": inputs}).encode()
    resp = _post(
        http_url,
        "/v2/models/echo/infer",
        head + blobs,
        **{"Inference-Header-Content-Length": str(len(head))},
    )
    assert resp.status_code == 400
    assert "overruns" in resp.json()["error"]


def test_oversized_body_is_refused(http_url: str, api: ApiServer) -> None:
    size = api.service.config.max_body_bytes + 1
    resp = _post(http_url, "/v2/models/digits/infer", b"\0" * size)
    assert resp.status_code == 413
    assert "limit" in resp.json()["error"]
    assert httpx.get(f"http://{http_url}/v2/health/live").status_code == 200


def test_client_disconnect_mid_body(http_url: str, api: ApiServer) -> None:
    host, port = http_url.split(":")
    before = _metric(http_url, "nv_inference_request_failure", "digits", DIGITS_SERVING)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"{" * 1000
            )
    client = httpclient.InferenceServerClient(http_url)
    x = np.ones((1, 1, 8, 8), np.float32)
    assert client.infer("digits", _inputs({"input": x}, True)).as_numpy("logits").shape == (1, 10)
    client.close()
    assert _metric(http_url, "nv_inference_request_failure", "digits", DIGITS_SERVING) == before
    assert sum(b.queued() for b in api.service._batchers.values()) == 0


def test_tritonclient_raises_server_errors(http_url: str) -> None:
    client = httpclient.InferenceServerClient(http_url)
    x = np.ones((1, 1, 8, 8), np.float32)
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", _inputs({"input": x}, True))
    with pytest.raises(InferenceServerException, match="dtype"):
        client.infer("digits", _inputs({"input": x.astype(np.float64)}, True))
    client.close()


def test_unix_socket(api: ApiServer) -> None:
    assert api.unix_socket is not None
    transport = httpx.HTTPTransport(uds=str(api.unix_socket))
    with httpx.Client(transport=transport, base_url="http://agent") as client:
        assert client.get("/v2/health/ready").status_code == 200
        x = np.ones((1, 1, 8, 8), np.float32)
        body, head_len = _binary_request("input", x, "FP32")
        resp = client.post(
            "/v2/models/digits/infer",
            content=body,
            headers={"Inference-Header-Content-Length": str(head_len)},
        )
        assert resp.status_code == 200
        assert resp.json()["outputs"][0]["shape"] == [1, 10]


def test_metrics_count_requests(http_url: str) -> None:
    client = httpclient.InferenceServerClient(http_url)
    names = [
        "nv_inference_request_success",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_compute_infer_duration_us",
    ]
    before = {n: _metric(http_url, n, "digits", DIGITS_SERVING) for n in names}
    fail_before = _metric(http_url, "nv_inference_request_failure", "digits", DIGITS_SERVING)
    x = np.ones((3, 1, 8, 8), np.float32)
    client.infer("digits", _inputs({"input": x}, True), model_version=DIGITS_SERVING)
    with pytest.raises(InferenceServerException):
        client.infer("digits", _inputs({"input": x[:, :, :4]}, True), model_version=DIGITS_SERVING)
    after = {n: _metric(http_url, n, "digits", DIGITS_SERVING) for n in names}
    assert after["nv_inference_request_success"] == before["nv_inference_request_success"] + 1
    assert after["nv_inference_count"] == before["nv_inference_count"] + 3
    assert after["nv_inference_exec_count"] == before["nv_inference_exec_count"] + 1
    assert after["nv_inference_request_duration_us"] > before["nv_inference_request_duration_us"]
    assert (
        _metric(http_url, "nv_inference_request_failure", "digits", DIGITS_SERVING)
        == fail_before + 1
    )
    text = httpx.get(f"http://{http_url}/metrics").text
    assert "# TYPE nv_inference_queue_duration_us counter" in text
    assert 'model="nope"' not in text  # unknown names never become label sets
    client.close()


def test_shared_registry_is_exposed(repository: SlotRegistry) -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    swaps = Counter("edgefleet_swaps", "Model swaps", ["model"], registry=registry)
    swaps.labels(model="digits").inc(2)
    with start_api(repository, ApiConfig(http_port=0, grpc_port=None), registry) as server:
        text = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics").text
    assert 'edgefleet_swaps_total{model="digits"} 2.0' in text
    assert "# TYPE nv_inference_count counter" in text


def test_token_auth(repository: SlotRegistry) -> None:
    config = ApiConfig(http_port=0, grpc_port=None, token="s3cret-token")
    with start_api(repository, config) as server:
        url = f"127.0.0.1:{server.http_port}"
        for path in ("/v2/health/live", "/v2", "/metrics", "/v2/models/digits"):
            resp = httpx.get(f"http://{url}{path}")
            assert resp.status_code == 401, path
            assert resp.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(f"http://{url}/v2", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        headers = {"Authorization": "Bearer s3cret-token"}
        client = httpclient.InferenceServerClient(url)
        assert client.is_server_live(headers=headers)
        x = np.ones((1, 1, 8, 8), np.float32)
        result = client.infer("digits", _inputs({"input": x}, True), headers=headers)
        assert result.as_numpy("logits").shape == (1, 10)
        with pytest.raises(InferenceServerException, match="bearer token"):
            client.infer("digits", _inputs({"input": x}, True))
        client.close()


def test_port_in_use_is_a_clear_error(repository: SlotRegistry, api: ApiServer) -> None:
    from agent.api import ApiStartError

    with pytest.raises(ApiStartError, match="cannot listen"):
        start_api(repository, ApiConfig(http_port=api.http_port or 0, grpc_port=None))
    assert httpx.get(f"http://127.0.0.1:{api.http_port}/v2/health/live").status_code == 200

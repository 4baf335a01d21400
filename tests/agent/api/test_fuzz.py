"""Fuzzing the HTTP endpoints: whatever the body and headers, never a 5xx, and the server lives.

Bounded to a few seconds by default; ``EDGEFLEET_SOAK=1`` runs many more examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import ApiServer

EXAMPLES = 2000 if os.environ.get("EDGEFLEET_SOAK") == "1" else 150
# Models whose every spec-valid input also runs (the detector's convolutions refuse tiny images,
# which is the model's answer, not the protocol's).
MODELS = ["digits", "echo", "nope", "digits/versions/1", "digits/versions/9"]
DATATYPES = ["FP32", "FP16", "INT64", "BYTES", "BOOL", "UINT8", "FP64", "fp32", "X"]
NAMES = ["input", "in_fp32", "in_bytes", "in_bool", "x", ""]

scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
)
data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6), max_leaves=40)
tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(NAMES),
        "datatype": st.sampled_from(DATATYPES),
        "shape": st.lists(st.integers(-2, 70), max_size=5),
    },
    optional={
        "data": data,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.one_of(st.integers(-5, 300), st.text(max_size=3))}
        ),
    },
)
header = st.fixed_dictionaries(
    {"inputs": st.lists(tensor, max_size=4)},
    optional={
        "id": st.text(max_size=8),
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_output": st.one_of(st.booleans(), st.integers())}
        ),
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["logits", "out_fp32", "out_bytes", "nope"])},
                optional={
                    "parameters": st.fixed_dictionaries(
                        {}, optional={"binary_data": st.one_of(st.booleans(), st.text(max_size=2))}
                    )
                },
            ),
            max_size=3,
        ),
    },
)


@st.composite
def infer_request(draw: Any) -> tuple[str, bytes, dict[str, str]]:
    model = draw(st.sampled_from(MODELS))
    if draw(st.booleans()):
        head = json.dumps(draw(header)).encode()
    else:
        head = draw(st.binary(max_size=200))
    tail = draw(st.binary(max_size=600))
    headers: dict[str, str] = {}
    choice = draw(st.integers(0, 3))
    if choice == 1:
        headers["Inference-Header-Content-Length"] = str(len(head))
    elif choice == 2:
        headers["Inference-Header-Content-Length"] = str(draw(st.integers(-10, 2000)))
    elif choice == 3:
        # Any visible ASCII: a header value with surrounding blanks never leaves the client.
        headers["Inference-Header-Content-Length"] = draw(
            st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=4)
        )
    if draw(st.integers(0, 9)) == 0:
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "identity"]))
    return f"/v2/models/{model}/infer", head + tail, headers


@pytest.fixture(scope="module")
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{api.http_port}", timeout=10) as client:
        yield client


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(infer_request())
def test_fuzz_infer(http: httpx.Client, case: tuple[str, bytes, dict[str, str]]) -> None:
    path, body, headers = case
    resp = http.post(path, content=body, headers=headers)
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code != 200:
        assert resp.headers.get("content-type", "").startswith("application/json"), (
            resp.status_code,
            resp.headers,
            resp.content[:200],
        )
        assert resp.json()["error"]


@settings(
    max_examples=EXAMPLES // 3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    st.lists(
        st.sampled_from(
            [
                "v2",
                "models",
                "digits",
                "versions",
                "1",
                "ready",
                "infer",
                "health",
                "live",
                "metrics",
                "..",
                "%00",
                "x" * 300,
            ]
        ),
        max_size=6,
    ),
)
def test_fuzz_routes(http: httpx.Client, method: str, parts: list[str]) -> None:
    resp = http.request(method, "/" + "/".join(parts))
    assert resp.status_code < 500, (resp.status_code, resp.text)


def test_server_still_answers_after_fuzzing(http: httpx.Client, api: ApiServer) -> None:
    assert http.get("/v2/health/ready").status_code == 200
    assert sum(b.queued() for b in api.service._batchers.values()) == 0

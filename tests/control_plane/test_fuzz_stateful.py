"""Schemathesis's state machine over the published OpenAPI spec: sequences of calls that follow
the spec's links (enroll -> the device's operations, create -> upload -> assign / roll out ->
pause, resume, abort, rollback), never a 5xx.

Random bodies rarely hold a valid bootstrap token or a loadable ONNX file, so most sequences
would stop at the first 401 or 422. ``before_call`` sends about two calls in three with a real
bootstrap token, a real (tiny) ONNX model uploaded to a model the sequence created, or waves a
rollout accepts, and device operations carry the credential their enrollment answered, so the
links reach the handlers behind them; the rest stay random. The server is uvicorn on loopback
and every sequence starts from an empty database. Bounded (``EDGEFLEET_SOAK=1`` runs more).
"""

from __future__ import annotations

import io
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, settings
from onnx import TensorProto, helper, numpy_helper
from sqlalchemy import create_engine

from control_plane.app import create_app
from control_plane.db.models import Base
from tests.control_plane.conftest import ADMIN, BOOTSTRAP_TOKEN, fp32_build, make_settings

STEPS = 40 if os.environ.get("EDGEFLEET_SOAK") == "1" else 10
EXAMPLES = 300 if os.environ.get("EDGEFLEET_SOAK") == "1" else 40


def _tiny_onnx() -> bytes:
    """A 4 -> 3 linear classifier: loads in ONNX Runtime, builds in milliseconds."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["scores"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _calibration() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, input=np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32))
    return buffer.getvalue()


_ONNX = _tiny_onnx()
_CALIBRATION = _calibration()
_UPLOAD = "/v1/models/{name}/versions"
_DEVICE_OPS = ("/desired-state", "/reported-state", "/credential")
_REACHED: Counter[str] = Counter()  # "METHOD path" -> 2xx answers


class _Hooks:
    """Mixed into the state machine schemathesis builds from the served spec."""

    database_url = ""
    base_url = ""

    def setup(self) -> None:
        # Every sequence starts from an empty fleet: which links can be followed depends on what
        # the server answers, and Hypothesis needs the same choices to meet the same answers.
        engine = create_engine(self.database_url)
        with engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
        engine.dispose()
        self.rng = random.Random(0)
        self.credentials: dict[str, str] = {}
        self.versions = 0
        self.models: list[str] = []
        self.uploaded: list[tuple[str, str]] = []

    def before_call(self, case: Any) -> None:
        path = case.operation.path
        real = self.rng.random() < 0.67
        if path == "/v1/devices/enroll" and real and isinstance(case.body, dict):
            case.body["bootstrap_token"] = BOOTSTRAP_TOKEN
        elif path == _UPLOAD and real:
            self.versions += 1
            case.body = {
                "version": f"1.0.{self.versions}",
                "onnx": _ONNX,
                "calibration": _CALIBRATION,
            }
            if not self.models:  # as a client would: the model first, then its versions
                name = f"m{self.rng.randrange(10**6)}"
                created = httpx.post(
                    f"{self.base_url}/v1/models", json={"name": name}, headers=ADMIN, timeout=10
                )
                assert created.status_code == 201, created.text
                self.models.append(name)
            case.path_parameters["name"] = self.rng.choice(self.models)
        elif (
            path == "/v1/rollouts"
            and case.method == "POST"
            and real
            and isinstance(case.body, dict)
        ):
            case.body["waves"] = [{"percent": 50, "soak_s": 0}, {"count": 1000}]
            case.body.pop("selector", None)
            if self.uploaded:  # a version this sequence uploaded, whatever the link chose
                case.body["model"], case.body["version"] = self.rng.choice(self.uploaded)

    def get_call_kwargs(self, case: Any) -> dict[str, Any]:
        headers = dict(ADMIN)
        device_id = (case.path_parameters or {}).get("device_id")
        if device_id in self.credentials and case.operation.path.endswith(_DEVICE_OPS):
            headers["Authorization"] = f"Bearer {self.credentials[device_id]}"
        return {"headers": headers}

    def after_call(self, response: Any, case: Any) -> None:
        if 200 <= response.status_code < 300:
            _REACHED[f"{case.method.upper()} {case.operation.path}"] += 1
        if case.operation.path == "/v1/devices/enroll" and response.status_code == 201:
            body = response.json()
            self.credentials[body["device_id"]] = body["credential"]
        elif case.operation.path == "/v1/models" and response.status_code == 201:
            self.models.append(response.json()["name"])
        elif case.operation.path == _UPLOAD and response.status_code == 202:
            self._wait_built(response.json())
            self.uploaded.append((response.json()["model"], response.json()["version"]))

    def _wait_built(self, version: dict[str, Any]) -> None:
        """As a client would before rolling out: the build is background work (bounded wait)."""
        url = f"{self.base_url}/v1/models/{version['model']}/versions/{version['version']}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if httpx.get(url, headers=ADMIN, timeout=10).json()["status"] != "building":
                return
            time.sleep(0.02)
        raise AssertionError(f"the build of {version['model']} {version['version']} hangs")

    def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
        assert response.status_code < 500, (
            case.method,
            case.formatted_path,
            response.status_code,
            response.text[:500],
        )


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(
        make_settings(tmp_path / "data", f"sqlite:///{tmp_path / 'cp.db'}"),
        build_variants=fp32_build,
    )


def test_links_are_in_the_published_spec(client: httpx.Client) -> None:
    """The chains the state machine follows are the spec's own links, not inferred guesses."""
    spec = client.get("/openapi.json").json()
    enroll = spec["paths"]["/v1/devices/enroll"]["post"]["responses"]["201"]["links"]
    assert "GET /v1/devices/{device_id}/desired-state" in enroll
    upload = spec["paths"][_UPLOAD]["post"]["responses"]["202"]["links"]
    assert upload["POST /v1/rollouts"]["requestBody"]["version"] == "$response.body#/version"
    created = spec["paths"]["/v1/rollouts"]["post"]["responses"]["201"]["links"]
    assert created["POST /v1/rollouts/{rollout_id}/abort"]["parameters"] == {
        "rollout_id": "$response.body#/id"
    }


def test_call_sequences_never_answer_5xx(live_server: str, tmp_path: Path) -> None:
    """Against the app served by uvicorn on loopback: real sockets, real lifespan."""
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    database_url = f"sqlite:///{tmp_path / 'cp.db'}"
    machine = type(
        "ControlPlaneMachine",
        (_Hooks, schema.as_state_machine()),
        {"database_url": database_url, "base_url": live_server},
    )
    machine.run(
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,  # the server's state is not replayable: no example reuse, no shrinking
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
    # the sequences went deep: enrollments, uploads and the operations linked from them answered
    reached = {key for key, count in _REACHED.items() if count}
    assert {"POST /v1/devices/enroll", "POST /v1/models/{name}/versions"} <= reached, _REACHED

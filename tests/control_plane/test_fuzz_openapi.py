"""Schemathesis fuzzes every operation of the published OpenAPI spec in-process: no 5xx.

Bounded (a few examples per operation) so it stays a short test. The app gets a fresh data
directory and SQLite database, made when this module loads (schemathesis reads the spec at
collection) and removed at the end. Requests carry the admin token so they get past auth and
reach validation and the handlers.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python import asgi

from control_plane.app import create_app
from tests.control_plane.conftest import ADMIN, fp32_build, make_settings

_DATA = Path(tempfile.mkdtemp(prefix="edgefleet-fuzz-"))
_APP = create_app(make_settings(_DATA, f"sqlite:///{_DATA / 'cp.db'}"), build_variants=fp32_build)
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    asgi.shutdown_lifespans()
    shutil.rmtree(_DATA, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any) -> None:
    response = case.call(headers=ADMIN)
    assert response.status_code < 500, (case.method, case.path, response.text[:500])

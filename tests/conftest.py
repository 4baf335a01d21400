"""Shared fixtures: real sample models, the real broker and database on loopback.

Services are not mocked and not silently skipped: when Mosquitto or PostgreSQL is down the
tests that need them fail with the command that starts them (``make test`` starts both).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from agent.samples import DigitsData, digits_cnn, digits_data, ppocr_detector

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
PG_DSN = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
SOAK = os.environ.get("EDGEFLEET_SOAK") == "1"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """A CLI test configures structlog for the process (level, renderer); undo it so the next
    test sees the defaults, whatever order the tests run in."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def samples_dir(pytestconfig: pytest.Config) -> Path:
    path = Path(pytestconfig.cache.mkdir("edgefleet-samples"))  # type: ignore[union-attr]
    os.environ["EDGEFLEET_CACHE"] = str(path.parent)
    return path


@pytest.fixture(scope="session")
def ppocr_path(samples_dir: Path) -> Path:
    """The real PP-OCR text detector (input ``x``: Nx3xHxW float32)."""
    return ppocr_detector(samples_dir)


@pytest.fixture(scope="session")
def digits_path(samples_dir: Path) -> Path:
    """A small CNN trained at fixture time on scikit-learn's digits (``input`` Nx1x8x8)."""
    return digits_cnn(samples_dir)


@pytest.fixture(scope="session")
def digits() -> DigitsData:
    return digits_data()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def mqtt_broker() -> tuple[str, int]:
    """The real Mosquitto on 127.0.0.1:1883."""
    if not _port_open(MQTT_HOST, MQTT_PORT):
        pytest.fail("Mosquitto is not running on 127.0.0.1:1883 (start it: make services)")
    return MQTT_HOST, MQTT_PORT


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A fresh database on the real PostgreSQL, dropped at the end of the session."""
    if not _port_open("127.0.0.1", 5432):
        pytest.fail("PostgreSQL is not running on 127.0.0.1:5432 (start it: make services)")
    import psycopg

    name = f"edgefleet_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--alone",
        choices=("include", "skip", "only"),
        default="include",
        help="tests marked `alone` (they judge that no frame is dropped, so they want the "
        "machine to themselves): run them with the rest (include), leave them out (skip), or "
        "run only them (only); `make pytest` runs the rest in parallel workers, then these",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    alone = config.getoption("--alone")
    if alone != "include":
        keep = alone == "only"
        chosen: list[Any] = []
        left: list[Any] = []
        for item in items:
            marked = item.get_closest_marker("alone") is not None
            (chosen if marked == keep else left).append(item)
        if left:
            config.hook.pytest_deselected(items=left)
            items[:] = chosen
    skip_gpu = pytest.mark.skip(
        reason="needs an NVIDIA GPU: run `pytest -m gpu` on the GPU machine (docs/gpu.md)"
    )
    has_gpu = _has_cuda_provider()
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_gpu:
            item.add_marker(skip_gpu)


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()

"""Control-plane fixtures: settings on SQLite and PostgreSQL, a real app instance, sample sets.

Every app test runs twice, once per database (``db_url`` is parametrized), against the app
served by uvicorn on a free loopback port. The builds are the
real builds library; tests of the job machinery and the API restrict it to the FP32 target so a
build takes a tenth of a second (the full build has its own test).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
import uvicorn
from fastapi import FastAPI

from agent.contracts.profile import CpuInfo, HardwareProfile, RuntimeInfo
from agent.samples import DigitsData
from control_plane.app import create_app
from control_plane.builds import build_variants
from control_plane.settings import Settings

ADMIN_TOKEN = "admin-token-for-tests-0123456789"
BOOTSTRAP_TOKEN = "bootstrap-token-for-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

fp32_build = functools.partial(build_variants, targets=("onnx-fp32",))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cp.db'}"
    dsn: str = request.getfixturevalue("postgres_dsn")
    with psycopg.connect(dsn, autocommit=True) as conn:  # a clean schema for every test
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return dsn


def make_settings(data_dir: Path, db_url: str, **overrides: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=db_url,
        bootstrap_token=BOOTSTRAP_TOKEN,
        admin_token=ADMIN_TOKEN,
        **overrides,
    )


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path / "data", db_url)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings, build_variants=fp32_build)


@pytest.fixture
def client(live_server: str) -> Iterator[httpx.Client]:
    """An HTTP client of the real app served by uvicorn on loopback."""
    with httpx.Client(base_url=live_server, timeout=60) as c:
        yield c


@dataclass(frozen=True)
class SampleFiles:
    calibration: Path
    validation: Path
    golden: Path


@pytest.fixture(scope="session")
def digits_sets(tmp_path_factory: pytest.TempPathFactory, digits: DigitsData) -> SampleFiles:
    root = tmp_path_factory.mktemp("digits-sets")
    files = SampleFiles(root / "cal.npz", root / "val.npz", root / "golden.npz")
    np.savez(files.calibration, input=digits.x_train[:64])
    np.savez(files.validation, input=digits.x_test, labels=digits.y_test)
    np.savez(files.golden, input=digits.x_test[:4])
    return files


def upload_files(onnx: Path, sets: SampleFiles, *, validation: bool = False) -> dict[str, Any]:
    files: dict[str, Any] = {
        "onnx": ("model.onnx", onnx.read_bytes(), "application/octet-stream"),
        "calibration": ("cal.npz", sets.calibration.read_bytes(), "application/octet-stream"),
    }
    if validation:
        files["validation"] = ("val.npz", sets.validation.read_bytes(), "application/octet-stream")
    return files


def wait_job(client: httpx.Client, job_id: int, *, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=ADMIN).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not finish: {job}")
        time.sleep(0.05)


def push_version(
    client: httpx.Client,
    onnx: Path,
    sets: SampleFiles,
    *,
    name: str = "digits",
    version: str = "1.0.0",
    create: bool = True,
) -> dict[str, Any]:
    """Create the model (optionally), upload a version, wait for its build; the version."""
    if create:
        r = client.post("/v1/models", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
    r = client.post(
        f"/v1/models/{name}/versions",
        data={"version": version},
        files=upload_files(onnx, sets),
        headers=ADMIN,
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    out: dict[str, Any] = client.get(f"/v1/models/{name}/versions/{version}", headers=ADMIN).json()
    return out


def x86_profile(
    *, flags: tuple[str, ...] = ("avx2", "avx512_vnni"), openvino: bool = True
) -> HardwareProfile:
    runtimes = [RuntimeInfo(name="onnxruntime", version="1.20.1")]
    if openvino:
        runtimes.append(RuntimeInfo(name="openvino", version="2026.4.0", devices=("CPU",)))
    return HardwareProfile(
        arch="x86_64",
        os="linux",
        python="3.11",
        cpu=CpuInfo(cores=2, flags=flags),
        memory_bytes=8 * 1024**3,
        runtimes=tuple(runtimes),
    )


def enroll(
    client: httpx.Client,
    name: str = "robot-1",
    *,
    labels: dict[str, str] | None = None,
    profile: HardwareProfile | None = None,
) -> tuple[str, dict[str, str]]:
    """Enroll a device; its id and its Authorization header. The labels it asks for are
    approved by the admin at once, so they select assignments."""
    body = {
        "bootstrap_token": BOOTSTRAP_TOKEN,
        "name": name,
        "profile": (profile or x86_profile()).model_dump(mode="json"),
        "labels": labels or {},
    }
    r = client.post("/v1/devices/enroll", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    if labels:
        approved = client.post(
            f"/v1/devices/{out['device_id']}/labels/approve", json={}, headers=ADMIN
        )
        assert approved.status_code == 200, approved.text
        assert approved.json()["labels"] == labels
    return out["device_id"], {"Authorization": f"Bearer {out['credential']}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def serve_app(app: FastAPI) -> Iterator[str]:
    """``app`` under uvicorn on a free loopback port, in a thread; its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def live_server(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on a free loopback port, in a thread; its base URL."""
    with serve_app(app) as url:
        yield url


class _Forms(HTMLParser):
    """Every ``<form>`` of a page: its action and the named inputs it carries."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((found.get("action", ""), {}))
        elif tag == "input" and self.forms and "name" in found:
            self.forms[-1][1][found["name"]] = found.get("value", "")


def page_forms(page: str) -> list[tuple[str, dict[str, str]]]:
    parser = _Forms()
    parser.feed(page)
    return parser.forms


def form_fields(page: str, action: str) -> dict[str, str]:
    """The hidden fields of the page's form posting to ``action`` (its anti-forgery token)."""
    for form_action, fields in page_forms(page):
        if form_action == action:
            return {k: v for k, v in fields.items() if k not in ("token",)}
    raise AssertionError(f"no form posts to {action}")

"""Operator lifecycle through the real control plane, on SQLite and PostgreSQL, with `edgectl`.

Polls refresh ``last_seen_at`` (the 304 fast path too, with coalesced writes); the desired
state's per-entry generation grows with assignments, rollouts and ``devices retry``; rollouts
that could never finish are refused; a deleted device's credential stops at once; a failed
build is deleted; build jobs, their logs and skipped variants are listed.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI

from agent.contracts.state import DesiredModel, DesiredState, ReportedModel, ReportedState
from control_plane.app import create_app
from control_plane.builds import build_variants
from control_plane.cli import main
from control_plane.context import AppContext
from control_plane.settings import Settings
from control_plane.signing.publisher import publish_registry
from tests.control_plane.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    SampleFiles,
    enroll,
    make_settings,
    push_version,
    wait_job,
)

LAST_SEEN_WRITE_S = 0.3


@pytest.fixture
def build_targets() -> tuple[str, ...]:
    return ("onnx-fp32",)


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(
        tmp_path / "data", db_url, last_seen_write_s=LAST_SEEN_WRITE_S, rollout_interval_s=0.1
    )


@pytest.fixture
def app(settings: Settings, build_targets: tuple[str, ...]) -> FastAPI:
    return create_app(
        settings, build_variants=functools.partial(build_variants, targets=build_targets)
    )


@pytest.fixture
def edgectl(
    live_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Any]:
    """``edgectl ARGS`` as an operator would type it: (exit status, stdout, stderr).

    The service runs in this process: its log events are captured by structlog instead of
    printed, so stdout and stderr hold only what ``edgectl`` wrote."""
    monkeypatch.setenv("EDGEFLEET_URL", live_server)
    monkeypatch.setenv("EDGEFLEET_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("EDGECTL_CONFIG", str(tmp_path / "edgectl.json"))
    monkeypatch.setenv("COLUMNS", "250")

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    with structlog.testing.capture_logs():
        capsys.readouterr()  # what the service printed while starting
        yield run


def ctx_of(app: FastAPI) -> AppContext:
    ctx: AppContext = app.state.ctx
    return ctx


def device_row(client: httpx.Client, device_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/devices/{device_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def seen_at(client: httpx.Client, device_id: str) -> datetime:
    return datetime.fromisoformat(device_row(client, device_id)["last_seen_at"])


def wait_until(predicate: Any, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def upload(
    client: httpx.Client, onnx: Path, files: dict[str, Path], *, version: str
) -> dict[str, Any]:
    parts: dict[str, Any] = {"onnx": ("model.onnx", onnx.read_bytes(), "application/octet-stream")}
    for field, path in files.items():
        parts[field] = (path.name, path.read_bytes(), "application/octet-stream")
    r = client.post(
        "/v1/models/digits/versions", data={"version": version}, files=parts, headers=ADMIN
    )
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["job"]["id"])


def cli_rows(out: str) -> list[list[str]]:
    """The body rows of the rich tables ``edgectl`` printed, as lists of cell texts."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in out.splitlines()
        if line.startswith("│")
    ]


class _Rows(HTMLParser):
    """Every table row of a page as the list of its cells' text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.rows:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_rows(page: str) -> list[list[str]]:
    parser = _Rows()
    parser.feed(page)
    return parser.rows


# -- last_seen -------------------------------------------------------------------------------


def test_every_poll_refreshes_last_seen_with_coalesced_writes(
    client: httpx.Client, app: FastAPI
) -> None:
    ctx = ctx_of(app)
    assert ctx.presence is not None
    device_id, auth = enroll(client, "idle-robot")
    enrolled = seen_at(client, device_id)
    first = client.get(f"/v1/devices/{device_id}/desired-state", headers=auth)
    assert first.status_code == 200
    etag = first.headers["etag"]
    written_before = ctx.presence.rows_written
    flushes_before = ctx.presence.flushes
    polls = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        r = client.get(
            f"/v1/devices/{device_id}/desired-state", headers={**auth, "If-None-Match": etag}
        )
        assert r.status_code == 304
        polls += 1
        time.sleep(0.02)
    hits = ctx.metrics.desired_polls.labels("not_modified", "hit")._value.get()
    assert hits >= polls - 1  # the fast path answered them, in front of the framework
    wait_until(
        lambda: (seen_at(client, device_id) - enrolled).total_seconds() >= 1.2,
        timeout=5,
        what="last_seen_at to follow the polls",
    )
    # One device: at most one row written per flush, however many polls came in.
    written = ctx.presence.rows_written - written_before
    flushes = ctx.presence.flushes - flushes_before
    assert polls > 20
    assert 1 <= written == flushes <= 1.5 / LAST_SEEN_WRITE_S + 3
    # An operator reading the desired state is not the device polling.
    ctx.presence.flush()
    before = seen_at(client, device_id)
    time.sleep(LAST_SEEN_WRITE_S * 2)
    assert client.get(f"/v1/devices/{device_id}/desired-state", headers=ADMIN).status_code == 200
    ctx.presence.flush()
    assert seen_at(client, device_id) == before


# -- generation, retry, rollouts ---------------------------------------------------------------


def test_desired_state_generation_grows_with_assignments_retries_and_rollouts(
    client: httpx.Client,
    app: FastAPI,
    edgectl: Any,
    digits_path: Path,
    digits_sets: SampleFiles,
) -> None:
    push_version(client, digits_path, digits_sets, version="1.0.0")
    device_id, auth = enroll(client, "robot-g", labels={"site": "lab"})
    assert edgectl("deploy", "digits", "1.0.0", "--to", f"device={device_id}")[0] == 0

    def desired(etag: str | None = None) -> httpx.Response:
        headers = {**auth, "If-None-Match": etag} if etag else auth
        return client.get(f"/v1/devices/{device_id}/desired-state", headers=headers)

    first = desired()
    state = DesiredState.model_validate_json(first.content)
    (entry,) = state.models
    assert (entry.version, entry.rollout_id) == ("1.0.0", None)
    assert entry.generation == state.generation > 0
    assert desired(first.headers["etag"]).status_code == 304  # unchanged: no retry offered

    code, out, err = edgectl("devices", "retry", device_id, "digits")
    assert code == 0, err
    assert out.strip() == (
        f"{device_id}: digits 1.0.0 (generation {entry.generation + 1}) offered again"
    )
    again = desired(first.headers["etag"])
    assert again.status_code == 200  # the device sees a new ETag at its next poll
    (retried,) = DesiredState.model_validate_json(again.content).models
    assert retried.model_dump(exclude={"generation"}) == entry.model_dump(exclude={"generation"})
    assert retried.generation == entry.generation + 1

    code, _, err = edgectl("devices", "retry", device_id, "other-model")
    assert code == 1
    assert err.strip() == (
        f"ConflictError: device {device_id!r} is offered no version of model 'other-model'"
    )
    assert edgectl("devices", "retry", device_id)[0] == 0  # every model it is offered
    code, out, _ = edgectl("devices", "show", device_id)
    assert code == 0
    row = ["digits", "1.0.0", "onnx-fp32", str(entry.generation + 2), "-", "-", "-", "-"]
    assert row in cli_rows(out), out

    # A new rollout re-offers on purpose too: its entry names the rollout, generation grows.
    push_version(client, digits_path, digits_sets, version="1.1.0", create=False)
    body = {
        "id": "digits-next",
        "model": "digits",
        "version": "1.1.0",
        "selector": {"site": "lab"},
        "waves": [{"percent": 100, "soak_s": 0}],
    }
    r = client.post("/v1/rollouts", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text

    def offered() -> DesiredModel | None:
        models = DesiredState.model_validate_json(desired().content).models
        return next((m for m in models if m.version == "1.1.0"), None)

    wait_until(lambda: offered() is not None, what="the rollout's assignment")
    rolled = offered()
    assert rolled is not None
    assert rolled.rollout_id == "digits-next"
    assert rolled.generation > entry.generation + 2

    # An older agent's view of the same payload: the field has a default.
    legacy = entry.model_dump(mode="json", exclude={"generation"})
    assert DesiredModel.model_validate(legacy).generation == 0


def test_rollouts_that_could_never_finish_are_refused(
    client: httpx.Client,
    app: FastAPI,
    edgectl: Any,
    digits_path: Path,
    digits_sets: SampleFiles,
) -> None:
    version = push_version(client, digits_path, digits_sets, version="1.0.0")
    tuf = ctx_of(app).tuf
    assert tuf is not None
    paths = [v["artifact_path"] for v in version["variants"] if v["artifact_path"]]
    # Ready means signed: the build's own transaction published the targets.
    assert version["status"] == "ready"
    assert set(paths) <= set(tuf.targets())
    enroll(client, "robot-r", labels={"site": "lab"})

    code, _, err = edgectl(
        "rollout", "create", "digits", "1.0.0", "--to", "site=nowhere", "--waves", "100%"
    )
    assert code == 1
    assert err.strip() == "InvalidInputError: selector: site=nowhere matches no enrolled device"
    r = client.post(
        "/v1/rollouts",
        json={
            "model": "digits",
            "version": "1.0.0",
            "selector": {"site": "nowhere"},
            "waves": [{"percent": 100}],
        },
        headers=ADMIN,
    )
    assert (r.status_code, r.json()["error"]) == (422, "InvalidInputError")

    tuf.remove_targets(paths)
    code, _, err = edgectl("rollout", "create", "digits", "1.0.0", "--to", "site=lab")
    assert code == 1
    assert err.startswith("ConflictError: digits 1.0.0: 1 archive(s) are not signed TUF targets")
    assert client.get("/v1/rollouts", headers=ADMIN).json() == []  # nothing half-created

    assert publish_registry(ctx_of(app).sessions, tuf) == paths
    code, _out, err = edgectl(
        "rollout",
        "create",
        "digits",
        "1.0.0",
        "--to",
        "site=lab",
        "--id",
        "digits-ok",
        "--report-timeout",
        "2m",
        "--silent",
        "skipped",
        "--min-p99-increase-ms",
        "0.5",
    )
    assert code == 0, err
    rules = client.get("/v1/rollouts/digits-ok", headers=ADMIN).json()["rules"]
    assert (rules["report_timeout_s"], rules["silent_devices"], rules["min_p99_increase_ms"]) == (
        120.0,
        "skipped",
        0.5,
    )


# -- deleting a device -------------------------------------------------------------------------


def test_deleted_device_credential_stops_at_once(
    client: httpx.Client, edgectl: Any, digits_path: Path, digits_sets: SampleFiles
) -> None:
    push_version(client, digits_path, digits_sets)
    device_id, auth = enroll(client, "robot-old")
    keep_id, keep_auth = enroll(client, "robot-keep")
    assert edgectl("deploy", "digits", "1.0.0", "--to", f"device={device_id}")[0] == 0
    path = f"/v1/devices/{device_id}/desired-state"
    etag = client.get(path, headers=auth).headers["etag"]
    assert client.get(path, headers={**auth, "If-None-Match": etag}).status_code == 304  # cached

    code, out, err = edgectl("devices", "rm", device_id)
    assert (code, out.strip()) == (0, f"deleted device {device_id}"), err

    r = client.get(path, headers={**auth, "If-None-Match": etag})  # the fast path's caches too
    assert (r.status_code, r.json()["error"]) == (401, "AuthError")
    report = {
        "device_id": device_id,
        "agent_version": "0.1.0",
        "updated_at": datetime.now(timezone.utc).isoformat(),
    }
    r = client.put(f"/v1/devices/{device_id}/reported-state", json=report, headers=auth)
    assert r.status_code == 401
    assert client.get(f"/v1/devices/{device_id}", headers=ADMIN).status_code == 404
    assert all(
        a["device_id"] != device_id for a in client.get("/v1/assignments", headers=ADMIN).json()
    )
    code, out, _ = edgectl("devices", "ls")
    assert device_id not in out
    assert keep_id in out
    keep = client.get(f"/v1/devices/{keep_id}/desired-state", headers=keep_auth)
    assert keep.status_code == 200  # the others are untouched
    code, _, err = edgectl("devices", "rm", device_id)
    assert (code, err.strip()) == (1, f"NotFoundError: no device {device_id!r}")


# -- failed builds, jobs, skipped variants -------------------------------------------------------


@pytest.mark.parametrize("build_targets", [("onnx-int8",)])
def test_failed_build_is_listed_with_its_log_and_deleted(
    client: httpx.Client, edgectl: Any, digits_path: Path, digits_sets: SampleFiles
) -> None:
    assert client.post("/v1/models", json={"name": "digits"}, headers=ADMIN).status_code == 201
    failed = upload(client, digits_path, {"golden": digits_sets.golden}, version="1.0.0")
    assert failed["status"] == "failed"
    assert failed["skipped"] == [{"id": "onnx-int8", "reason": "needs a calibration set"}]

    code, out, err = edgectl("jobs", "ls", "--json")
    assert code == 0, err
    (listed,) = json.loads(out)
    assert (listed["id"], listed["status"], listed["version"]) == (failed["id"], "failed", "1.0.0")
    code, out, _ = edgectl("jobs", "show", str(failed["id"]), "--json")
    assert json.loads(out)["log"] == failed["log"]
    code, out, _ = edgectl("jobs", "show", str(failed["id"]))
    assert code == 0
    lines = [line.rstrip() for line in out.splitlines()]
    assert lines[0].startswith(f"job {failed['id']}  digits 1.0.0  failed")
    assert "onnx-int8 skipped: onnx-int8: needs a calibration set" in lines
    code, out, _ = edgectl("jobs", "ls", "--status", "succeeded", "--json")
    assert json.loads(out) == []

    code, out, err = edgectl("models", "rm", "digits", "1.0.0")
    assert (code, out.strip()) == (0, "deleted digits 1.0.0"), err
    assert client.get("/v1/models/digits/versions/1.0.0", headers=ADMIN).status_code == 404
    assert json.loads(edgectl("jobs", "ls", "--json")[1]) == []  # its jobs went with it

    # The number is free again; a good upload builds, and a ready version cannot be deleted.
    ok = upload(client, digits_path, {"calibration": digits_sets.calibration}, version="1.0.0")
    assert ok["status"] == "succeeded", ok
    code, _, err = edgectl("models", "rm", "digits", "1.0.0")
    assert (code, err.strip()) == (
        1,
        "ConflictError: digits 1.0.0 is ready: only a version whose build failed can be deleted",
    )
    code, _, err = edgectl("models", "rm", "digits", "9.9.9")
    assert (code, err.strip()) == (1, "NotFoundError: no version '9.9.9' of model 'digits'")


@pytest.mark.parametrize("build_targets", [("onnx-fp32", "onnx-int8")])
def test_skipped_variants_are_shown_with_their_reason(
    client: httpx.Client, edgectl: Any, digits_path: Path, digits_sets: SampleFiles
) -> None:
    assert client.post("/v1/models", json={"name": "digits"}, headers=ADMIN).status_code == 201
    job = upload(client, digits_path, {"golden": digits_sets.golden}, version="1.0.0")
    assert job["status"] == "succeeded", job
    version = client.get("/v1/models/digits/versions/1.0.0", headers=ADMIN).json()
    assert [v["id"] for v in version["variants"]] == ["onnx-fp32"]
    assert version["skipped"] == [{"id": "onnx-int8", "reason": "needs a calibration set"}]

    code, out, err = edgectl("models", "show", "digits", "1.0.0")
    assert code == 0, err
    assert ["onnx-int8", "needs a calibration set"] in cli_rows(out), out
    code, out, _ = edgectl("jobs", "ls")
    assert code == 0
    row = next(r for r in cli_rows(out) if r[0] == str(job["id"]))
    assert row[:4] == [str(job["id"]), "digits", "1.0.0", "succeeded"]
    assert row[6] == "onnx-int8"

    page = client.get("/ui/models", headers=ADMIN).text
    rows = table_rows(page)
    skipped = ["onnx-int8", "-", "-", "skipped", "needs a calibration set"]
    assert any(r[i : i + 5] == skipped for r in rows for i in range(len(r))), rows


def test_edgectl_starts_a_rollout_with_a_shadow_stage_and_its_devices_are_told(
    client: httpx.Client, edgectl: Any, digits_path: Path, digits_sets: SampleFiles
) -> None:
    """``edgectl rollout create --shadow``: the devices of the stage get a ``shadow`` entry
    beside the version they serve (none serves the new one), ``status --json`` carries the
    stage, and an abort takes the shadow back."""
    push_version(client, digits_path, digits_sets, version="1.0.0")
    push_version(client, digits_path, digits_sets, version="1.1.0", create=False)
    device_id, auth = enroll(client, "robot-shadow", labels={"site": "lab"})
    assert edgectl("deploy", "digits", "1.0.0", "--to", f"device={device_id}")[0] == 0

    def entry() -> DesiredModel:
        state = client.get(f"/v1/devices/{device_id}/desired-state", headers=auth)
        (model,) = DesiredState.model_validate_json(state.content).models
        return model

    # The device says it serves 1.0.0: only a device that serves the model can shadow it.
    report = ReportedState(
        device_id=device_id,
        agent_version="test",
        models=(ReportedModel(name="digits", active_version="1.0.0", phase="committed"),),
        updated_at=datetime.now(timezone.utc),
    )
    r = client.put(
        f"/v1/devices/{device_id}/reported-state",
        json=report.model_dump(mode="json"),
        headers=auth,
    )
    assert r.status_code == 200, r.text
    code, _, err = edgectl("rollout", "create", "digits", "1.1.0", "--shadow", "2x")
    assert code == 1
    assert "--shadow: '2x' is neither N%, a device count nor 'wave'" in err
    code, out, err = edgectl(
        "rollout", "create", "digits", "1.1.0", "--to", "site=lab", "--id", "dark",
        "--waves", "100%", "--shadow", "100%", "--shadow-soak", "10m",
        "--shadow-sample", "0.2", "--shadow-min-samples", "5",
    )  # fmt: skip
    assert code == 0, err
    assert "shadow stage first" in out
    wait_until(lambda: entry().shadow is not None, what="the shadow entry")
    served = entry()
    assert served.version == "1.0.0"  # the device keeps serving what it had
    assert served.shadow is not None
    assert (served.shadow.version, served.shadow.sample_share) == ("1.1.0", 0.2)
    assert served.shadow.rollout_id == "dark"
    code, out, _ = edgectl("rollout", "status", "dark", "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["shadow"]["state"] == "running"
    assert shown["shadow"]["stage"]["min_samples"] == 5
    assert [d["device_id"] for d in shown["shadow"]["devices"]] == [device_id]
    assert shown["assigned"] == 0
    code, out, _ = edgectl("rollout", "status", "dark")
    assert "shadow running" in out
    assert edgectl("rollout", "abort", "dark", "--reason", "not now")[0] == 0
    wait_until(lambda: entry().shadow is None, what="the shadow taken back")
    assert entry().version == "1.0.0"

"""Identity and trust on the real service: bootstrap tokens with bounds, labels a device cannot
choose for itself, operator tokens that expire, device credentials revoked and rotated, and web
forms that refuse cross-site posts. The service's clock is injected, so expiry needs no waiting.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import delete

from control_plane.api.routes.web import CSRF_COOKIE, CSRF_FIELD
from control_plane.api.routes.web import router as web_router
from control_plane.app import create_app
from control_plane.cli import main
from control_plane.db.models import BootstrapToken
from control_plane.settings import Settings
from tests.control_plane.conftest import (
    ADMIN,
    ADMIN_TOKEN,
    BOOTSTRAP_TOKEN,
    SampleFiles,
    form_fields,
    fp32_build,
    make_settings,
    page_forms,
    push_version,
    x86_profile,
)


class Clock:
    """The service's ``now``: real time plus what the test added."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings(tmp_path: Path, db_url: str, request: pytest.FixtureRequest) -> Settings:
    overrides: dict[str, Any] = getattr(request, "param", {})
    return make_settings(tmp_path / "data", db_url, **overrides)


@pytest.fixture
def app(settings: Settings, clock: Clock) -> FastAPI:
    return create_app(settings, build_variants=fp32_build, now=clock)


def _enroll(
    client: httpx.Client, token: str, labels: dict[str, str] | None = None, name: str = "robot"
) -> httpx.Response:
    body = {
        "bootstrap_token": token,
        "name": name,
        "profile": x86_profile().model_dump(mode="json"),
        "labels": labels or {},
    }
    return client.post("/v1/devices/enroll", json=body)


def _bootstrap_token(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/bootstrap-tokens", json={"name": "line-1", **body}, headers=ADMIN)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    assert out["token"].startswith("efb_")
    return out


# -- bootstrap tokens and labels -------------------------------------------------------------


def test_a_bootstrap_token_enrolls_its_count_until_it_expires(
    client: httpx.Client, clock: Clock
) -> None:
    token = _bootstrap_token(client, max_uses=2, expires_in_s=3600)
    assert [_enroll(client, token["token"]).status_code for _ in range(3)] == [201, 201, 401]
    used_up = _enroll(client, token["token"])
    assert used_up.json()["message"] == "bootstrap token 'line-1' is used up (2 enrollments)"

    timed = _bootstrap_token(client, max_uses=10, expires_in_s=60)
    assert _enroll(client, timed["token"]).status_code == 201
    clock.advance(61)
    expired = _enroll(client, timed["token"])
    assert expired.status_code == 401
    assert expired.json()["message"].startswith("bootstrap token 'line-1' expired at ")

    revoked = _bootstrap_token(client, max_uses=10)
    r = client.delete(f"/v1/bootstrap-tokens/{revoked['id']}", headers=ADMIN)
    assert r.status_code == 200
    assert r.json()["revoked"] is True
    assert _enroll(client, revoked["token"]).json()["message"] == (
        "bootstrap token 'line-1' is revoked"
    )
    assert _enroll(client, "efb_made-up-0123456789abcdefghijklmn").status_code == 401

    listed = {t["id"]: t for t in client.get("/v1/bootstrap-tokens", headers=ADMIN).json()}
    assert listed[token["id"]]["uses"] == 2
    assert listed[timed["id"]]["uses"] == 1
    assert "token" not in listed[token["id"]]  # shown once, at creation
    device = client.get("/v1/devices", headers=ADMIN).json()[0]
    assert client.post("/v1/bootstrap-tokens", json={"name": "x"}, headers={}).status_code == 401
    viewer = _operator_token(client, "viewer")
    refused = client.post("/v1/bootstrap-tokens", json={"name": "x"}, headers=viewer)
    assert refused.status_code == 403
    assert device["credential"] == "active"


def test_device_asserted_labels_select_nothing_until_approved(
    client: httpx.Client, digits_path: Path, digits_sets: SampleFiles
) -> None:
    push_version(client, digits_path, digits_sets)
    token = _bootstrap_token(client, labels={"site": "lyon"}, max_uses=5)
    # A token holder asks for another site's models: it gets the token's site, and a request.
    r = _enroll(client, token["token"], {"site": "paris", "ring": "canary"})
    assert r.status_code == 201, r.text
    device_id = r.json()["device_id"]
    auth = {"Authorization": f"Bearer {r.json()['credential']}"}
    shown = client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()
    assert shown["labels"] == {"site": "lyon"}
    assert shown["requested_labels"] == {"site": "paris", "ring": "canary"}
    # With the settings' token, nothing the device says selects anything.
    other = _enroll(client, BOOTSTRAP_TOKEN, {"site": "paris"}, name="other").json()
    assert client.get(f"/v1/devices/{other['device_id']}", headers=ADMIN).json()["labels"] == {}

    def assign(selector: dict[str, str]) -> httpx.Response:
        body = {"model": "digits", "version": "1.0.0", "selector": selector}
        return client.post("/v1/assignments", json=body, headers=ADMIN)

    assert assign({"site": "paris"}).json()["devices_matched"] == 0
    assert assign({"ring": "canary"}).json()["devices_matched"] == 0
    assert assign({"site": "lyon"}).json()["devices_matched"] == 1
    desired = client.get(f"/v1/devices/{device_id}/desired-state", headers=auth).json()
    assert [m["name"] for m in desired["models"]] == ["digits"]

    # The operator approves one requested label; the other stays a request.
    r = client.post(
        f"/v1/devices/{device_id}/labels/approve", json={"keys": ["ring"]}, headers=ADMIN
    )
    assert r.status_code == 200, r.text
    assert r.json()["labels"] == {"site": "lyon", "ring": "canary"}
    assert r.json()["requested_labels"] == {"site": "paris"}
    assert assign({"ring": "canary"}).json()["devices_matched"] == 1
    not_asked = client.post(
        f"/v1/devices/{device_id}/labels/approve", json={"keys": ["group"]}, headers=ADMIN
    )
    assert not_asked.status_code == 409
    # Setting a label decides it: the request for it goes.
    r = client.patch(
        f"/v1/devices/{device_id}/labels", json={"set": {"site": "lyon"}}, headers=ADMIN
    )
    assert r.json()["requested_labels"] == {}
    # A device cannot approve its own request.
    selfish = client.post(f"/v1/devices/{device_id}/labels/approve", json={}, headers=auth)
    assert selfish.status_code == 403


@pytest.mark.parametrize(
    "settings",
    [{"bootstrap_token_max_uses": 2, "bootstrap_token_expires_at": "2999-01-01T00:00:00Z"}],
    indirect=True,
)
def test_the_settings_token_keeps_its_own_bounds(client: httpx.Client, clock: Clock) -> None:
    assert [_enroll(client, BOOTSTRAP_TOKEN).status_code for _ in range(3)] == [201, 201, 401]
    rows = client.get("/v1/bootstrap-tokens", headers=ADMIN).json()
    assert [(t["name"], t["uses"], t["max_uses"], t["labels"]) for t in rows] == [
        ("settings", 2, 2, {})
    ]


@pytest.mark.parametrize(
    "settings", [{"bootstrap_token_expires_at": "2020-01-01T00:00:00Z"}], indirect=True
)
def test_an_expired_settings_token_enrolls_nothing(client: httpx.Client) -> None:
    r = _enroll(client, BOOTSTRAP_TOKEN)
    assert r.status_code == 401
    assert r.json()["message"].startswith("bootstrap token 'settings' expired at 2020-01-01")


def test_the_settings_token_row_comes_back_when_it_went(client: httpx.Client, app: FastAPI) -> None:
    """A database restored without the settings token's row: the next enrollment makes it
    again (this process had remembered the row as made) and counts its use there."""
    assert _enroll(client, BOOTSTRAP_TOKEN).status_code == 201
    with app.state.ctx.sessions() as session:
        session.execute(delete(BootstrapToken))
        session.commit()
    assert _enroll(client, BOOTSTRAP_TOKEN, name="after").status_code == 201
    rows = client.get("/v1/bootstrap-tokens", headers=ADMIN).json()
    assert [(t["name"], t["uses"]) for t in rows] == [("settings", 1)]


def test_concurrent_enrollments_never_exceed_a_token_bound(client: httpx.Client) -> None:
    """Twelve threads race 30 enrollments for a token of 10 uses: exactly 10 devices, each with
    the token's labels, and a use count of 10 (the use and the device row are stored together)."""
    token = _bootstrap_token(client, labels={"site": "lyon"}, max_uses=10)

    def attempt(i: int) -> tuple[int, str]:
        with httpx.Client(base_url=client.base_url, timeout=30) as own:
            r = _enroll(own, token["token"], {"ring": "canary"}, name=f"racer-{i}")
            return r.status_code, r.json().get("message", "")

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(attempt, range(30)))
    assert sorted(code for code, _ in outcomes) == [201] * 10 + [401] * 20
    assert {m for code, m in outcomes if code == 401} == {
        "bootstrap token 'line-1' is used up (10 enrollments)"
    }
    listed = {t["id"]: t for t in client.get("/v1/bootstrap-tokens", headers=ADMIN).json()}
    assert listed[token["id"]]["uses"] == 10
    devices = client.get("/v1/devices", headers=ADMIN).json()
    racers = [d for d in devices if d["name"].startswith("racer-")]
    assert len(racers) == 10
    assert all(d["labels"] == {"site": "lyon"} for d in racers)
    assert all(d["requested_labels"] == {"ring": "canary"} for d in racers)


# -- operator tokens -------------------------------------------------------------------------


def _operator_token(
    client: httpx.Client, role: str = "operator", expires_in_s: int | None = None
) -> dict[str, str]:
    body: dict[str, Any] = {"name": f"{role}-token", "role": role}
    if expires_in_s is not None:
        body["expires_in_s"] = expires_in_s
    r = client.post("/v1/tokens", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def test_operator_tokens_expire_and_are_revoked(client: httpx.Client, clock: Clock) -> None:
    default = _operator_token(client, "viewer")
    short = _operator_token(client, "viewer", expires_in_s=60)
    listed = client.get("/v1/tokens", headers=ADMIN).json()
    lifetimes = [
        datetime.fromisoformat(t["expires_at"]) - datetime.fromisoformat(t["created_at"])
        for t in listed
    ]
    assert lifetimes == [timedelta(days=90), timedelta(seconds=60)]
    assert client.get("/v1/models", headers=short).status_code == 200
    clock.advance(61)
    expired = client.get("/v1/models", headers=short)
    assert expired.status_code == 401
    assert expired.headers["www-authenticate"] == "Bearer"
    assert expired.json()["message"].startswith("API token 'viewer-token' expired at ")
    assert client.get("/v1/models", headers=default).status_code == 200
    clock.advance(90 * 24 * 3600)
    assert client.get("/v1/models", headers=default).status_code == 401
    assert client.get("/v1/models", headers=ADMIN).status_code == 200  # the settings' token
    too_long = client.post(
        "/v1/tokens", json={"name": "x", "expires_in_s": 400 * 24 * 3600}, headers=ADMIN
    )
    assert too_long.status_code == 422


# -- device credentials ----------------------------------------------------------------------


def test_rotation_deadline_and_exchange_rules(client: httpx.Client, clock: Clock) -> None:
    r = _enroll(client, BOOTSTRAP_TOKEN)
    device_id, old = r.json()["device_id"], r.json()["credential"]
    path = f"/v1/devices/{device_id}"

    def poll(credential: str) -> httpx.Response:
        return client.get(
            f"{path}/desired-state", headers={"Authorization": f"Bearer {credential}"}
        )

    def fetch(credential: str) -> httpx.Response:
        return client.post(f"{path}/credential", headers={"Authorization": f"Bearer {credential}"})

    assert poll(old).status_code == 200
    assert fetch(old).status_code == 409  # no rotation asked
    r = client.post(f"{path}/rotate-credential", json={"grace_s": 600}, headers=ADMIN)
    assert r.json()["credential"] == "rotating"
    clock.advance(601)  # the device never came: its credential is refused
    late = poll(old)
    assert late.status_code == 401
    assert late.json()["message"].startswith("device credential expired: its rotation was due")
    assert fetch(old).status_code == 401

    # The same with a device that answers in time: old -> new, the old one keeps working (and
    # hinting) until the new one is used, then it is refused.
    r = _enroll(client, BOOTSTRAP_TOKEN, name="robot-2")
    device_id, old = r.json()["device_id"], r.json()["credential"]
    path = f"/v1/devices/{device_id}"
    client.post(f"{path}/rotate-credential", json={}, headers=ADMIN)
    new = fetch(old).json()["credential"]
    assert poll(old).headers["Edgefleet-Credential"] == "rotate"
    assert poll(new).status_code == 200
    assert poll(old).status_code == 401
    assert fetch(new).status_code == 409
    other = _enroll(client, BOOTSTRAP_TOKEN, name="robot-3").json()
    stolen = client.post(
        f"{path}/credential", headers={"Authorization": f"Bearer {other['credential']}"}
    )
    assert stolen.status_code == 403
    revoked = client.post(f"{path}/revoke-credential", headers=ADMIN)
    assert revoked.json()["credential"] == "revoked"
    assert poll(new).status_code == 401
    again = client.post(f"{path}/rotate-credential", json={}, headers=ADMIN)
    assert again.status_code == 409


# -- web forms -------------------------------------------------------------------------------


def test_every_web_form_refuses_a_cross_site_post(client: httpx.Client) -> None:
    viewer = _operator_token(client, "viewer")["Authorization"].removeprefix("Bearer ")
    login_page = client.get("/ui").text  # sets this browser's csrf cookie
    assert client.cookies.get(CSRF_COOKIE)
    fields = form_fields(login_page, "/ui/login")
    assert set(fields) == {CSRF_FIELD}

    # Without the page's field, with another browser's, or from another site: refused.
    posts = [
        ({"token": viewer}, {}),
        ({"token": viewer, CSRF_FIELD: "0" * 64}, {}),
        ({"token": viewer, **fields}, {"Sec-Fetch-Site": "cross-site"}),
        ({"token": viewer, **fields}, {"Origin": "https://evil.example"}),
    ]
    for data, headers in posts:
        r = client.post("/ui/login", data=data, headers=headers)
        assert (r.status_code, r.json()["error"]) == (403, "CsrfError"), (data, headers)
        assert "set-cookie" not in r.headers
    with httpx.Client(base_url=str(client.base_url)) as stranger:  # no csrf cookie at all
        r = stranger.post("/ui/login", data={"token": viewer, **fields})
        assert r.status_code == 403

    ok = client.post(
        "/ui/login",
        data={"token": viewer, **fields},
        headers={"Origin": str(client.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"},
    )
    assert ok.status_code == 303
    page = client.get("/ui").text
    forms = page_forms(page)
    assert forms
    # Every form that posts carries the field; the device filter is a GET (a read) and must
    # not put the token in URLs.
    assert all(f.get(CSRF_FIELD) for action, f in forms if action != "/ui")
    assert 'method="get" action="/ui"' in page
    assert client.post("/ui/logout").status_code == 403
    assert client.post("/ui/logout", data=form_fields(page, "/ui/logout")).status_code == 303

    # Every route of the page that is not a read is guarded, including those added later.
    unsafe = [
        (method, route.path)
        for route in web_router.routes
        for method in getattr(route, "methods", set()) - {"GET", "HEAD"}
    ]
    assert unsafe
    for method, path in unsafe:
        assert client.request(method, path).status_code == 403, path


# -- edgectl ---------------------------------------------------------------------------------


def test_edgectl_identity_commands(
    client: httpx.Client,
    live_server: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("EDGECTL_CONFIG", str(tmp_path / "edgectl.json"))
    monkeypatch.setenv("EDGEFLEET_URL", live_server)
    monkeypatch.setenv("EDGEFLEET_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("COLUMNS", "200")

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()  # the service's own log lines so far
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = run(
        "bootstrap-tokens", "create", "line-7", "--label", "site=lyon", "--label", "line=7",
        "--uses", "3", "--expires", "2h",
    )  # fmt: skip
    assert code == 0
    token = out.strip().rsplit(" ", 1)[-1]
    assert token.startswith("efb_")
    enrolled = _enroll(client, token, {"site": "paris"}).json()
    device_id = enrolled["device_id"]
    code, out, _ = run("bootstrap-tokens", "ls", "--json")
    (row,) = [t for t in json.loads(out) if t["name"] == "line-7"]
    assert (row["uses"], row["max_uses"], row["labels"]) == (1, 3, {"site": "lyon", "line": "7"})
    code, out, _ = run("bootstrap-tokens", "ls")
    assert code == 0
    assert "line-7" in out
    assert "1/3" in out

    code, out, _ = run("devices", "approve", device_id, "site")
    assert code == 0
    shown = client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()
    assert shown["labels"] == {"site": "paris", "line": "7"}
    assert shown["requested_labels"] == {}
    code, _, err = run("devices", "approve", device_id, "site")
    assert (code, err.strip()) == (
        1,
        f"ConflictError: device {device_id!r} did not ask for label(s) site",
    )

    code, out, _ = run("devices", "rotate-credential", device_id, "--grace", "1d")
    assert code == 0
    assert "rotating" in out
    assert client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()["credential"] == "rotating"
    code, out, _ = run("devices", "revoke-credential", device_id)
    assert code == 0
    assert client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()["credential"] == "revoked"

    code, out, _ = run("tokens", "create", "ci", "--role", "operator", "--expires", "30d")
    assert code == 0
    ci_token = out.strip().rsplit(" ", 1)[-1]
    code, out, _ = run("tokens", "ls", "--json")
    (ci,) = [t for t in json.loads(out) if t["name"] == "ci"]
    code, out, _ = run("tokens", "revoke", str(ci["id"]))
    assert code == 0
    assert (
        client.get("/v1/models", headers={"Authorization": f"Bearer {ci_token}"}).status_code == 401
    )
    code, _, err = run("tokens", "create", "x", "--expires", "soon")
    assert code == 1
    assert err.startswith("ConfigError: --expires")
    code, _, err = run("bootstrap-tokens", "revoke", "999")
    assert (code, err.strip()) == (1, "NotFoundError: no bootstrap token 999")

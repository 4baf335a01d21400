"""The operator web page: real data rendered, auth by query, cookie and form, HTML escaped."""

from __future__ import annotations

import html
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import markupsafe
import paho.mqtt.client as mqtt
import pytest
from fastapi import FastAPI
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.contracts.telemetry import DeviceTopics, ModelTelemetry, StatePayload, TelemetryPayload
from control_plane.api.routes.web import COOKIE_NAME, CSRF_COOKIE
from control_plane.db.models import Device
from control_plane.settings import Settings
from tests.control_plane.conftest import (
    ADMIN,
    SampleFiles,
    enroll,
    form_fields,
    make_settings,
    push_version,
)


def _viewer_token(client: httpx.Client) -> str:
    r = client.post("/v1/tokens", json={"name": "wall-screen", "role": "viewer"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def _cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={token}"}


def _report(client: httpx.Client, device_id: str, auth: dict[str, str], **model: object) -> None:
    body = {
        "device_id": device_id,
        "agent_version": "0.1.0",
        "models": [{"name": "digits", **model}],
        "updated_at": datetime.now(timezone.utc).isoformat(),
    }
    r = client.put(f"/v1/devices/{device_id}/reported-state", json=body, headers=auth)
    assert r.status_code == 200, r.text


def test_page_shows_devices_models_and_variants(
    client: httpx.Client, digits_path: Path, digits_sets: SampleFiles
) -> None:
    version = push_version(client, digits_path, digits_sets)
    device_id, auth = enroll(client, "robot-7", labels={"site": "lyon", "ring": "canary"})
    _report(
        client, device_id, auth, active_version="1.0.0", variant_id="onnx-fp32", phase="committed"
    )
    token = _viewer_token(client)

    r = client.get("/", params={"token": token})

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    assert '<script src="/ui/static/live.js" defer></script>' in page  # live updates
    assert "data-poll" in page
    assert "robot-7" in page
    assert device_id in page
    assert "site=lyon" in page
    assert "ring=canary" in page
    assert "online" in page
    assert "committed" in page
    assert "digits" in page
    assert "1.0.0" in page
    page = client.get("/ui/models", headers=_cookie(token)).text
    for variant in version["variants"]:
        assert variant["id"] in page
        assert variant["status"] in page
    assert "wall-screen (viewer)" in page
    # The query token became an HttpOnly cookie: the next visit needs no token in the URL.
    cookies = r.headers.get_list("set-cookie")
    cookie = next(c for c in cookies if c.startswith(f"{COOKIE_NAME}="))
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    client.cookies.clear()  # each check below presents the token one way only
    assert client.get("/ui", headers=_cookie(token)).status_code == 200
    assert client.get("/ui", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_accuracy_numbers_of_a_quantized_variant(
    client: httpx.Client, digits_path: Path, digits_sets: SampleFiles, app: FastAPI
) -> None:
    push_version(client, digits_path, digits_sets)
    # The FP32-only test build has no accuracy report; give one variant a real-shaped report
    # as the full build writes it (the full build has its own test).
    from control_plane.db.models import VariantRow

    with app.state.ctx.sessions() as session:
        row = session.query(VariantRow).first()
        assert row is not None
        row.spec = {
            **row.spec,
            "accuracy": {
                "metric": "top1",
                "reference": 98.15,
                "value": 96.3,
                "delta": 1.85,
                "samples": 540,
                "budget": 1.0,
                "accepted": False,
                "reason": "top1 dropped 1.85 points > budget 1",
                "reduced_compute": {"bf16": {"value": 95.1, "delta": 3.05, "accepted": False}},
            },
        }
        row.status = "rejected"
        session.commit()

    page = client.get("/ui/models", headers=ADMIN).text

    assert "top1 96.30" in page
    assert "+1.85" in page
    assert "budget 1" in page
    assert "rejected" in page
    assert html.escape("top1 dropped 1.85 points > budget 1") in page
    assert "bf16 95.1 (delta +3.05): f32 on bf16 CPUs" in page  # what a bf16 CPU runs


def test_refused_without_a_valid_operator_token(client: httpx.Client) -> None:
    device_id, auth = enroll(client, "robot-1")

    no_token = client.get("/")
    assert no_token.status_code == 401
    assert "<form" in no_token.text  # the login form
    assert "robot-1" not in no_token.text
    set_cookies = no_token.headers.get_list("set-cookie")
    assert [c.split("=", 1)[0] for c in set_cookies] == [CSRF_COOKIE]  # for the form, no token

    forged = client.get("/ui", params={"token": "efo_not-a-real-token-at-all-000000"})
    assert forged.status_code == 401
    assert "robot-1" not in forged.text

    device = client.get("/ui", headers=auth)
    assert device.status_code == 403
    assert device_id not in device.text

    long_cookie = client.get("/ui", headers=_cookie("x" * 5000))
    assert long_cookie.status_code == 401


def test_login_form_sets_the_cookie_and_logout_clears_it(client: httpx.Client) -> None:
    enroll(client, "robot-2")
    token = _viewer_token(client)
    csrf = form_fields(client.get("/ui").text, "/ui/login")  # the page sets the csrf cookie

    bad = client.post("/ui/login", data={**csrf, "token": "efo_wrong-token-0123456789abcdef"})
    assert bad.status_code == 401
    assert "unknown or revoked API token" in bad.text
    assert "set-cookie" not in bad.headers

    good = client.post("/ui/login", data={**csrf, "token": token})
    assert good.status_code == 303
    assert good.headers["location"] == "/ui"
    assert f"{COOKIE_NAME}={token}" in good.headers["set-cookie"]
    page = client.get("/ui", headers=_cookie(token))
    assert page.status_code == 200
    assert "robot-2" in page.text

    out = client.post("/ui/logout", data=form_fields(page.text, "/ui/logout"))
    assert out.status_code == 303
    assert f'{COOKIE_NAME}=""' in out.headers["set-cookie"]

    # A revoked token no longer opens the page, cookie or not.
    tokens = client.get("/v1/tokens", headers=ADMIN).json()
    token_id = next(t["id"] for t in tokens if t["name"] == "wall-screen")
    assert client.delete(f"/v1/tokens/{token_id}", headers=ADMIN).status_code == 200
    assert client.get("/ui", headers=_cookie(token)).status_code == 401


def test_html_in_device_data_is_escaped(client: httpx.Client, app: FastAPI) -> None:
    device_id, auth = enroll(client, "robot-3", labels={"site": "lyon"})
    attack = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    # A device controls the text of its reported errors.
    _report(client, device_id, auth, active_version="1.0.0", phase="failed", last_error=attack)
    # Labels pass a strict pattern at the API; a row written some other way (an older release,
    # a manual fix in the database) must still render inert.
    with app.state.ctx.sessions() as session:
        device = session.get(Device, device_id)
        assert device is not None
        device.labels = {"site": attack, "<b>key</b>": "v"}
        session.commit()

    r = client.get("/ui", headers=ADMIN)

    assert r.status_code == 200
    page = r.text
    assert page.count("<script") == 1  # live.js, from this origin; nothing inline
    assert "<img" not in page
    assert "<b>key</b>" not in page
    assert str(markupsafe.escape(attack)) in page  # Jinja2's autoescape (" as &#34;)
    assert "&lt;b&gt;key&lt;/b&gt;" in page
    device_page = client.get(f"/ui/devices/{device_id}", headers=ADMIN).text
    assert device_page.count("<script") == 1
    assert str(markupsafe.escape(attack)) in device_page
    assert "script-src 'self';" in r.headers["content-security-policy"]  # no inline script
    assert "default-src 'none'" in r.headers["content-security-policy"]


@pytest.mark.broker
class TestWithTelemetryAndRollouts:
    """The page over a control plane that ingests MQTT telemetry and runs rollouts."""

    @pytest.fixture
    def settings(self, tmp_path: Path, db_url: str, mqtt_broker: tuple[str, int]) -> Settings:
        self.prefix = f"eftest-{uuid.uuid4().hex[:10]}/v1"
        return make_settings(
            tmp_path / "data",
            db_url,
            mqtt_host=mqtt_broker[0],
            mqtt_port=mqtt_broker[1],
            mqtt_topic_prefix=self.prefix,
            mqtt_client_id=f"cp-{uuid.uuid4().hex[:10]}",
            mqtt_session_expiry_s=0,
        )

    def test_presence_latency_and_rollout_from_real_telemetry(
        self,
        client: httpx.Client,
        digits_path: Path,
        digits_sets: SampleFiles,
        mqtt_broker: tuple[str, int],
    ) -> None:
        push_version(client, digits_path, digits_sets)
        device_id, _auth = enroll(client, "robot-9", labels={"fleet": "demo"})
        r = client.post(
            "/v1/rollouts",
            json={
                "id": "digits-canary",
                "model": "digits",
                "version": "1.0.0",
                "selector": {"fleet": "demo"},
                "waves": [{"count": 1, "soak_s": 60}, {"percent": 100}],
            },
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        topics = DeviceTopics(device_id, self.prefix)
        now = datetime.now(timezone.utc)
        birth = StatePayload(device_id=device_id, status="online", ts=now, agent_version="0.1.0")
        window = TelemetryPayload(
            device_id=device_id,
            seq=0,
            ts=now,
            models=(
                ModelTelemetry(
                    name="digits",
                    version="1.0.0",
                    window_s=1.0,
                    count=20,
                    failed=0,
                    dropped=0,
                    throughput_per_s=20.0,
                    latency_p50_ms=0.42,
                    latency_p99_ms=1.23,
                ),
            ),
        )
        device = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=device_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        device.connect(*mqtt_broker)
        device.loop_start()
        try:
            device.publish(
                topics.state, birth.model_dump_json(), qos=1, retain=True
            ).wait_for_publish(5)
            deadline = time.monotonic() + 20
            while True:
                device.publish(topics.telemetry, window.model_dump_json(), qos=0)
                page = client.get("/ui", headers=ADMIN).text
                if "p99 1.23 ms" in page:
                    break
                assert time.monotonic() < deadline, page
                time.sleep(0.3)
        finally:
            device.publish(topics.state, b"", qos=1, retain=True).wait_for_publish(5)
            device.disconnect()
            device.loop_stop()

        assert "digits: p50 0.42 ms, p99 1.23 ms" in page
        assert '<td class="ok">online</td>' in page
        assert "<h2>Rollouts</h2>" in page
        assert "digits-canary" in page
        assert "wave 1 of 2" in page

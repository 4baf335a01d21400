"""The fleet page in a real browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``,
installed by the apt step in deploy/dev/services.sh) against a live control plane. Covers
signing in, filtering the device list, a latency chart drawn from stored telemetry buckets,
the live refresh, and aborting a rollout from its page (operator role, CSRF form). Screenshots
go to ``$EDGEFLEET_TEST_ARTIFACTS/web`` (default ``var/test-artifacts/web``).
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tests.control_plane.conftest import ADMIN, SampleFiles, enroll, push_version

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("EDGEFLEET_TEST_ARTIFACTS", "var/test-artifacts")) / "web"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"
)


def _report(client: httpx.Client, device_id: str, auth: dict[str, str]) -> None:
    body = {
        "device_id": device_id,
        "agent_version": "0.1.0",
        "models": [
            {
                "name": "digits",
                "active_version": "1.0.0",
                "variant_id": "onnx-fp32",
                "backend": "onnxruntime",
                "phase": "committed",
                "choice": "onnx-fp32: measured 0.4 ms, the fastest of 1 offered",
            }
        ],
        "updated_at": datetime.now(timezone.utc).isoformat(),
    }
    r = client.put(f"/v1/devices/{device_id}/reported-state", json=body, headers=auth)
    assert r.status_code == 200, r.text


def _buckets(app: FastAPI, device_id: str) -> None:
    """An hour of one-minute telemetry buckets, as the ingester stores them."""
    from control_plane.ingest.tables import TelemetryBucket

    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    with app.state.ctx.sessions() as session:
        for i in range(60):
            p99 = 2.0 + (i % 10) * 0.3
            session.add(
                TelemetryBucket(
                    device_id=device_id,
                    model="digits",
                    version="1.0.0",
                    bucket_start=now - timedelta(minutes=60 - i),
                    windows=6,
                    inferences=600,
                    failed=i % 7,
                    dropped=0,
                    window_s=60.0,
                    latency_weight=600,
                    p50_weighted_sum=600 * 1.0,
                    p95_weighted_sum=600 * 1.8,
                    p99_weighted_sum=600 * p99,
                    p99_max_ms=p99 * 1.5,
                    first_received_at=now - timedelta(minutes=60 - i),
                    last_received_at=now - timedelta(minutes=59 - i),
                )
            )
        session.commit()


def test_fleet_page_in_a_browser(
    live_server: str,
    client: httpx.Client,
    app: FastAPI,
    digits_path: Path,
    digits_sets: SampleFiles,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    push_version(client, digits_path, digits_sets)
    lab, lab_auth = enroll(client, "robot-lab-1", labels={"site": "lab"})
    enroll(client, "robot-lab-2", labels={"site": "lab"})
    plant, plant_auth = enroll(client, "robot-plant-1", labels={"site": "plant"})
    for device_id, auth in ((lab, lab_auth), (plant, plant_auth)):
        _report(client, device_id, auth)
    _buckets(app, lab)
    r = client.post("/v1/tokens", json={"name": "ops", "role": "operator"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    rollout = {
        "id": "web-abort",
        "model": "digits",
        "version": "1.0.0",
        "selector": {"site": "lab"},
        "waves": [{"percent": 50.0, "soak_s": 600.0}, {"percent": 100.0, "soak_s": 0.0}],
    }
    assert client.post("/v1/rollouts", json=rollout, headers=ADMIN).status_code == 201
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            # Script errors and CSP violations (the login page's own 401 is expected).
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "console",
                lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
            )

            # Sign in.
            page.goto(f"{live_server}/ui")
            page.fill("input[name=token]", token)
            page.click("button[type=submit]")
            page.wait_for_load_state()
            assert page.locator("tr.device-row").count() == 3, page.content()[-3000:]
            expect(page.locator("nav")).to_contain_text("ops (operator)")
            page.screenshot(path=str(ARTIFACTS / "1-devices.png"), full_page=True)

            # Filter by label, then by text.
            page.fill("input[name=label]", "site=plant")
            page.click("form.filters button[type=submit]")
            expect(page.locator("tr.device-row")).to_have_count(1)
            expect(page.locator("tr.device-row")).to_contain_text("robot-plant-1")
            page.fill("input[name=label]", "")
            page.fill("input[name=q]", "lab-2")
            page.click("form.filters button[type=submit]")
            expect(page.locator("tr.device-row")).to_have_count(1)
            page.screenshot(path=str(ARTIFACTS / "2-filtered.png"), full_page=True)

            # The live refresh swaps the marked parts in place.
            expect(page.locator("body")).to_have_attribute(
                "data-refreshed", re.compile(r"^\d+$"), timeout=9000
            )
            expect(page.locator("tr.device-row")).to_have_count(1)

            # A device: latency and error charts drawn from the stored buckets.
            page.goto(f"{live_server}/ui/devices/{lab}")
            chart = page.locator("#latency-chart")
            expect(chart).to_have_attribute("data-points", "60")
            points = page.locator("#latency-chart polyline").first.get_attribute("points") or ""
            assert len(points.split()) == 60
            assert page.locator("#error-chart polyline").count() == 1
            expect(page.locator("body")).to_contain_text("the fastest of 1 offered")
            page.screenshot(path=str(ARTIFACTS / "3-device.png"), full_page=True)

            # A rollout: abort it from its page.
            page.goto(f"{live_server}/ui/rollouts/web-abort")
            expect(page.locator("#rollout-status")).to_have_text("running")
            page.fill("input[name=reason]", "p99 looked wrong on the bench")
            page.click("button.danger")
            expect(page.locator("#rollout-status")).to_have_text("aborted")
            expect(page.locator("#abort-reason")).to_contain_text("p99 looked wrong on the bench")
            expect(page.locator("#rollout-body")).not_to_contain_text("built-in method")
            page.screenshot(path=str(ARTIFACTS / "4-rollout-aborted.png"), full_page=True)

            page.goto(f"{live_server}/ui/models")
            expect(page.locator("td.gate").first).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "5-models.png"), full_page=True)
            assert not errors, errors  # no CSP violation or script error
        finally:
            browser.close()

    state = client.get("/v1/rollouts/web-abort", headers=ADMIN).json()
    assert state["status"] == "aborted"
    assert state["reason"] == "p99 looked wrong on the bench"

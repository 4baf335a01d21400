"""Fleet latency percentiles from merged sketches, through the real agent client, Mosquitto,
the ingester and the HTTP API (SQLite and PostgreSQL).

Two devices serve one model version with different latency distributions (a fast board and a
slow one). The fleet p99 the API answers is the p99 of all their latencies together, within the
sketch's relative accuracy; the count-weighted mean of the devices' own p99s, which is what a
store of percentiles can offer, is far from it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from agent.config import MqttConfig
from agent.contracts.sketch import RELATIVE_ACCURACY
from agent.contracts.telemetry import SlotIdentity
from agent.telemetry import InferenceWindow, TelemetryClient
from control_plane.api.fast_poll import ControlPlaneAPI
from control_plane.app import create_app
from control_plane.ingest import TelemetryIngester
from tests.control_plane.conftest import ADMIN, fp32_build, make_settings, push_version
from tests.control_plane.test_ingest import (  # noqa: F401 - fixtures
    engine,
    make_ingester,
    prefix,
    wait_until,
)

pytestmark = pytest.mark.broker

# (device, latencies): a fast board around 8 ms, a slow one around 30 ms with a long tail
RNG = np.random.default_rng(7)
FAST = RNG.lognormal(np.log(8.0), 0.15, 6000)
SLOW = RNG.lognormal(np.log(30.0), 0.35, 1500)


@pytest.fixture
def app(tmp_path: Path, db_url: str) -> FastAPI:
    return create_app(make_settings(tmp_path / "data", db_url), build_variants=fp32_build)


def _window_of(latencies: np.ndarray, version: str) -> InferenceWindow:
    window = InferenceWindow(rng=random.Random(0))
    for value in latencies:
        window.record("digits", float(value), version=version, backend="onnxruntime")
    return window


def test_fleet_p99_is_the_p99_of_every_device_together(
    app: ControlPlaneAPI,
    client: httpx.Client,
    make_ingester: Callable[..., TelemetryIngester],  # noqa: F811
    mqtt_broker: tuple[str, int],
    prefix: str,  # noqa: F811
    tmp_path: Path,
    digits_path: Path,
    digits_sets: object,
) -> None:
    version = push_version(client, digits_path, digits_sets)["version"]  # type: ignore[arg-type]
    ingester = make_ingester()
    per_device_p99: list[tuple[float, int]] = []
    for name, latencies in (("fast", FAST), ("slow", SLOW)):
        drained = _window_of(latencies, version).drain()
        (stats,) = drained
        assert stats.latency_sketch is not None
        per_device_p99.append((stats.latency_p99_ms or 0.0, stats.count))
        sent = iter([drained])
        config = MqttConfig(
            host=mqtt_broker[0],
            port=mqtt_broker[1],
            topic_prefix=prefix,
            telemetry_interval_s=0.05,
        )
        agent = TelemetryClient(
            config,
            device_id=f"dev-{name}",
            state_dir=tmp_path / name,
            model_stats=lambda sent=sent: next(sent, []),
            slots=lambda: [SlotIdentity(name="digits", version=version)],
            reconnect_min_s=0.05,
        )
        with agent:
            assert agent.wait_connected(10)
            wait_until(lambda agent=agent: agent.counters().telemetry_delivered >= 1)
    wait_until(lambda: ingester.counters().stored >= 2 + 2, what="both windows stored")
    assert ingester.sync()

    r = client.get(f"/v1/models/digits/versions/{version}/latency?minutes=10", headers=ADMIN)
    assert r.status_code == 200, r.text
    fleet = r.json()
    both = np.concatenate([FAST, SLOW])
    assert fleet["inferences"] == pytest.approx(len(both))
    for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")):
        true = float(np.quantile(both, q, method="lower"))
        assert fleet[key] == pytest.approx(true, rel=2 * RELATIVE_ACCURACY), (key, fleet, true)
    averaged = sum(p * n for p, n in per_device_p99) / sum(n for _, n in per_device_p99)
    assert abs(averaged - fleet["p99_ms"]) / fleet["p99_ms"] > 0.2  # what averaging gets wrong

    missing = client.get("/v1/models/digits/versions/9.9.9/latency", headers=ADMIN)
    assert missing.status_code == 404
    empty = client.get(f"/v1/models/digits/versions/{version}/latency", headers=ADMIN)
    assert empty.json()["inferences"] == pytest.approx(len(both))
    assert client.get(f"/v1/models/digits/versions/{version}/latency").status_code == 401

"""Shadow stage through real processes: two ``edge-agent daemon`` subprocesses serving the digits
CNN on real digit images (an image-folder loop source), a control plane on loopback (uvicorn,
SQLite, its ingester on Mosquitto) and rollouts that start with a shadow stage.

- A version that disagrees with the serving one on those images (one class always wins) is held
  back before serving anywhere: the devices ran it beside 1.0.0, reported their agreement over
  MQTT, the rollout aborted on it, and no device ever swapped to it.
- An equivalent version (the same weights with a constant shift of every logit: its raw outputs
  differ, its decisions do not) is promoted on agreement, then served through the normal waves.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from agent.samples import DigitsData
from control_plane.cli.rollout import status_view
from tests.agent.store import models
from tests.control_plane.test_lifecycle import table_rows
from tests.test_e2e_fleet_truth import Agent, _wait
from tests.test_e2e_recovery import (  # the rollout-ready control plane and its helpers
    _committed,
    _device_ids,
    _ended,
    _reported,
    _rollout,
    _RolloutPlane,
    _start_rollout,
    agent_config,
)

pytestmark = pytest.mark.broker


SHADOW = {
    "count": 2,
    "soak_s": 2,
    "sample_share": 0.2,
    "min_samples": 10,
    "max_delta": 1.0,
    "max_latency_ratio": None,  # two processes share two cores here: not judged
}


@pytest.fixture
def cp(tmp_path: Path, mqtt_broker: tuple[str, int]) -> Any:
    import uuid

    plane = _RolloutPlane(tmp_path / "cp", mqtt_broker, f"eftest-{uuid.uuid4().hex[:10]}/v1")
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture
def cal(tmp_path: Path, digits: DigitsData) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, input=digits.x_train[:64])
    return path


def _digit_images(folder: Path, digits: DigitsData, n: int = 60) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(digits.x_test[:n]):
        pixels = np.clip(x[0] * 255.0, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return folder


def _swapped_to(agent: Agent, version: str) -> list[dict[str, Any]]:
    return [e for e in agent.events("slot_swapped") if e.get("version") == version]


def test_a_shadow_stage_holds_back_a_disagreeing_version_and_promotes_an_equivalent_one(
    cp: _RolloutPlane,
    tmp_path: Path,
    digits_path: Path,
    digits: DigitsData,
    cal: Path,
    mqtt_broker: tuple[str, int],
) -> None:
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    cp.push(
        models.one_class_wins(digits_path, tmp_path / "bad.onnx"),
        cal,
        name="digits",
        version="2.0.0",
    )
    cp.push(
        models.shifted(digits_path, tmp_path / "same.onnx", 2.5),
        cal,
        name="digits",
        version="2.1.0",
    )
    root = cp.root_json(tmp_path / "root.json")
    images = _digit_images(tmp_path / "images", digits)
    source = f'[loop.source]\nkind = "images"\npath = "{images}"\nrepeat = true'
    agents = [
        Agent(
            agent_config(
                tmp_path / f"{n}.toml",
                tmp_path / f"state-{n}",
                cp,
                root,
                mqtt_broker,
                name=n,
                prefix=cp.settings.mqtt_topic_prefix,
                loop_source=source,
            ),
            tmp_path / f"{n}.log",
        ).start()
        for n in ("shadow-a", "shadow-b")
    ]
    try:
        ids = _wait("enrollment", lambda: (d := _device_ids(cp)) and len(d) == 2 and d)
        for device_id in ids:
            cp.deploy("digits", "1.0.0", device_id)
        for device_id in ids:
            _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))

        # (b) disagrees on the images: held back before a single device serves it.
        _start_rollout(cp, "dark-bad", "2.0.0", devices=2, shadow=SHADOW)
        final = _ended(cp, "dark-bad")
        assert final["status"] == "aborted", final
        assert "held back before serving" in final["reason"], final["reason"]
        assert final["assigned"] == 0
        shadow = final["shadow"]
        assert shadow["state"] == "held_back"
        assert shadow["health"]["metric"] == "agreement"
        assert shadow["health"]["delta"] > 50.0  # one class always wins: most decisions differ
        assert {d["device_id"] for d in shadow["devices"]} == set(ids)
        for agent in agents:
            assert not _swapped_to(agent, "2.0.0"), "a held-back version served"
            _wait("the shadow stopped", lambda a=agent: a.events("shadow_stopped"))
        for device_id in ids:
            assert _reported(cp, device_id).get("active_version") == "1.0.0"
        with cp.admin() as admin:
            page = admin.get("/ui/rollouts/dark-bad")
        assert page.status_code == 200, page.text
        rows = [r for r in table_rows(page.text) if r and r[0] in ids]
        shadow_rows = [r for r in rows if len(r) == 10]  # the shadow table's device rows
        assert {r[0] for r in shadow_rows} == set(ids)
        assert all(r[4] == "agreement" and float(r[6]) > 50.0 for r in shadow_rows), shadow_rows

        # (a) an equivalent version: promoted on agreement, then served through the waves.
        _start_rollout(cp, "dark-same", "2.1.0", devices=2, shadow=SHADOW)
        final = _ended(cp, "dark-same")
        assert final["status"] == "completed", final
        shadow = final["shadow"]
        assert shadow["state"] == "passed"
        health = shadow["health"]
        assert health["reporting"] == 2
        assert health["samples"] >= 20
        assert health["delta"] == 0.0
        kinds = [d["kind"] for d in final["decisions"]]
        assert kinds.index("shadow") < kinds.index("shadow_passed") < kinds.index("assign")
        for device_id in ids:
            _wait("2.1.0 committed", _committed(cp, device_id, "2.1.0"))
        for agent in agents:
            started = [e for e in agent.events("shadow_started") if e["version"] == "2.1.0"]
            assert started
            assert started[0]["sample_share"] == 0.2

        out = io.StringIO()
        Console(file=out, width=200).print(status_view(_rollout(cp, "dark-same")))
        text = out.getvalue()
        assert "shadow passed" in text
        assert "agreement" in text
    finally:
        for agent in agents:
            agent.stop()

"""Credential rotation through the real update client and the real control plane: the device
takes its new credential from a poll's hint, with the old one, and never stops being served or
updated; a lost answer is fetched again; the old credential is refused once the new one is used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.samples import DigitsData
from agent.updates.client import CREDENTIAL_FILE
from tests.agent.store import models

from .fleet import ADMIN, ControlPlane, Device, Traffic


@pytest.fixture(scope="module")
def cp(
    tmp_path_factory: pytest.TempPathFactory, digits_path: Path, digits: DigitsData
) -> Iterator[ControlPlane]:
    root = tmp_path_factory.mktemp("rotation-fleet")
    cal = root / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    plane = ControlPlane(root / "cp").start()
    try:
        plane.push(digits_path, cal, name="digits", version="1.0.0")
        plane.push(
            models.shifted(digits_path, root / "v2.onnx", 5.0), cal, name="digits", version="2.0.0"
        )
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def device(cp: ControlPlane, tmp_path: Path) -> Iterator[Device]:
    d = Device(cp, tmp_path / "state")
    yield d
    d.close()


def _stored_credential(device: Device) -> str:
    path = device.state_dir / CREDENTIAL_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    value: str = json.loads(path.read_text())["credential"]
    return value


def _poll(cp: ControlPlane, device_id: str, credential: str) -> httpx.Response:
    with httpx.Client(base_url=cp.url, timeout=30) as c:
        return c.get(
            f"/v1/devices/{device_id}/desired-state",
            headers={"Authorization": f"Bearer {credential}"},
        )


def _rotate(cp: ControlPlane, device_id: str, grace_s: int = 3600) -> dict[str, Any]:
    with cp.admin() as c:
        r = c.post(f"/v1/devices/{device_id}/rotate-credential", json={"grace_s": grace_s})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


def test_the_device_takes_a_rotated_credential_without_missing_a_poll(
    cp: ControlPlane, device: Device, digits: DigitsData
) -> None:
    device.client.tick()  # enrolls
    cp.deploy("digits", "1.0.0", device.device_id)
    device.client.tick()
    assert device.serving() == "1.0.0"
    old = _stored_credential(device)
    feeds = {"input": digits.x_test[:1].astype(np.float32)}

    with Traffic(device, feeds) as traffic:
        shown = _rotate(cp, device.device_id)
        assert shown["credential"] == "rotating"
        # The old credential still works while the rotation is pending, and says so.
        hinted = _poll(cp, device.device_id, old)
        assert hinted.status_code == 200
        assert hinted.headers["Edgefleet-Credential"] == "rotate"

        failures_before = device.client._schedule.failures
        device.client.tick()  # the poll's hint: fetch the new credential with the old one
        new = _stored_credential(device)
        assert new != old
        assert device.client.credential is not None
        assert device.client.credential.credential == new
        assert device.client._schedule.failures == failures_before == 0  # no poll failed

        # With the new credential the device updates as before: download, verify, swap.
        cp.deploy("digits", "2.0.0", device.device_id)
        device.client.tick()
        assert device.serving() == "2.0.0"
    assert traffic.failures == []
    assert set(traffic.by_version) <= {"1.0.0", "2.0.0"}

    assert cp.device(device.device_id)["credential"] == "active"
    refused = _poll(cp, device.device_id, old)
    assert refused.status_code == 401
    assert refused.json()["error"] == "AuthError"
    fresh = _poll(cp, device.device_id, new)
    assert fresh.status_code == 200
    assert "Edgefleet-Credential" not in fresh.headers


def test_a_lost_answer_is_fetched_again_with_the_old_credential(
    cp: ControlPlane, device: Device
) -> None:
    device.client.tick()
    device_id = device.device_id
    old = _stored_credential(device)
    _rotate(cp, device_id)
    with httpx.Client(base_url=cp.url, timeout=30) as c:  # an answer the device never kept
        lost = c.post(
            f"/v1/devices/{device_id}/credential", headers={"Authorization": f"Bearer {old}"}
        )
    assert lost.status_code == 200, lost.text
    lost_credential = lost.json()["credential"]

    device.client.tick()  # the old credential still polls, is hinted, and fetches again
    new = _stored_credential(device)
    assert new not in (old, lost_credential)
    device.client.tick()  # the first use of the new credential ends the rotation
    assert cp.device(device_id)["credential"] == "active"
    assert _poll(cp, device_id, lost_credential).status_code == 401
    assert _poll(cp, device_id, old).status_code == 401
    assert _poll(cp, device_id, new).status_code == 200


def test_a_revoked_credential_is_refused_at_once(cp: ControlPlane, device: Device) -> None:
    device.client.tick()
    device_id = device.device_id
    credential = _stored_credential(device)
    etag = _poll(cp, device_id, credential).headers["ETag"]
    with httpx.Client(base_url=cp.url, timeout=30) as c:
        cached = c.get(
            f"/v1/devices/{device_id}/desired-state",
            headers={"Authorization": f"Bearer {credential}", "If-None-Match": etag},
        )
        assert cached.status_code == 304  # answered from the caches
        r = c.post(f"/v1/devices/{device_id}/revoke-credential", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json()["credential"] == "revoked"
        again = c.get(
            f"/v1/devices/{device_id}/desired-state",
            headers={"Authorization": f"Bearer {credential}", "If-None-Match": etag},
        )
    assert again.status_code == 401
    assert again.json()["message"] == "device credential revoked"

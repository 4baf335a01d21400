"""The update client against the real control plane (uvicorn on loopback, SQLite, real builds,
real TUF repository) with the real digits CNN: enrollment, ETag polling, v1 -> v2, and every
attack or fault of the issue, each asserting what the device refused and reported, that the
active version kept serving, and that nothing half-written stayed behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from agent.config import BackendConfig
from agent.samples import DigitsData
from agent.updates.download import DownloadConfig
from control_plane.db.models import Model, ModelVersion, VariantRow
from control_plane.signing import TufRepository
from tests.agent.store import models

from .fleet import ControlPlane, Device, Traffic, wide_digits


@dataclass
class Fleet:
    cp: ControlPlane
    feeds: dict[str, np.ndarray[Any, Any]]
    timestamp_after_v1: bytes
    sources: dict[str, Path]
    cal: Path


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, digits_path: Path, digits: DigitsData
) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("ota-fleet")
    cal = root / "cal.npz"
    np.savez(cal, input=digits.x_train[:64])
    v2 = models.shifted(digits_path, root / "v2.onnx", 5.0)
    cp = ControlPlane(root / "cp").start()
    try:
        cp.push(digits_path, cal, name="digits", version="1.0.0")
        timestamp_after_v1 = (cp.ctx.tuf.metadata_dir / "timestamp.json").read_bytes()
        cp.push(v2, cal, name="digits", version="2.0.0")
        feeds = {"input": digits.x_test[:1].astype(np.float32)}
        yield Fleet(cp, feeds, timestamp_after_v1, {"1.0.0": digits_path, "2.0.0": v2}, cal)
    finally:
        cp.stop()


@pytest.fixture
def device(fleet: Fleet, tmp_path: Path) -> Iterator[Device]:
    d = Device(fleet.cp, tmp_path / "state")
    yield d
    d.close()


def _at_v1(fleet: Fleet, device: Device) -> None:
    device.client.tick()  # enrolls; nothing desired yet
    fleet.cp.deploy("digits", "1.0.0", device.device_id)
    device.client.tick()
    assert device.serving() == "1.0.0"
    assert device.infer(fleet.feeds) == "1.0.0"


def _reported(fleet: Fleet, device: Device) -> dict[str, Any]:
    reported = fleet.cp.device(device.device_id)["reported"]
    model: dict[str, Any] = next(m for m in reported["models"] if m["name"] == "digits")
    return model


def _assert_nothing_half_written(device: Device, version: str = "2.0.0") -> None:
    downloads = device.state_dir / "downloads"
    leftovers = list(downloads.iterdir()) if downloads.exists() else []
    assert leftovers == [], leftovers
    assert version not in device.store.versions("digits")


# --- the happy path --------------------------------------------------------------------------


def test_enrolls_once_with_its_profile_and_keeps_the_credential_private(
    fleet: Fleet, device: Device, tmp_path: Path
) -> None:
    device.client.tick()
    cred_file = device.state_dir / "enrollment.json"
    assert cred_file.stat().st_mode & 0o777 == 0o600
    shown = fleet.cp.device(device.device_id)
    assert shown["labels"] == {}  # what a device asks for selects nothing until approved
    assert shown["requested_labels"] == {"site": "lab"}
    assert shown["profile"]["arch"] == os.uname().machine
    # A restart (a new client on the same state dir) keeps the identity: no second enrollment.
    again = Device(fleet.cp, device.state_dir, root=tmp_path / "robot-root.json")
    try:
        again.client.tick()
        assert again.device_id == device.device_id
    finally:
        again.close()


def test_polls_desired_state_with_etag(fleet: Fleet, tmp_path: Path) -> None:
    statuses: list[tuple[str, int]] = []

    def record(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/desired-state"):
            statuses.append(
                (response.request.headers.get("If-None-Match", ""), response.status_code)
            )

    http = httpx.Client(timeout=10, event_hooks={"response": [record]})
    d = Device(fleet.cp, tmp_path / "state", http=http)
    try:
        d.client.tick()
        d.client.tick()
        assert statuses[0] == ("", 200)
        assert statuses[1][1] == 304
        assert statuses[1][0].startswith('"')
        fleet.cp.deploy("digits", "1.0.0", d.device_id)
        d.client.tick()
        assert statuses[2][1] == 200  # a new assignment changes the ETag
        assert d.serving() == "1.0.0"
    finally:
        d.close()
        http.close()


def test_update_v1_to_v2_end_to_end_reports_every_phase(fleet: Fleet, tmp_path: Path) -> None:
    """Every step the client carries the version through is reported, in order, and each
    report is consistent with what served when it was made. The slot's own steps (validating,
    swapping) go out from the client's thread as it sees them: a swap faster than a report may
    fold them into the next one, and the loader thread never waits on the network."""
    phases: list[str] = []
    reports: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> None:
        if request.method == "PUT" and request.url.path.endswith("/reported-state"):
            import json

            body = json.loads(request.content)
            for m in body["models"]:
                if m["name"] == "digits":
                    phases.append(m["phase"])
                    reports.append(m)

    http = httpx.Client(timeout=10, event_hooks={"request": [record]})
    d = Device(fleet.cp, tmp_path / "state", http=http)
    try:
        _at_v1(fleet, d)
        fleet.cp.deploy("digits", "2.0.0", d.device_id)
        phases.clear()
        reports.clear()
        d.events.clear()
        with Traffic(d, fleet.feeds) as traffic:
            d.client.tick()
        assert d.serving() == "2.0.0"
        assert traffic.failures == []
        assert traffic.by_version.get("1.0.0", 0) > 0
        order = [
            "downloading",
            "verifying",
            "installing",
            "loading",
            "validating",
            "swapping",
            "probation",
            "committed",
        ]
        for wanted in ("downloading", "verifying", "installing", "loading", "committed"):
            assert wanted in phases, (wanted, phases)
        ranks = [order.index(p) for p in phases]
        assert ranks == sorted(ranks), phases
        assert phases[-1] == "committed"
        for m in reports:
            if order.index(m["phase"]) < order.index("swapping"):
                assert (m["active_version"], m["target_version"]) == ("1.0.0", "2.0.0"), m
            elif m["phase"] in ("probation", "committed"):
                assert m["active_version"] == "2.0.0", m
        steps = d.steps()
        order = [
            "download_started",
            "download_finished",
            "verified",
            "staged",
            "loaded",
            "swapped",
            "probation_started",
            "committed",
        ]
        assert [s for s in steps if s in order] == order
        reported = _reported(fleet, d)
        assert reported["active_version"] == "2.0.0"
        assert reported["phase"] == "committed"
        assert reported["last_error"] is None
        assert fleet.cp.device(d.device_id)["reported"]["generation_seen"] > 0
        assert list((d.state_dir / "downloads").iterdir()) == []  # the archive is not kept
    finally:
        d.close()
        http.close()


def test_check_now_polls_at_once(fleet: Fleet, tmp_path: Path) -> None:
    d = Device(fleet.cp, tmp_path / "state", poll_interval_s=3600)
    stop = threading.Event()
    # Real time here: the run loop waits on an event; check_now must wake it long before 1 h.
    d.client._sleep = lambda s: None  # type: ignore[method-assign]
    thread = threading.Thread(target=d.client.run, args=(stop,), daemon=True)
    try:
        d.client.tick()
        fleet.cp.deploy("digits", "1.0.0", d.device_id)
        thread.start()
        d.client.check_now()
        deadline = threading.Event()
        for _ in range(200):
            if d.served.names() and d.serving() == "1.0.0":
                break
            deadline.wait(0.05)
        assert d.serving() == "1.0.0"
    finally:
        stop.set()
        d.client.check_now()
        thread.join(timeout=20)
        d.close()


# --- attacks and faults ----------------------------------------------------------------------


@pytest.fixture
def restore_artifact(fleet: Fleet) -> Iterator[Path]:
    path = fleet.cp.artifact_file("digits", "2.0.0")
    original = path.read_bytes()
    yield path
    path.write_bytes(original)
    os.truncate(path, len(original))


def _refused_then_recovers(fleet: Fleet, device: Device, what: str) -> None:
    assert device.serving() == "1.0.0"
    assert device.infer(fleet.feeds) == "1.0.0"
    reported = _reported(fleet, device)
    assert reported["active_version"] == "1.0.0"
    assert reported["phase"] == "failed"
    assert what in reported["last_error"]


def test_tampered_artifact_is_refused(fleet: Fleet, device: Device, restore_artifact: Path) -> None:
    _at_v1(fleet, device)
    data = bytearray(restore_artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped on the server's disk
    restore_artifact.write_bytes(bytes(data))
    fleet.cp.deploy("digits", "2.0.0", device.device_id)
    with Traffic(device, fleet.feeds) as traffic:
        device.client.tick()
    assert traffic.failures == []
    refused = [e for e in device.events if e.step == "refused"]
    assert len(refused) == 1
    assert "does not match the signed" in (refused[0].reason or "")
    _refused_then_recovers(fleet, device, "refused:")
    _assert_nothing_half_written(device)


def test_truncated_artifact_is_not_installed(
    fleet: Fleet, device: Device, restore_artifact: Path
) -> None:
    _at_v1(fleet, device)
    os.truncate(restore_artifact, restore_artifact.stat().st_size // 2)
    fleet.cp.deploy("digits", "2.0.0", device.device_id)
    device.client.tick()
    # The connection ends early every time: retried, then reported as transient (the network
    # or the control plane), never as a failure of the version.
    failed = [e for e in device.events if e.step == "retrying"]
    assert len(failed) == 1
    assert failed[0].details["failure_class"] == "transient"
    assert "giving up after 3 attempts" in (failed[0].reason or "")
    assert not [e for e in device.events if e.step == "download_failed"]
    assert device.serving() == "1.0.0"
    reported = _reported(fleet, device)
    assert (reported["active_version"], reported["phase"]) == ("1.0.0", "downloading")
    assert reported["last_error"].startswith("transient: ")
    assert "giving up" in reported["last_error"]
    assert "2.0.0" not in device.store.versions("digits")


def test_retry_after_the_artifact_is_fixed_succeeds(
    fleet: Fleet, device: Device, restore_artifact: Path
) -> None:
    _at_v1(fleet, device)
    original = restore_artifact.read_bytes()
    restore_artifact.write_bytes(original[:-10] + b"x" * 10)
    fleet.cp.deploy("digits", "2.0.0", device.device_id)
    device.client.tick()
    assert device.serving() == "1.0.0"
    restore_artifact.write_bytes(original)
    device.client.tick()  # still backing off: not retried yet
    started = [e for e in device.events if e.step == "download_started" and e.version == "2.0.0"]
    assert len(started) == 1
    device.clock.advance(3600)
    device.client.tick()
    assert device.serving() == "2.0.0"
    assert _reported(fleet, device)["phase"] == "committed"


def test_replayed_older_timestamp_is_refused(fleet: Fleet, device: Device) -> None:
    _at_v1(fleet, device)
    fleet.cp.deploy("digits", "2.0.0", device.device_id)
    device.client.tick()
    assert device.serving() == "2.0.0"  # it now trusts the newest timestamp
    ts = fleet.cp.ctx.tuf.metadata_dir / "timestamp.json"
    current = ts.read_bytes()
    ts.write_bytes(fleet.timestamp_after_v1)  # a mirror replays an old, validly signed one
    try:
        fleet.cp.deploy("digits", "1.0.0", device.device_id)
        device.client.tick()
    finally:
        ts.write_bytes(current)
    assert device.serving() == "2.0.0"
    reported = _reported(fleet, device)
    assert reported["phase"] == "failed"
    assert "BadVersionNumberError" in reported["last_error"]
    assert [e.step for e in device.events].count("refused") == 1


def test_expired_metadata_is_refused(fleet: Fleet, device: Device) -> None:
    _at_v1(fleet, device)
    tuf: TufRepository = fleet.cp.ctx.tuf
    month_ago = datetime.now(timezone.utc) - timedelta(days=30)
    # A repository that stopped re-signing a month ago: the timestamp ran out 23 days ago.
    frozen = TufRepository(tuf.metadata_dir, tuf.keys_dir, now=lambda: month_ago)
    frozen.add_targets({})
    try:
        fleet.cp.deploy("digits", "2.0.0", device.device_id)
        device.client.tick()
        assert device.serving() == "1.0.0"
        reported = _reported(fleet, device)
        assert "ExpiredMetadataError" in reported["last_error"]
        _assert_nothing_half_written(device)
    finally:
        tuf.add_targets({})  # re-signed now: fresh for the tests that follow


def test_desired_state_claiming_a_bigger_file_than_signed_is_refused(
    fleet: Fleet, tmp_path: Path
) -> None:
    artifact_requests: list[str] = []

    def record(request: httpx.Request) -> None:
        if "/v1/artifacts/" in request.url.path:
            artifact_requests.append(request.url.path)

    http = httpx.Client(timeout=10, event_hooks={"request": [record]})
    d = Device(fleet.cp, tmp_path / "state", http=http)
    ctx = fleet.cp.ctx

    def row(session: Any) -> VariantRow:
        found: VariantRow = session.scalar(
            select(VariantRow)
            .join(ModelVersion)
            .join(Model)
            .where(Model.name == "digits", ModelVersion.version == "2.0.0")
        )
        return found

    try:
        _at_v1(fleet, d)
        artifact_requests.clear()
        with ctx.sessions() as session:  # a compromised database points at a bigger file
            r = row(session)
            r.archive_size += 4096
            session.commit()
        ctx.desired.invalidate()
        fleet.cp.deploy("digits", "2.0.0", d.device_id)
        d.client.tick()
        assert artifact_requests == []  # refused before a byte was fetched
        assert d.serving() == "1.0.0"
        reported = _reported(fleet, d)
        assert "the desired state says" in reported["last_error"]
        assert "not downloading" in reported["last_error"]
        _assert_nothing_half_written(d)
    finally:
        with ctx.sessions() as session:
            r = row(session)
            r.archive_size -= 4096
            session.commit()
        ctx.desired.invalidate()
        d.close()
        http.close()


def test_server_that_never_stops_sending_is_cut_at_the_signed_length(
    fleet: Fleet, device: Device, restore_artifact: Path
) -> None:
    _at_v1(fleet, device)
    signed = restore_artifact.stat().st_size
    os.truncate(restore_artifact, 1 << 40)  # 1 TiB of zeros after the real bytes, sparse
    fleet.cp.deploy("digits", "2.0.0", device.device_id)
    with Traffic(device, fleet.feeds) as traffic:
        device.client.tick()
    assert traffic.failures == []
    refused = [e for e in device.events if e.step == "refused"]
    assert len(refused) == 1
    assert f"more than the signed length of {signed} bytes" in (refused[0].reason or "")
    _refused_then_recovers(fleet, device, "more than the signed length")
    _assert_nothing_half_written(device)


def test_control_plane_down_for_minutes_then_caught_up(fleet: Fleet, device: Device) -> None:
    _at_v1(fleet, device)
    fleet.cp.deploy("digits", "2.0.0", device.device_id)
    fleet.cp.stop()
    delays: list[float] = []
    try:
        with Traffic(device, fleet.feeds) as traffic:
            while sum(delays) < 15 * 60:  # fifteen minutes on the device's clock
                delays.append(device.tick_until_idle())
                assert device.serving() == "1.0.0"
        assert traffic.failures == []
        assert traffic.by_version["1.0.0"] > 0
    finally:
        fleet.cp.start()
    assert delays[1] > delays[0]  # backing off ...
    assert max(delays) <= 600 * 1.2  # ... up to the cap
    assert len(delays) < 20  # not hammering a control plane that is down
    device.client.tick()
    assert device.serving() == "2.0.0"
    assert _reported(fleet, device)["active_version"] == "2.0.0"


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_that_fills_mid_download_keeps_serving_and_resumes(
    fleet: Fleet, tiny_fs: Path, tmp_path: Path
) -> None:
    with fleet.cp.admin() as c:
        versions = [v["version"] for v in c.get("/v1/models/digits").json()["versions"]]
    if "3.0.0" not in versions:
        wide = wide_digits(fleet.sources["1.0.0"], tmp_path / "wide.onnx")
        fleet.cp.push(wide, fleet.cal, name="digits", version="3.0.0")
    size = fleet.cp.artifact_file("digits", "3.0.0").stat().st_size
    assert size > 1024 * 1024  # arrives in many chunks
    d = Device(
        fleet.cp,
        tiny_fs / "state",
        root=fleet.cp.root_json(tmp_path / "root.json"),
        download_config=DownloadConfig(free_space_margin_bytes=0, max_attempts=3),
        bandwidth_limit_bps=1 << 30,  # paces per chunk: the clock hook runs mid-transfer
    )
    filler = tiny_fs / "another-process.bin"

    def fill_once(_seconds: float) -> None:
        if not filler.exists():  # another process takes the disk once bytes are flowing
            free = shutil.disk_usage(tiny_fs).free
            filler.write_bytes(b"\0" * (free - 32 * 1024))

    try:
        _at_v1(fleet, d)
        fleet.cp.deploy("digits", "3.0.0", d.device_id)
        d.clock.on_sleep = fill_once
        with Traffic(d, fleet.feeds) as traffic:
            d.client.tick()
        assert traffic.failures == []
        assert d.serving() == "1.0.0"
        failed = [e for e in d.events if e.step == "retrying"]
        assert len(failed) == 1
        assert failed[0].details["failure_class"] == "local_io"
        assert "out of space while downloading" in (failed[0].reason or "")
        assert not [e for e in d.events if e.step == "download_failed"]
        reported = _reported(fleet, d)
        assert reported["phase"] == "downloading"
        assert reported["last_error"].startswith("local_io: out of space")
        part = next((d.state_dir / "downloads").glob("*.part"))
        kept = part.stat().st_size
        assert 0 < kept < size
        assert "3.0.0" not in d.store.versions("digits")
        filler.unlink()
        d.clock.on_sleep = None
        d.clock.advance(3600)
        d.client.tick()
        assert d.serving() == "3.0.0"
        finished = [e for e in d.events if e.step == "download_finished"][-1]
        assert finished.details["resumed_from"] == kept
    finally:
        d.close()


def test_a_rejected_version_is_offered_again_on_purpose_and_applied_once_fixed(
    fleet: Fleet, device: Device
) -> None:
    """The device cannot run 2.0.0 (its configuration pins a runtime the version has no
    variant for): rejected, reported as such, never retried while the desired state is the
    same. Once the device is fixed, the operator's retry (a new generation) offers it again and
    it is applied."""
    _at_v1(fleet, device)
    slot = device.served.get("digits").slot
    slot.backend_config = BackendConfig(pin_backend="openvino")
    fleet.cp.deploy("digits", "2.0.0", device.device_id)
    device.client.tick()
    assert device.serving() == "1.0.0"
    reported = _reported(fleet, device)
    assert reported["phase"] == "failed"
    assert reported["last_error"].startswith("rejected: ")
    assert "no variant fits this device" in reported["last_error"]
    assert "backend pinned to openvino" in reported["last_error"]
    with capture_logs() as logs:
        device.clock.advance(60)
        device.client.tick()  # the same desired state: refused, not tried
    assert not [e for e in logs if e["event"] == "update_started"]
    assert device.serving() == "1.0.0"

    slot.backend_config = BackendConfig()  # fixed on the device
    with fleet.cp.admin() as admin:
        r = admin.post(f"/v1/devices/{device.device_id}/retry", json={"model": "digits"})
        assert r.status_code in (200, 201), r.text
    with capture_logs() as logs:
        device.clock.advance(60)
        device.client.tick()
    assert any(e["event"] == "rejected_version_offered_again" for e in logs)
    assert device.serving() == "2.0.0"
    assert device.infer(fleet.feeds) == "2.0.0"

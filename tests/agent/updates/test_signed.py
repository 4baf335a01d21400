"""Signed metadata end to end: the control plane's TUF repository served over real HTTP, the
device's ngclient refusing each attack the update path must survive."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from agent.errors import TransientError, VerificationError
from agent.updates.signed import SignedMetadata
from control_plane.signing import ExpiryPolicy, SigningError, TufRepository

from .conftest import FileServer


@pytest.fixture
def repo(file_server: FileServer, tmp_path: Path) -> TufRepository:
    return TufRepository.init(file_server.root / "tuf", tmp_path / "keys", tmp_path / "offline")


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as c:
        yield c


def _device(
    tmp_path: Path,
    file_server: FileServer,
    repo: TufRepository,
    client: httpx.Client,
    name: str = "device",
) -> SignedMetadata:
    root = tmp_path / f"{name}-root.json"
    root.write_bytes(repo.root_bytes())
    return SignedMetadata(
        tmp_path / name / "tuf", f"{file_server.url}/tuf/", client, provisioned_root=root
    )


def test_signed_target_is_found(
    tmp_path: Path, file_server: FileServer, repo: TufRepository, client: httpx.Client
) -> None:
    sha = hashlib.sha256(b"bundle").hexdigest()
    repo.add_targets({"bundles/digits/1.0.0/onnx-int8.tar": (6, sha)})
    target = _device(tmp_path, file_server, repo, client).target(
        "bundles/digits/1.0.0/onnx-int8.tar"
    )
    assert (target.length, target.sha256) == (6, sha)


def test_unsigned_target_is_refused(
    tmp_path: Path, file_server: FileServer, repo: TufRepository, client: httpx.Client
) -> None:
    with pytest.raises(VerificationError, match="not a signed target"):
        _device(tmp_path, file_server, repo, client).target("bundles/evil.tar")


def test_replayed_older_timestamp_is_refused(
    tmp_path: Path, file_server: FileServer, repo: TufRepository, client: httpx.Client
) -> None:
    repo.add_targets({"a.tar": (1, "a" * 64)})
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.add_targets({"b.tar": (1, "b" * 64)})
    device = _device(tmp_path, file_server, repo, client)
    assert device.target("b.tar").sha256 == "b" * 64
    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)  # a mirror replays it
    with pytest.raises(VerificationError, match="BadVersionNumberError"):
        device.target("b.tar")


def test_expired_metadata_is_refused(
    tmp_path: Path, file_server: FileServer, client: httpx.Client
) -> None:
    long_ago = datetime.now(timezone.utc) - timedelta(days=30)
    stale = TufRepository.init(
        file_server.root / "tuf", tmp_path / "keys", tmp_path / "off", now=lambda: long_ago
    )
    stale.add_targets({"a.tar": (1, "a" * 64)})
    with pytest.raises(VerificationError, match="ExpiredMetadataError"):
        _device(tmp_path, file_server, stale, client).target("a.tar")


def test_forged_targets_metadata_is_refused(
    tmp_path: Path, file_server: FileServer, repo: TufRepository, client: httpx.Client
) -> None:
    """A mirror edits targets to point at its own file without the targets key."""
    repo.add_targets({"a.tar": (1, "a" * 64)})
    targets = sorted(repo.metadata_dir.glob("*.targets.json"))[-1]
    doc = json.loads(targets.read_text())
    doc["signed"]["targets"]["a.tar"]["hashes"]["sha256"] = "e" * 64
    doc["signed"]["targets"]["a.tar"]["length"] = 10**9
    targets.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="refused"):
        _device(tmp_path, file_server, repo, client).target("a.tar")


def test_endless_metadata_is_cut_off(
    tmp_path: Path, file_server: FileServer, repo: TufRepository, client: httpx.Client
) -> None:
    file_server.faults.endless.add("tuf/timestamp.json")
    with pytest.raises(TransientError, match="cannot fetch signed metadata"):
        _device(tmp_path, file_server, repo, client).target("a.tar")
    assert file_server.faults.bytes_sent < 10 * 1024 * 1024


def test_no_provisioned_root_is_a_clear_error(
    tmp_path: Path, file_server: FileServer, client: httpx.Client
) -> None:
    meta = SignedMetadata(tmp_path / "tuf", f"{file_server.url}/tuf/", client)
    with pytest.raises(VerificationError, match="no trusted TUF root"):
        meta.target("a.tar")


def test_root_from_another_fleet_is_refused(
    tmp_path: Path, file_server: FileServer, repo: TufRepository, client: httpx.Client
) -> None:
    other = TufRepository.init(tmp_path / "other", tmp_path / "ok", tmp_path / "oo")
    root = tmp_path / "other-root.json"
    root.write_bytes(other.root_bytes())
    meta = SignedMetadata(
        tmp_path / "d" / "tuf", f"{file_server.url}/tuf/", client, provisioned_root=root
    )
    with pytest.raises(VerificationError, match="refused"):
        meta.target("a.tar")


def test_refresh_resigns_roles_past_half_life(tmp_path: Path) -> None:
    clock = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    repo = TufRepository.init(tmp_path / "m", tmp_path / "k", tmp_path / "r", now=lambda: clock[0])
    assert repo.refresh() == []
    clock[0] += timedelta(days=4)  # timestamp (7 d) past half-life
    assert repo.refresh() == ["timestamp"]
    clock[0] += timedelta(days=16)  # snapshot (30 d) past half-life
    assert repo.refresh() == ["snapshot", "timestamp"]
    clock[0] += timedelta(days=30)  # targets (90 d) past half-life
    assert repo.refresh() == ["targets", "snapshot", "timestamp"]


def test_device_offline_for_weeks_still_updates(
    tmp_path: Path, file_server: FileServer, client: httpx.Client
) -> None:
    """The device's cached metadata expired while it was away; the service kept re-signing."""
    clock = [datetime.now(timezone.utc) - timedelta(days=40)]
    repo = TufRepository.init(
        file_server.root / "tuf",
        tmp_path / "k",
        tmp_path / "r",
        now=lambda: clock[0],
        expiry=ExpiryPolicy(),
    )
    repo.add_targets({"a.tar": (1, "a" * 64)})
    device = _device(tmp_path, file_server, repo, client)
    for _ in range(10):  # the service refreshes every few days while the robot is away
        clock[0] += timedelta(days=4)
        repo.refresh()
    repo.add_targets({"b.tar": (1, "b" * 64)})
    assert device.target("b.tar").sha256 == "b" * 64


def test_invalid_target_paths_are_refused(repo: TufRepository) -> None:
    for bad in ("/etc/passwd", "../x", "a/../../b", ""):
        with pytest.raises(SigningError, match="invalid target path"):
            repo.add_targets({bad: (1, "a" * 64)})


def test_missing_keys_are_a_clear_error(tmp_path: Path, repo: TufRepository) -> None:
    shutil.rmtree(repo.keys_dir)
    with pytest.raises(SigningError, match="cannot load the targets key"):
        TufRepository(repo.metadata_dir, repo.keys_dir)

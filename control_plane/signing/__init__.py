"""The control plane's TUF repository: signed metadata for every artifact it serves.

Owns the four top-level roles (root, targets, snapshot, timestamp), their keys and expiry, and
the metadata files under ``metadata_dir`` (served read-only at ``/tuf/``; consistent snapshots:
``N.root.json``, ``N.targets.json``, ``N.snapshot.json``, ``timestamp.json``). Publishing a
target re-signs targets, snapshot and timestamp; ``refresh()`` re-signs any role past half its
lifetime, so a timestamp never lapses while the service runs.

Keys: the root key is written to ``root_key_dir``, which the operator moves offline after
``init`` (it is needed again only to rotate keys); the online keys (targets, snapshot,
timestamp) stay in ``keys_dir`` with mode 0600. Serving the bytes is the HTTP layer's job.

Expiry (a device offline for weeks still updates: it always fetches a fresh timestamp first,
and the service keeps every role re-signed well before it expires):

    root       365 days  (offline key; rotate yearly)
    targets     90 days  (re-signed on every publish and at half-life)
    snapshot    30 days
    timestamp    7 days  (re-signed at half-life; bounds a freeze attack to a week)
"""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent._fs import write_file_atomic

__all__ = ["ExpiryPolicy", "SigningError", "TufRepository"]

ROLES = ("root", "targets", "snapshot", "timestamp")


class SigningError(Exception):
    """The TUF repository cannot be read, initialised or signed."""


@dataclass(frozen=True)
class ExpiryPolicy:
    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=30)
    timestamp: timedelta = timedelta(days=7)

    def of(self, role: str) -> timedelta:
        value: timedelta = getattr(self, role)
        return value


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class TufRepository:
    """Signed metadata on disk for the artifacts the control plane serves."""

    def __init__(
        self,
        metadata_dir: Path,
        keys_dir: Path,
        *,
        expiry: ExpiryPolicy | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.keys_dir = keys_dir
        self.expiry = expiry or ExpiryPolicy()
        self._now = now
        self._lock = threading.Lock()
        if not (metadata_dir / "timestamp.json").exists():
            raise SigningError(f"no TUF repository in {metadata_dir}: run init first")
        self._signers = {role: self._load_signer(role) for role in ROLES[1:]}

    # --- creation -------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        metadata_dir: Path,
        keys_dir: Path,
        root_key_dir: Path,
        *,
        expiry: ExpiryPolicy | None = None,
        now: Callable[[], datetime] = _utcnow,
    ) -> TufRepository:
        """Create keys and version-1 metadata for an empty repository (idempotent: an existing
        repository is opened, never overwritten)."""
        if (metadata_dir / "timestamp.json").exists():
            return cls(metadata_dir, keys_dir, expiry=expiry, now=now)
        expiry = expiry or ExpiryPolicy()
        for d in (metadata_dir, keys_dir, root_key_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        _write_key(root_key_dir / "root.pem", signers["root"])
        for role in ROLES[1:]:
            _write_key(keys_dir / f"{role}.pem", signers[role])
        t = now()
        root = Root(expires=t + expiry.root, consistent_snapshot=True)
        for role in ROLES:
            root.add_key(signers[role].public_key, role)
        targets = Targets(expires=t + expiry.targets)
        snapshot = Snapshot(expires=t + expiry.snapshot)
        timestamp = Timestamp(expires=t + expiry.timestamp)
        repo_root = Metadata(root)
        repo_root.sign(signers["root"])
        write_file_atomic(metadata_dir / "1.root.json", repo_root.to_bytes(JSONSerializer()))
        write_file_atomic(metadata_dir / "root.json", repo_root.to_bytes(JSONSerializer()))
        md_targets = Metadata(targets)
        md_targets.sign(signers["targets"])
        write_file_atomic(metadata_dir / "1.targets.json", md_targets.to_bytes(JSONSerializer()))
        snapshot.meta["targets.json"] = MetaFile(version=1)
        md_snapshot = Metadata(snapshot)
        md_snapshot.sign(signers["snapshot"])
        write_file_atomic(metadata_dir / "1.snapshot.json", md_snapshot.to_bytes(JSONSerializer()))
        timestamp.snapshot_meta = MetaFile(version=1)
        md_timestamp = Metadata(timestamp)
        md_timestamp.sign(signers["timestamp"])
        write_file_atomic(metadata_dir / "timestamp.json", md_timestamp.to_bytes(JSONSerializer()))
        return cls(metadata_dir, keys_dir, expiry=expiry, now=now)

    # --- reading ----------------------------------------------------------------------------

    def root_bytes(self) -> bytes:
        """The current root metadata: what a device is provisioned with."""
        return (self.metadata_dir / "root.json").read_bytes()

    def targets(self) -> dict[str, TargetFile]:
        return dict(self._load("targets").signed.targets)

    # --- publishing ---------------------------------------------------------------------------

    def add_targets(self, files: Mapping[str, tuple[int, str]]) -> None:
        """Publish targets: ``{target_path: (length, sha256)}``; re-signs the chain."""
        for path in files:
            if path.startswith("/") or ".." in path.split("/") or not path:
                raise SigningError(f"invalid target path {path!r}")
        with self._exclusive():
            md = self._load("targets")
            for path, (length, sha256) in files.items():
                md.signed.targets[path] = TargetFile(length, {"sha256": sha256}, path)
            self._publish_targets(md)

    def remove_targets(self, paths: list[str]) -> None:
        with self._exclusive():
            md = self._load("targets")
            for path in paths:
                md.signed.targets.pop(path, None)
            self._publish_targets(md)

    def refresh(self) -> list[str]:
        """Re-sign every online role that is past half its lifetime; returns the roles signed."""
        with self._exclusive():
            now = self._now()
            due = [
                role
                for role in ROLES[1:]
                if self._load(role).signed.expires - now < self.expiry.of(role) / 2
            ]
            if "targets" in due:
                self._publish_targets(self._load("targets"))
                return ["targets", "snapshot", "timestamp"]
            if "snapshot" in due:
                self._publish_snapshot(self._load("targets").signed.version)
                return ["snapshot", "timestamp"]
            if "timestamp" in due:
                self._publish_timestamp(self._load("snapshot").signed.version)
                return ["timestamp"]
            return []

    # --- internals ----------------------------------------------------------------------------

    def _publish_targets(self, md: Metadata[Targets]) -> None:
        md.signed.version += 1
        md.signed.expires = self._now() + self.expiry.targets
        md.signatures.clear()
        md.sign(self._signers["targets"])
        write_file_atomic(
            self.metadata_dir / f"{md.signed.version}.targets.json",
            md.to_bytes(JSONSerializer()),
        )
        self._publish_snapshot(md.signed.version)

    def _publish_snapshot(self, targets_version: int) -> None:
        md: Metadata[Snapshot] = self._load("snapshot")
        md.signed.version += 1
        md.signed.expires = self._now() + self.expiry.snapshot
        md.signed.meta["targets.json"] = MetaFile(version=targets_version)
        md.signatures.clear()
        md.sign(self._signers["snapshot"])
        write_file_atomic(
            self.metadata_dir / f"{md.signed.version}.snapshot.json",
            md.to_bytes(JSONSerializer()),
        )
        self._publish_timestamp(md.signed.version)

    def _publish_timestamp(self, snapshot_version: int) -> None:
        md: Metadata[Timestamp] = self._load("timestamp")
        md.signed.version += 1
        md.signed.expires = self._now() + self.expiry.timestamp
        md.signed.snapshot_meta = MetaFile(version=snapshot_version)
        md.signatures.clear()
        md.sign(self._signers["timestamp"])
        # Written last: it is what makes the new snapshot and targets visible to devices.
        write_file_atomic(self.metadata_dir / "timestamp.json", md.to_bytes(JSONSerializer()))

    def _load(self, role: str) -> Metadata[Any]:
        try:
            if role == "timestamp":
                return Metadata.from_file(str(self.metadata_dir / "timestamp.json"))
            if role == "snapshot":
                ts: Metadata[Timestamp] = Metadata.from_file(
                    str(self.metadata_dir / "timestamp.json")
                )
                version = ts.signed.snapshot_meta.version
            elif role == "targets":
                version = self._load("snapshot").signed.meta["targets.json"].version
            else:
                return Metadata.from_file(str(self.metadata_dir / "root.json"))
            return Metadata.from_file(str(self.metadata_dir / f"{version}.{role}.json"))
        except (OSError, ValueError) as exc:
            raise SigningError(
                f"cannot read {role} metadata in {self.metadata_dir}: {exc}"
            ) from exc

    def _load_signer(self, role: str) -> CryptoSigner:
        path = self.keys_dir / f"{role}.pem"
        try:
            private = load_pem_private_key(path.read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise SigningError(f"cannot load the {role} key from {path}: {exc}") from exc
        return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        # Threads of this process and other processes (CLI, workers) publish one at a time.
        with self._lock, (self.metadata_dir / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _write_key(path: Path, signer: CryptoSigner) -> None:
    write_file_atomic(path, signer.private_bytes, mode=0o600)

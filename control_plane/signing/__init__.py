"""The control plane's TUF repository: signed metadata for every artifact it serves.

Owns the four top-level roles (root, targets, snapshot, timestamp), their keys and expiry, and
the metadata files (served read-only at ``/tuf/``; consistent snapshots: ``N.root.json``,
``N.targets.json``, ``N.snapshot.json``, ``timestamp.json``). Publishing a target re-signs
targets, snapshot and timestamp; ``refresh()`` re-signs any role past half its lifetime, so a
timestamp never lapses while the service runs.

Where the files live is a ``NamedFiles`` (a local directory, or an object-store prefix that
every replica shares); a read-modify-sign cycle runs under ``lock`` (default: a file lock beside
a local metadata directory; the service passes a PostgreSQL advisory lock when replicas share
the files), so two publishers never sign the same version twice.

Keys: the root key is written to ``root_key_dir``, which the operator moves offline after
``init`` (it is needed again only to rotate keys); the online keys (targets, snapshot,
timestamp) stay in ``keys_dir`` (mode 0600 on disk). Serving the bytes is the HTTP layer's job.

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
from contextlib import AbstractContextManager, contextmanager
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

from control_plane.artifacts import DirectoryFiles, NamedFiles
from control_plane.errors import ControlPlaneError

__all__ = ["ExpiryPolicy", "PublishLock", "SigningError", "TufRepository"]

PublishLock = Callable[[], AbstractContextManager[object]]

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
        metadata_dir: Path | NamedFiles,
        keys_dir: Path | NamedFiles,
        *,
        expiry: ExpiryPolicy | None = None,
        now: Callable[[], datetime] = _utcnow,
        lock: PublishLock | None = None,
    ) -> None:
        self.files = _files(metadata_dir)
        self.keys = _files(keys_dir, mode=0o600)
        # Local directories keep their paths (tests and operators read them directly).
        self.metadata_dir = metadata_dir if isinstance(metadata_dir, Path) else None
        self.keys_dir = keys_dir if isinstance(keys_dir, Path) else None
        self.expiry = expiry or ExpiryPolicy()
        self._now = now
        self._lock = threading.Lock()
        self._shared_lock = lock
        if not self._exists("timestamp.json"):
            raise SigningError(f"no TUF repository in {_where(self.files)}: run init first")
        self._signers = {role: self._load_signer(role) for role in ROLES[1:]}

    def _exists(self, name: str) -> bool:
        try:
            return self.files.exists(name)
        except ControlPlaneError as exc:
            raise SigningError(f"cannot read {_where(self.files)}: {exc}") from exc

    # --- creation -------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        metadata_dir: Path | NamedFiles,
        keys_dir: Path | NamedFiles,
        root_key_dir: Path | NamedFiles,
        *,
        expiry: ExpiryPolicy | None = None,
        now: Callable[[], datetime] = _utcnow,
        lock: PublishLock | None = None,
    ) -> TufRepository:
        """Create keys and version-1 metadata for an empty repository (idempotent: an existing
        repository is opened, never overwritten; under ``lock``, so replicas starting together
        create one repository)."""
        files, keys, root_keys = (
            _files(metadata_dir),
            _files(keys_dir, mode=0o600),
            _files(root_key_dir, mode=0o600),
        )
        with lock() if lock is not None else _nothing():
            try:
                if not files.exists("timestamp.json"):
                    _create(files, keys, root_keys, expiry or ExpiryPolicy(), now())
            except ControlPlaneError as exc:
                raise SigningError(f"cannot initialise {_where(files)}: {exc}") from exc
        return cls(metadata_dir, keys_dir, expiry=expiry, now=now, lock=lock)

    # --- reading ----------------------------------------------------------------------------

    def root_bytes(self) -> bytes:
        """The current root metadata: what a device is provisioned with."""
        return self.metadata_bytes("root.json")

    def metadata_bytes(self, name: str) -> bytes:
        """One metadata file as served; ``NotFoundError`` when there is none by that name."""
        return self.files.read(name)

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
        self._write(f"{md.signed.version}.targets.json", md)
        self._publish_snapshot(md.signed.version)

    def _publish_snapshot(self, targets_version: int) -> None:
        md: Metadata[Snapshot] = self._load("snapshot")
        md.signed.version += 1
        md.signed.expires = self._now() + self.expiry.snapshot
        md.signed.meta["targets.json"] = MetaFile(version=targets_version)
        md.signatures.clear()
        md.sign(self._signers["snapshot"])
        self._write(f"{md.signed.version}.snapshot.json", md)
        self._publish_timestamp(md.signed.version)

    def _publish_timestamp(self, snapshot_version: int) -> None:
        md: Metadata[Timestamp] = self._load("timestamp")
        md.signed.version += 1
        md.signed.expires = self._now() + self.expiry.timestamp
        md.signed.snapshot_meta = MetaFile(version=snapshot_version)
        md.signatures.clear()
        md.sign(self._signers["timestamp"])
        # Written last: it is what makes the new snapshot and targets visible to devices.
        self._write("timestamp.json", md)

    def _write(self, name: str, md: Metadata[Any]) -> None:
        try:
            self.files.write(name, md.to_bytes(JSONSerializer()))
        except ControlPlaneError as exc:
            raise SigningError(f"cannot write {name} to {_where(self.files)}: {exc}") from exc

    def _read(self, name: str) -> Metadata[Any]:
        return Metadata.from_bytes(self.files.read(name))

    def _load(self, role: str) -> Metadata[Any]:
        try:
            if role == "timestamp":
                return self._read("timestamp.json")
            if role == "snapshot":
                ts: Metadata[Timestamp] = self._read("timestamp.json")
                version = ts.signed.snapshot_meta.version
            elif role == "targets":
                version = self._load("snapshot").signed.meta["targets.json"].version
            else:
                return self._read("root.json")
            return self._read(f"{version}.{role}.json")
        except (ControlPlaneError, OSError, ValueError) as exc:
            raise SigningError(
                f"cannot read {role} metadata in {_where(self.files)}: {exc}"
            ) from exc

    def _load_signer(self, role: str) -> CryptoSigner:
        try:
            private = load_pem_private_key(self.keys.read(f"{role}.pem"), None)
        except (ControlPlaneError, OSError, ValueError) as exc:
            raise SigningError(
                f"cannot load the {role} key from {_where(self.keys)}: {exc}"
            ) from exc
        return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        # Threads of this process one at a time; other processes and replicas through the
        # shared lock, or a file lock beside a local metadata directory.
        with self._lock:
            if self._shared_lock is not None:
                with self._shared_lock():
                    yield
            elif self.metadata_dir is not None:
                with (self.metadata_dir / ".lock").open("a") as f:
                    fcntl.flock(f, fcntl.LOCK_EX)
                    try:
                        yield
                    finally:
                        fcntl.flock(f, fcntl.LOCK_UN)
            else:
                yield


def _files(where: Path | NamedFiles, *, mode: int = 0o644) -> NamedFiles:
    return DirectoryFiles(where, mode=mode) if isinstance(where, Path) else where


def _where(files: NamedFiles) -> str:
    return str(files.directory) if isinstance(files, DirectoryFiles) else type(files).__name__


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _create(
    files: NamedFiles, keys: NamedFiles, root_keys: NamedFiles, expiry: ExpiryPolicy, t: datetime
) -> None:
    signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
    root_keys.write("root.pem", signers["root"].private_bytes)
    for role in ROLES[1:]:
        keys.write(f"{role}.pem", signers[role].private_bytes)
    root = Root(expires=t + expiry.root, consistent_snapshot=True)
    for role in ROLES:
        root.add_key(signers[role].public_key, role)
    targets = Targets(expires=t + expiry.targets)
    snapshot = Snapshot(expires=t + expiry.snapshot)
    timestamp = Timestamp(expires=t + expiry.timestamp)
    repo_root = Metadata(root)
    repo_root.sign(signers["root"])
    files.write("1.root.json", repo_root.to_bytes(JSONSerializer()))
    files.write("root.json", repo_root.to_bytes(JSONSerializer()))
    md_targets = Metadata(targets)
    md_targets.sign(signers["targets"])
    files.write("1.targets.json", md_targets.to_bytes(JSONSerializer()))
    snapshot.meta["targets.json"] = MetaFile(version=1)
    md_snapshot = Metadata(snapshot)
    md_snapshot.sign(signers["snapshot"])
    files.write("1.snapshot.json", md_snapshot.to_bytes(JSONSerializer()))
    timestamp.snapshot_meta = MetaFile(version=1)
    md_timestamp = Metadata(timestamp)
    md_timestamp.sign(signers["timestamp"])
    # Written last: its presence is what marks the repository as created.
    files.write("timestamp.json", md_timestamp.to_bytes(JSONSerializer()))

"""The on-disk versioned model store under ``<state_dir>/models``.

Layout::

    models/.lock                          flock held by every change (agent and CLI alike)
    models/.staging/<id>/                 installs and removals in progress (wiped at start-up)
    models/<name>/<version>/              a complete, verified bundle: manifest.json + its files
    models/<name>/<version>/.install.json when and from where it was installed
    models/<name>/active.json             the active pointer: {"version", "previous", ...}

Crash safety comes from ordering: an install streams every file into ``.staging`` while checking
its size and sha256 against the manifest, fsyncs each file and directory, then renames the
directory into place, so a version directory only ever exists complete. The pointer is written to
a temp file, fsynced and ``os.replace``d over ``active.json``. ``recover()`` at start-up wipes
``.staging``, discards any version that does not verify and repairs a pointer to something
missing, logging each action.

This module owns the files and the pointer. Loading, validating and serving a version belong to
``agent.models.slots``; the update state machine (probation, rollback) to
``agent.models.probation``; the bundle format to ``agent.models.bundle``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from agent._fs import fsync_dir, write_file_atomic
from agent.contracts.manifest import MANIFEST_FILE, NAME_RE, BundleManifest, FileEntry, semver_key
from agent.errors import BundleError, StoreError
from agent.events import EventBus
from agent.logs import get_logger
from agent.models.bundle import ArchiveReader, check_entry, parse_manifest

__all__ = [
    "POINTER_FILE",
    "ActivePointer",
    "InstalledVersion",
    "ModelStore",
    "RecoveryReport",
    "fsync_dir",
    "write_file_atomic",
]

log = get_logger(__name__)

POINTER_FILE = "active.json"
INSTALL_FILE = ".install.json"
STAGING = ".staging"
_CHUNK = 1 << 20
_SPACE_MARGIN = 64 * 1024  # bytes for directories, the manifest copy and install metadata
_NAME = re.compile(NAME_RE)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

FileWriter = Callable[[Path], IO[bytes]]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_tree(root: Path) -> None:
    """fsync every directory under ``root`` (files were fsynced as they were written)."""
    for dirpath, _, _ in os.walk(root, topdown=False):
        fsync_dir(Path(dirpath))


class ActivePointer(BaseModel):
    """``models/<name>/active.json``: what the agent serves after a restart."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    version: str
    previous: str | None = None
    updated_at: datetime


@dataclass(frozen=True)
class InstalledVersion:
    name: str
    version: str
    path: Path
    manifest: BundleManifest
    size_bytes: int
    already_present: bool = False


@dataclass
class RecoveryReport:
    """What ``recover()`` did; ``actions`` are short sentences for the log and the CLI."""

    staging_removed: int = 0
    discarded: list[tuple[str, str, str]] = field(default_factory=list)  # (name, version, why)
    pointers_repaired: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.actions


class _Source(Protocol):
    def read(self, rel: str) -> bytes: ...

    def open(self, rel: str) -> IO[bytes]: ...

    def close(self) -> None: ...


class _DirSource:
    def __init__(self, root: Path) -> None:
        self._root = root

    def read(self, rel: str) -> bytes:
        with self.open(rel) as f:
            return f.read()

    def open(self, rel: str) -> IO[bytes]:
        try:
            return (self._root / rel).open("rb")
        except FileNotFoundError as exc:
            raise BundleError(f"file {rel} is missing from the bundle") from exc
        except OSError as exc:
            raise BundleError(f"file {rel} cannot be read: {exc}") from exc

    def close(self) -> None:
        pass


def _open_source(source: Path) -> _Source:
    if source.is_dir():
        return _DirSource(source)
    if source.is_file():
        return ArchiveReader(source)
    raise BundleError(f"bundle not found: {source}")


def _exclusive_writer(path: Path) -> IO[bytes]:
    return path.open("xb")


class ModelStore:
    """Several models by name, several versions each, one active pointer per model.

    Every change holds an exclusive ``flock`` on ``models/.lock``, so the agent and the
    ``edge-agent models`` CLI can both use the store. ``file_writer`` opens a file for writing
    during installs (a seam for fault injection; the default creates it exclusively).
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        keep_versions: int = 3,
        bus: EventBus | None = None,
        file_writer: FileWriter = _exclusive_writer,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        if keep_versions < 1:
            raise StoreError("keep_versions must be at least 1")
        self.root = state_dir / "models"
        self.keep_versions = keep_versions
        self._bus = bus
        self._file_writer = file_writer
        self._now = now
        self._rlock = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None

    # --- locking -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._rlock:
            if self._depth == 0:
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as exc:
                    raise StoreError(f"cannot open the model store at {self.root}: {exc}") from exc
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # releases the flock
                    self._lock_fd = None

    # --- queries -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def versions(self, name: str) -> list[str]:
        """Installed versions of ``name``, oldest first (semantic version order)."""
        model_dir = self.root / _checked_name(name)
        if not model_dir.is_dir():
            return []
        found = []
        for p in model_dir.iterdir():
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file():
                try:
                    semver_key(p.name)
                except ValueError:
                    continue
                found.append(p.name)
        return sorted(found, key=semver_key)

    def path(self, name: str, version: str) -> Path:
        _checked_version(version)
        return self.root / _checked_name(name) / version

    def has(self, name: str, version: str) -> bool:
        return (self.path(name, version) / MANIFEST_FILE).is_file()

    def manifest(self, name: str, version: str) -> BundleManifest:
        path = self.path(name, version)
        if not path.is_dir():
            raise StoreError(f"{name} {version} is not installed")
        try:
            data = (path / MANIFEST_FILE).read_bytes()
        except OSError as exc:
            raise StoreError(f"{name} {version}: cannot read its manifest: {exc}") from exc
        return parse_manifest(data, source=f"{name} {version} manifest")

    def verify(self, name: str, version: str, *, deep: bool = True) -> BundleManifest:
        """The manifest, after checking every file's size (and sha256 when ``deep``)."""
        manifest = self.manifest(name, version)
        if manifest.name != name or manifest.version != version:
            raise BundleError(
                f"directory {name}/{version} holds {manifest.name} {manifest.version}", model=name
            )
        root = self.path(name, version)
        for entry in manifest.all_files():
            problem = check_entry(root / entry.path, entry, deep=deep)
            if problem:
                raise BundleError(f"{version}: {problem}", model=name)
        return manifest

    def installed_at(self, name: str, version: str) -> datetime | None:
        try:
            raw = json.loads((self.path(name, version) / INSTALL_FILE).read_text("utf-8"))
            return datetime.fromisoformat(raw["installed_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def size_bytes(self, name: str, version: str) -> int:
        return sum(e.size for e in self.manifest(name, version).all_files())

    def pointer(self, name: str) -> ActivePointer | None:
        path = self.root / _checked_name(name) / POINTER_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{name}: cannot read the active pointer: {exc}") from exc
        try:
            return ActivePointer.model_validate_json(data)
        except PydanticValidationError as exc:
            raise StoreError(
                f"{name}: the active pointer {path} is corrupt (start-up recovery repairs it)"
            ) from exc

    def active(self, name: str) -> str | None:
        pointer = self.pointer(name)
        return pointer.version if pointer else None

    # --- install -----------------------------------------------------------------------------

    def install(self, source: Path) -> InstalledVersion:
        """Install a bundle directory or ``.tar``/``.tar.gz`` archive, verifying every file.

        Raises ``BundleError`` for a bad bundle (manifest, missing file, size, digest) and
        ``StoreError`` for the disk (full, unwritable); either way nothing stays behind and the
        active pointer is untouched. Installing the same bundle twice is a no-op.
        """
        label = source.name
        with self._locked():
            staging: Path | None = None
            manifest: BundleManifest | None = None
            try:
                reader = _open_source(source)
            except BundleError as exc:
                self._emit("refused", model=label, reason=str(exc))
                raise
            try:
                manifest_bytes = reader.read(MANIFEST_FILE)
                manifest = parse_manifest(manifest_bytes, source=f"{label}: {MANIFEST_FILE}")
                label = manifest.name
                existing = self._existing(manifest, manifest_bytes)
                if existing is not None:
                    return existing
                files = manifest.all_files()
                total = sum(e.size for e in files) + len(manifest_bytes)
                self._check_space(manifest, total)
                staging = self._new_staging(f"{manifest.name}-{manifest.version}")
                for entry in files:
                    self._copy_verified(reader, entry, staging, manifest.name)
                self._write_new(staging / MANIFEST_FILE, manifest_bytes)
                meta = {"installed_at": self._now().isoformat(), "source": str(source)}
                self._write_new(staging / INSTALL_FILE, json.dumps(meta).encode())
                _fsync_tree(staging)
                model_dir = self.root / manifest.name
                if not model_dir.is_dir():
                    model_dir.mkdir()
                    fsync_dir(self.root)
                staging.rename(model_dir / manifest.version)
                staging = None
                fsync_dir(model_dir)
                fsync_dir(self.root / STAGING)
            except BundleError as exc:
                self._emit("refused", model=label, reason=str(exc))
                log.warning("store_install_refused", source=str(source), reason=str(exc))
                raise
            except OSError as exc:
                error = self._disk_error(exc, manifest, label)
                self._emit("failed", model=label, reason=str(error))
                log.error("store_install_failed", source=str(source), reason=str(error))
                raise error from exc
            finally:
                reader.close()
                if staging is not None:
                    shutil.rmtree(staging, ignore_errors=True)
            log.info("store_installed", model=manifest.name, version=manifest.version, bytes=total)
            self._emit("staged", model=manifest.name, version=manifest.version, size_bytes=total)
            self.gc(manifest.name)
            return InstalledVersion(
                manifest.name,
                manifest.version,
                self.path(manifest.name, manifest.version),
                manifest,
                total,
            )

    def _existing(self, manifest: BundleManifest, manifest_bytes: bytes) -> InstalledVersion | None:
        path = self.path(manifest.name, manifest.version)
        if not path.exists():
            return None
        try:
            present = self.verify(manifest.name, manifest.version, deep=False)
        except (BundleError, StoreError) as exc:
            raise StoreError(
                f"{manifest.name} {manifest.version} is installed but damaged ({exc}); "
                "remove it or restart the agent to let recovery discard it"
            ) from exc
        if present != manifest:
            raise StoreError(
                f"{manifest.name} {manifest.version} is already installed with different "
                "content; publish a new version instead"
            )
        log.info("store_already_installed", model=manifest.name, version=manifest.version)
        size = sum(e.size for e in manifest.all_files()) + len(manifest_bytes)
        return InstalledVersion(manifest.name, manifest.version, path, present, size, True)

    def _check_space(self, manifest: BundleManifest, total: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free < total + _SPACE_MARGIN:
            raise StoreError(
                f"not enough free space to install {manifest.name} {manifest.version}: "
                f"needs {total + _SPACE_MARGIN} bytes, {free} free in {self.root}"
            )

    def _new_staging(self, label: str) -> Path:
        base = self.root / STAGING
        base.mkdir(exist_ok=True)
        path = base / f"{label}.{uuid.uuid4().hex[:8]}"
        path.mkdir()
        return path

    def _copy_verified(self, reader: _Source, entry: FileEntry, staging: Path, model: str) -> None:
        dest = staging / entry.path
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        with reader.open(entry.path) as fin, self._file_writer(dest) as fout:
            while block := fin.read(_CHUNK):
                size += len(block)
                if size > entry.size:
                    raise BundleError(
                        f"file {entry.path} is larger than the manifest's {entry.size} bytes",
                        model=model,
                    )
                digest.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        if size != entry.size:
            raise BundleError(
                f"file {entry.path} has {size} bytes where the manifest says {entry.size}",
                model=model,
            )
        if digest.hexdigest() != entry.sha256:
            raise BundleError(
                f"file {entry.path}: sha256 {digest.hexdigest()[:16]}... does not match the "
                f"manifest's {entry.sha256[:16]}...",
                model=model,
            )

    def _write_new(self, path: Path, data: bytes) -> None:
        with self._file_writer(path) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _disk_error(self, exc: OSError, manifest: BundleManifest | None, label: str) -> StoreError:
        what = f"{manifest.name} {manifest.version}" if manifest else label
        if exc.errno in _DISK_FULL:
            return StoreError(
                f"disk full while installing {what} into {self.root} ({exc.strerror}); "
                "nothing was installed, the active version is unchanged"
            )
        return StoreError(f"cannot install {what}: {exc}")

    # --- the active pointer ------------------------------------------------------------------

    def activate(self, name: str, version: str) -> ActivePointer:
        """Point ``name`` at ``version`` (installed, files present); the old one becomes
        ``previous``. Atomic: a crash leaves the old pointer or the new one."""
        with self._locked():
            try:
                self.verify(name, version, deep=False)
            except BundleError as exc:
                raise StoreError(f"cannot activate {name} {version}: {exc}") from exc
            old = self.pointer(name)
            if old is not None and old.version == version:
                return old
            previous = old.version if old else None
            pointer = self._write_pointer(name, version, previous)
            log.info("store_activated", model=name, version=version, previous=previous)
            self._emit("activated", model=name, version=version, from_version=previous)
            return pointer

    def rollback(self, name: str) -> ActivePointer:
        """Point ``name`` back at its previous version; ``previous`` is cleared so a second
        rollback does not flip back to the version just left."""
        with self._locked():
            old = self.pointer(name)
            if old is None:
                raise StoreError(f"{name} has no active version")
            if old.previous is None:
                raise StoreError(
                    f"{name} has no previous version recorded; use activate NAME VERSION"
                )
            if not self.has(name, old.previous):
                raise StoreError(f"{name}: previous version {old.previous} is no longer installed")
            pointer = self._write_pointer(name, old.previous, None)
            log.info("store_rolled_back", model=name, version=old.previous, left=old.version)
            self._emit(
                "activated",
                model=name,
                version=old.previous,
                from_version=old.version,
                reason="rollback",
            )
            return pointer

    def set_pointer(self, name: str, version: str, previous: str | None) -> ActivePointer:
        """Write the pointer exactly as given (used by the update driver's rollback)."""
        with self._locked():
            if not self.has(name, version):
                raise StoreError(f"cannot activate {name} {version}: not installed")
            return self._write_pointer(name, version, previous)

    def _write_pointer(self, name: str, version: str, previous: str | None) -> ActivePointer:
        pointer = ActivePointer(version=version, previous=previous, updated_at=self._now())
        try:
            write_file_atomic(self.root / name / POINTER_FILE, pointer.model_dump_json().encode())
        except OSError as exc:
            reason = "disk full" if exc.errno in _DISK_FULL else str(exc)
            raise StoreError(
                f"cannot flip the active pointer of {name} to {version}: {reason}; "
                "the active version is unchanged"
            ) from exc
        return pointer

    # --- removal and garbage collection ------------------------------------------------------

    def remove(self, name: str, version: str, *, reason: str = "removed") -> None:
        """Delete a version that is neither active nor previous (crash-safe: it is first
        renamed into ``.staging``, which start-up recovery wipes)."""
        with self._locked():
            pointer = self.pointer(name)
            if pointer is not None and version in (pointer.version, pointer.previous):
                raise StoreError(f"{name} {version} is active or previous; it cannot be removed")
            self._discard(name, version, reason)

    def _discard(self, name: str, version: str, reason: str) -> None:
        path = self.path(name, version)
        if not path.exists():
            return
        trash = self._new_staging(f"trash-{name}-{version}")
        try:
            path.rename(trash / "v")
            fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot remove {name} {version}: {exc}") from exc
        shutil.rmtree(trash, ignore_errors=True)
        log.info("store_version_removed", model=name, version=version, reason=reason)
        self._emit("removed", model=name, version=version, reason=reason)

    def gc(self, name: str, *, protect: Iterable[str] = ()) -> list[str]:
        """Keep the newest ``keep_versions`` versions plus active, previous and ``protect``."""
        with self._locked():
            versions = self.versions(name)
            try:
                pointer = self.pointer(name)
            except StoreError:
                return []  # recovery repairs the pointer first; never delete on a guess
            keep = set(versions[-self.keep_versions :]) | set(protect)
            if pointer is not None:
                keep |= {pointer.version, pointer.previous or pointer.version}
            removed = [v for v in versions if v not in keep]
            for version in removed:
                self._discard(name, version, f"garbage collected (keep {self.keep_versions})")
            return removed

    # --- start-up recovery -------------------------------------------------------------------

    def recover(
        self, *, deep: bool = True, choose: Callable[[str, list[str]], str | None] | None = None
    ) -> RecoveryReport:
        """Wipe ``.staging`` and temp files, discard versions that do not verify, repair
        pointers to something missing. Logs every action; safe to run at every start.

        ``choose(name, good_versions)`` (oldest first) picks the version a lost, corrupt or
        dangling pointer is repaired to (the daemon asks the update journal's verdicts, so a
        version judged bad is never picked while a good one is installed); with it, a model
        whose pointer is missing while versions are installed gets one too. Without it the
        previous version, else the newest, is picked."""
        report = RecoveryReport()
        with self._locked():
            staging = self.root / STAGING
            if staging.is_dir():
                for leftover in staging.iterdir():
                    _remove_path(leftover)
                    report.staging_removed += 1
                    report.actions.append(f"removed unfinished install or removal {leftover.name}")
                    log.warning("store_staging_discarded", path=str(leftover))
                fsync_dir(staging)
            for name in self.names():
                self._recover_model(name, report, deep=deep, choose=choose)
        if report.clean:
            log.info("store_recovery_clean", root=str(self.root))
        return report

    def _recover_model(
        self,
        name: str,
        report: RecoveryReport,
        *,
        deep: bool,
        choose: Callable[[str, list[str]], str | None] | None,
    ) -> None:
        model_dir = self.root / name
        for entry in model_dir.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                _remove_path(entry)
                report.actions.append(f"{name}: removed temp file {entry.name}")
                log.warning("store_temp_discarded", model=name, path=str(entry))
            elif entry.is_dir() and entry.name not in self.versions(name):
                _remove_path(entry)
                report.actions.append(f"{name}: removed stray directory {entry.name}")
                log.warning("store_stray_discarded", model=name, path=str(entry))
        good: list[str] = []
        for version in self.versions(name):
            try:
                self.verify(name, version, deep=deep)
            except (BundleError, StoreError) as exc:
                self._discard(name, version, f"failed verification at start-up: {exc}")
                report.discarded.append((name, version, str(exc)))
                report.actions.append(f"{name}: discarded {version} ({exc})")
                continue
            good.append(version)
        try:
            pointer = self.pointer(name)
            corrupt = False
        except StoreError:
            pointer, corrupt = None, True
        if pointer is None and not corrupt and (choose is None or not good):
            return
        fixed_version: str | None = None
        fixed_previous: str | None = None
        if pointer is not None and pointer.version in good:
            if pointer.previous is None or pointer.previous in good:
                return
            fixed_version = pointer.version
        elif choose is not None and good:
            fixed_version = choose(name, good)
        elif pointer is not None and pointer.previous in good:
            fixed_version = pointer.previous
        elif good:
            fixed_version = good[-1]
        was = pointer.version if pointer else None
        if fixed_version is None:
            (model_dir / POINTER_FILE).unlink(missing_ok=True)
            fsync_dir(model_dir)
            report.actions.append(f"{name}: removed pointer to {was} (no valid version left)")
        else:
            self._write_pointer(name, fixed_version, fixed_previous)
            report.actions.append(f"{name}: pointer repaired from {was} to {fixed_version}")
        report.pointers_repaired.append((name, was, fixed_version))
        log.warning("store_pointer_repaired", model=name, was=was, now=fixed_version)

    # --- events ------------------------------------------------------------------------------

    def _emit(
        self,
        step: Literal["staged", "refused", "failed", "activated", "removed"],
        *,
        model: str,
        **fields: Any,
    ) -> None:
        if self._bus is not None:
            self._bus.emit(step, model=model, **fields)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _checked_name(name: str) -> str:
    if not _NAME.match(name):
        raise StoreError(f"invalid model name: {name!r}")
    return name


def _checked_version(version: str) -> str:
    try:
        semver_key(version)
    except ValueError as exc:
        raise StoreError(f"invalid version: {version!r} (expected a semantic version)") from exc
    return version

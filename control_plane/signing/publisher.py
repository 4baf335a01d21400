"""Keeping the TUF repository in step with the registry, and fresh while the service runs.

Owns three things the service does with ``control_plane.signing.TufRepository``: where it lives
under the data directory (``open_repository``), publishing every downloadable bundle archive of
the registry as a target (``publish_archives``: idempotent, called at start-up and inside every
finishing build's transaction, so a version is ``ready`` only once its archives are signed),
and re-signing roles before they expire (``MetadataRefresher``, a background thread calling
``refresh()``). Serving the files is ``control_plane.api.routes.tuf``'s job.

Layout under the data directory::

    tuf/metadata/           what /tuf/ serves (N.root.json, N.targets.json, N.snapshot.json,
                            timestamp.json)
    tuf/keys/               online keys: targets, snapshot, timestamp (0600)
    tuf/root-key-offline/   the root key: move it off this machine after the first start
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.logs import get_logger
from control_plane.db.models import Model, ModelVersion, VariantRow
from control_plane.registry import archive_path
from control_plane.signing import SigningError, TufRepository

__all__ = [
    "MetadataRefresher",
    "open_repository",
    "publish_archives",
    "publish_registry",
    "registry_archives",
    "unsigned_archives",
]

log = get_logger(__name__)

ROOT_KEY_DIR = "root-key-offline"


def open_repository(data_dir: Path, root_key_dir: Path | None = None) -> TufRepository:
    """The service's repository, created with fresh keys on first use."""
    base = data_dir / "tuf"
    created = not (base / "metadata" / "timestamp.json").exists()
    repo = TufRepository.init(base / "metadata", base / "keys", root_key_dir or base / ROOT_KEY_DIR)
    if created:
        log.warning(
            "tuf_repository_created",
            metadata=str(repo.metadata_dir),
            root_key_dir=str(root_key_dir or base / ROOT_KEY_DIR),
            advice="move the root key offline; provision devices with `edgectl tuf root`",
        )
    return repo


def registry_archives(session: Session) -> dict[str, tuple[int, str]]:
    """Every downloadable bundle archive: ``{target path: (length, sha256)}``."""
    rows = session.execute(
        select(
            Model.name,
            ModelVersion.version,
            VariantRow.variant_id,
            VariantRow.archive_size,
            VariantRow.archive_sha256,
        )
        .join(ModelVersion, VariantRow.version_id == ModelVersion.id)
        .join(Model, ModelVersion.model_id == Model.id)
        .where(VariantRow.archive_sha256.is_not(None))
    ).all()
    return {
        archive_path(name, version, variant): (int(size), str(sha))
        for name, version, variant, size, sha in rows
        if size is not None and sha is not None
    }


def unsigned_archives(
    repo: TufRepository, archives: Mapping[str, tuple[int, str]]
) -> dict[str, tuple[int, str]]:
    """The archives of ``{path: (length, sha256)}`` that are not signed targets as given."""
    signed = repo.targets()
    missing = {}
    for path, (length, sha256) in archives.items():
        have = signed.get(path)
        if have is None or have.length != length or have.hashes.get("sha256") != sha256:
            missing[path] = (length, sha256)
    return missing


def publish_archives(repo: TufRepository, session: Session) -> list[str]:
    """Sign every registry archive that is not yet a target with the same length and digest;
    returns the paths published (none: nothing re-signed)."""
    missing = unsigned_archives(repo, registry_archives(session))
    if missing:
        repo.add_targets(missing)
        log.info("tuf_targets_published", paths=sorted(missing))
    return sorted(missing)


class MetadataRefresher:
    """Calls ``repo.refresh()`` every ``interval_s`` in a daemon thread until ``stop()``."""

    def __init__(
        self,
        repo: TufRepository,
        interval_s: float,
        *,
        wait: Callable[[threading.Event, float], bool] = lambda e, s: e.wait(s),
    ) -> None:
        self._repo = repo
        self._interval_s = interval_s
        self._wait = wait
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuf-refresh", daemon=True)

    def start(self) -> MetadataRefresher:
        self._thread.start()
        return self

    def refresh_once(self) -> list[str]:
        try:
            roles = self._repo.refresh()
        except SigningError as exc:
            log.error("tuf_refresh_failed", reason=str(exc))
            return []
        if roles:
            log.info("tuf_metadata_refreshed", roles=roles)
        return roles

    def _run(self) -> None:
        self.refresh_once()
        while not self._wait(self._stop, self._interval_s):
            self.refresh_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def publish_registry(sessions: sessionmaker[Session], repo: TufRepository) -> list[str]:
    """``publish_archives`` in a session of its own; a failure is logged, never raised (the
    next build or the next start publishes what is missing)."""
    try:
        with sessions() as session:
            return publish_archives(repo, session)
    except (SigningError, SQLAlchemyError, OSError) as exc:
        log.error("tuf_publish_failed", reason=f"{type(exc).__name__}: {exc}")
        return []

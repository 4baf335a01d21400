"""Model deltas for the (from, to) pairs the fleet needs: built lazily, signed, cached, collected.

Owns which deltas exist. When a device's desired state is computed and the device reports
serving version N (variant A) of a model whose desired version is M (variant B), ``offer``
looks for the signed delta ``deltas/<model>/<M>/<B>/<N>/<A>.zst``; the first device that needs
a pair builds it (``agent.contracts.delta.make_delta``: zstd with N's archive as the dictionary),
stores the blob in the artifact store and publishes it as a TUF target of its own beside the
full archive, under a lock per pair so devices that poll together build it once (one that
waits more than ``build_wait_s`` for another's build is offered the full archive this time).
A delta that is not smaller than ``max_ratio`` of the full archive, or whose build fails, is
not offered (remembered in this process, so it is not rebuilt at every poll); the device then
downloads the full archive as before.

The TUF targets are the index: a delta's target path names its pair, its length and sha256 are
the blob's, so every replica sees the same deltas. ``collect`` removes the targets and blobs of
deltas that no device has needed for ``keep_s`` (what this process has seen; a delta is never
removed within ``keep_s`` of this process's start).
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.contracts.delta import MAX_BASE_BYTES, make_delta
from agent.contracts.state import DesiredDelta, DesiredModel, DesiredState
from agent.logs import get_logger
from control_plane.artifacts import ArtifactStore
from control_plane.db.models import Device, Model, ModelVersion, VariantRow
from control_plane.errors import ControlPlaneError
from control_plane.registry import archive_path
from control_plane.signing import SigningError, TufRepository

__all__ = ["DELTA_PREFIX", "DeltaInfo", "DeltaService", "delta_path", "parse_delta_path"]

log = get_logger(__name__)

DELTA_PREFIX = "deltas/"


def delta_path(
    model: str, from_version: str, from_variant: str, to_version: str, to_variant: str
) -> str:
    """The TUF target path (and download path under ``/v1/artifacts/``) of a delta."""
    return f"{DELTA_PREFIX}{model}/{to_version}/{to_variant}/{from_version}/{from_variant}.zst"


@dataclass(frozen=True)
class DeltaInfo:
    path: str
    model: str
    from_version: str
    from_variant: str
    to_version: str
    to_variant: str
    size: int
    sha256: str
    full_size: int | None = None  # the full archive's, when it is a signed target


def parse_delta_path(path: str, size: int = 0, sha256: str = "") -> DeltaInfo | None:
    parts = path.split("/")
    if len(parts) != 6 or parts[0] + "/" != DELTA_PREFIX or not parts[5].endswith(".zst"):
        return None
    _, model, to_version, to_variant, from_version, from_file = parts
    return DeltaInfo(
        path,
        model,
        from_version,
        from_file.removesuffix(".zst"),
        to_version,
        to_variant,
        size,
        sha256,
    )


class DeltaService:
    """Offers, builds and collects deltas; one per control-plane process."""

    def __init__(
        self,
        *,
        store: ArtifactStore,
        tuf: TufRepository,
        work_dir: Path,
        max_ratio: float = 0.8,
        keep_s: float = 7 * 24 * 3600.0,
        collect_interval_s: float = 3600.0,
        build_wait_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._tuf = tuf
        self._work_dir = work_dir
        self._max_ratio = max_ratio
        self._keep_s = keep_s
        self._collect_interval_s = collect_interval_s
        self._build_wait_s = build_wait_s
        self._clock = clock
        self._started = clock()
        self._last_collect = self._started
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._useless: dict[str, str] = {}  # pair path -> why no delta is offered for it
        self._needed: dict[str, float] = {}  # delta path -> when a device last needed it

    # --- reading ---------------------------------------------------------------------------

    def signed(self, model: str | None = None) -> list[DeltaInfo]:
        """The signed deltas (of ``model``), as the TUF targets list them."""
        out = []
        targets = self._tuf.targets()
        for path, target in targets.items():
            info = parse_delta_path(path, target.length, target.hashes.get("sha256", ""))
            if info is not None and (model is None or info.model == model):
                full = targets.get(archive_path(info.model, info.to_version, info.to_variant))
                out.append(replace(info, full_size=full.length if full else None))
        return sorted(out, key=lambda d: (d.model, d.to_version, d.from_version, d.path))

    def find(self, path: str) -> DeltaInfo | None:
        target = self._tuf.targets().get(path)
        if target is None:
            return None
        return parse_delta_path(path, target.length, target.hashes.get("sha256", ""))

    # --- offering --------------------------------------------------------------------------

    def offer(self, session: Session, device: Device, state: DesiredState) -> DesiredState:
        """``state`` with a delta on each entry whose version differs from the one the device
        reports serving, where a delta exists or can be built now."""
        serving = _serving(device.reported)
        models = []
        changed = False
        for entry in state.models:
            have = serving.get(entry.name)
            delta = None
            if have is not None and have[0] != entry.version:
                delta = self._delta_for(session, entry, have[0], have[1])
            if delta is not None:
                changed = True
            models.append(entry if delta is None else entry.model_copy(update={"delta": delta}))
        if self._clock() - self._last_collect >= self._collect_interval_s:
            self.collect()
        return state.model_copy(update={"models": tuple(models)}) if changed else state

    def _delta_for(
        self, session: Session, entry: DesiredModel, from_version: str, from_variant: str
    ) -> DesiredDelta | None:
        path = delta_path(entry.name, from_version, from_variant, entry.version, entry.variant_id)
        if path in self._useless:
            return None
        base = _archive(session, entry.name, from_version, from_variant)
        if base is None:  # a version the registry no longer has: nothing to build from
            return None
        info = self.find(path)
        if info is None:
            lock = self._lock(path)
            # Another request builds this pair: wait a little, then offer the full archive
            # rather than hold a worker thread for the whole build.
            if not lock.acquire(timeout=self._build_wait_s):
                return None
            try:
                info = self.find(path) or self._build(path, base, entry)
            finally:
                lock.release()
        if info is None:
            return None
        self._needed[path] = self._clock()
        return DesiredDelta(
            from_version=from_version,
            from_variant_id=from_variant,
            base_sha256=base[0],
            artifact_path=path,
            sha256=info.sha256,
            size=info.size,
        )

    def _lock(self, path: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(path, threading.Lock())

    def _build(self, path: str, base: tuple[str, int], entry: DesiredModel) -> DeltaInfo | None:
        if path in self._useless:
            return None
        if base[1] > MAX_BASE_BYTES or entry.size > MAX_BASE_BYTES:
            self._useless[path] = "archives too large for a delta"
            return None
        started = time.monotonic()
        self._work_dir.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=self._work_dir) as tmp:
                old = self._store.copy_to(base[0], Path(tmp) / "base.tar")
                new = self._store.copy_to(entry.sha256, Path(tmp) / "target.tar")
                out = Path(tmp) / "delta.zst"
                size = make_delta(old, new, out)
                if size > entry.size * self._max_ratio:
                    self._useless[path] = f"delta {size} bytes of {entry.size}: not worth it"
                    log.info("delta_not_worth_it", path=path, delta=size, full=entry.size)
                    return None
                ref = self._store.put_file(out)
            self._tuf.add_targets({path: (ref.size, ref.sha256)})
        except (ControlPlaneError, SigningError, OSError, ValueError) as exc:
            self._useless[path] = f"build failed: {exc}"
            log.error("delta_build_failed", path=path, reason=f"{type(exc).__name__}: {exc}")
            return None
        log.info(
            "delta_built",
            path=path,
            delta=ref.size,
            full=entry.size,
            ratio=round(ref.size / max(entry.size, 1), 4),
            seconds=round(time.monotonic() - started, 3),
        )
        return parse_delta_path(path, ref.size, ref.sha256)

    # --- collecting ------------------------------------------------------------------------

    def collect(self) -> list[str]:
        """Remove the deltas no device needed for ``keep_s``; returns their paths."""
        now = self._clock()
        self._last_collect = now
        stale = [
            d
            for d in self.signed()
            if now - self._needed.get(d.path, self._started) >= self._keep_s
        ]
        if not stale:
            return []
        try:
            self._tuf.remove_targets([d.path for d in stale])
        except SigningError as exc:
            log.error("delta_collect_failed", reason=str(exc))
            return []
        for d in stale:
            self._needed.pop(d.path, None)
            try:
                self._store.delete(d.sha256)
            except ControlPlaneError as exc:
                log.warning("delta_blob_not_deleted", path=d.path, reason=str(exc))
        log.info("deltas_collected", paths=[d.path for d in stale])
        return [d.path for d in stale]


def _serving(reported: dict[str, Any] | None) -> dict[str, tuple[str, str]]:
    """model -> (version, variant) the device reported serving."""
    out: dict[str, tuple[str, str]] = {}
    for m in (reported or {}).get("models", []):
        if isinstance(m, dict) and m.get("active_version") and m.get("variant_id"):
            out[str(m.get("name"))] = (str(m["active_version"]), str(m["variant_id"]))
    return out


def _archive(session: Session, model: str, version: str, variant: str) -> tuple[str, int] | None:
    row = session.execute(
        select(VariantRow.archive_sha256, VariantRow.archive_size)
        .join(ModelVersion, VariantRow.version_id == ModelVersion.id)
        .join(Model, ModelVersion.model_id == Model.id)
        .where(
            Model.name == model,
            ModelVersion.version == version,
            VariantRow.variant_id == variant,
            VariantRow.archive_sha256.is_not(None),
        )
    ).first()
    if row is None or row[0] is None or row[1] is None:
        return None
    return str(row[0]), int(row[1])

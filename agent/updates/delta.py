"""Model deltas on the device: a new bundle archive rebuilt from the archive it already has.

The format (``EFD1``, a method byte, one zstd frame; ``patch-from`` or ``xor-planes``) and its
two ends, ``make_delta`` and ``apply_delta``, live in ``agent.contracts.delta``, shared with the
control plane, which builds deltas. The model store is not touched until the install that
follows a rebuild.

``BaseArchives`` keeps the archive of every installed version (``<state_dir>/bases/``) so the
next update has a base; ``DeltaFetcher`` carries one delta from the desired state's offer
through signed metadata, the bounded resumable download and the rebuild, and raises
``DeltaUnusableError`` for anything that makes the delta useless (missing or different base,
tampered or truncated delta, wrong base, a failed rebuild): the caller then downloads the full
archive.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from agent._fs import file_sha256, fsync_dir
from agent.contracts.delta import (
    MAX_BASE_BYTES,
    DeltaUnusableError,
    Method,
    apply_delta,
    delta_method,
    delta_summary,
    make_delta,
)
from agent.contracts.state import DesiredDelta
from agent.errors import DownloadError, VerificationError
from agent.logs import get_logger
from agent.updates.download import Downloader

__all__ = [
    "MAX_BASE_BYTES",
    "BaseArchives",
    "DeltaFetcher",
    "DeltaOutcome",
    "DeltaUnusableError",
    "Method",
    "apply_delta",
    "delta_method",
    "delta_summary",
    "make_delta",
]

log = get_logger(__name__)

_CHUNK = 1 << 20  # bytes per read while hashing a base


class BaseArchives:
    """The archive of each installed version, kept so the next update can come as a delta:
    ``<root>/<model>/<version>/<variant>.tar``. Only versions still in the model store are
    kept (``prune``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, model: str, version: str, variant_id: str) -> Path:
        return self.root / model / version / f"{variant_id}.tar"

    def keep(self, model: str, version: str, variant_id: str, archive: Path) -> None:
        """Move a verified, installed ``archive`` here (a failure only costs a later delta)."""
        dest = self._path(model, version, variant_id)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            archive.replace(dest)
            fsync_dir(dest.parent)
        except OSError as exc:
            log.warning("delta_base_not_kept", model=model, version=version, reason=str(exc))
            archive.unlink(missing_ok=True)

    def find(self, model: str, version: str, variant_id: str, sha256: str) -> Path:
        """The kept archive, checked against ``sha256``; ``DeltaUnusableError`` otherwise."""
        path = self._path(model, version, variant_id)
        if not path.is_file():
            raise DeltaUnusableError(f"no base archive of {model} {version} on this device")
        if file_sha256(path, chunk=_CHUNK) != sha256:
            path.unlink(missing_ok=True)
            raise DeltaUnusableError(
                f"the base archive of {model} {version} here is not the one the delta needs"
            )
        return path

    def prune(self, model: str, installed: Iterable[str]) -> None:
        """Delete the kept archives of versions that are no longer in the store."""
        keep = set(installed)
        folder = self.root / model
        if not folder.is_dir():
            return
        for child in folder.iterdir():
            if child.name not in keep:
                shutil.rmtree(child, ignore_errors=True)


@dataclass(frozen=True)
class DeltaOutcome:
    from_version: str
    delta_bytes: int  # the delta's size
    transferred: int  # over the network in this attempt
    full_bytes: int

    @property
    def summary(self) -> str:
        return delta_summary(self.from_version, self.delta_bytes, self.full_bytes)


SignedLookup = Callable[[str], tuple[int, str]]  # target path -> signed (length, sha256)


class DeltaFetcher:
    """Carries an offered delta to a verified full archive, or says why it cannot."""

    def __init__(
        self,
        *,
        bases: BaseArchives,
        downloads: Path,
        downloader: Downloader,
        signed: SignedLookup,
        url_of: Callable[[str], str],
        max_delta_ratio: float = 1.0,
    ) -> None:
        self._bases = bases
        self._downloads = downloads
        self._downloader = downloader
        self._signed = signed
        self._url_of = url_of
        self._max_ratio = max_delta_ratio

    def fetch(
        self, model: str, delta: DesiredDelta, *, full_length: int, full_sha256: str, dest: Path
    ) -> DeltaOutcome:
        """Rebuild the signed full archive (``full_length``/``full_sha256``, from the signed
        metadata) into ``dest`` through ``delta``; ``DeltaUnusableError`` when it cannot."""
        base = self._bases.find(model, delta.from_version, delta.from_variant_id, delta.base_sha256)
        try:
            length, sha256 = self._signed(delta.artifact_path)
        except (VerificationError, DownloadError) as exc:
            raise DeltaUnusableError(f"delta metadata refused: {exc}") from exc
        if (length, sha256) != (delta.size, delta.sha256):
            raise DeltaUnusableError("the offered delta is not the signed one")
        if length > full_length * self._max_ratio:
            raise DeltaUnusableError(f"the delta ({length} bytes) is not smaller than the archive")
        path = self._downloads / (delta.artifact_path.replace("/", "_"))
        try:
            # Bounded by the signed length and checked against the signed sha256 while it
            # streams: a tampered or endless delta is cut and discarded, a truncated one retried
            # and then given up on.
            result = self._downloader.fetch(
                self._url_of(delta.artifact_path), path, length=length, sha256=sha256
            )
        except VerificationError as exc:
            raise DeltaUnusableError(f"delta refused: {exc}") from exc
        except DownloadError as exc:
            raise DeltaUnusableError(f"delta not downloaded: {exc}") from exc
        try:
            apply_delta(base, path, dest, length=full_length, sha256=full_sha256)
        finally:
            path.unlink(missing_ok=True)
        return DeltaOutcome(delta.from_version, length, result.bytes_transferred, full_length)

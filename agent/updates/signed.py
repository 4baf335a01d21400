"""Signed metadata on the device: python-tuf's ngclient over the agent's httpx client.

Owns the local TUF metadata directory and the trust decisions (delegated to
``tuf.ngclient.Updater``): it refuses rollback (an older timestamp/snapshot/targets replayed),
freeze (expired metadata), mix-and-match (snapshot pins every targets version), arbitrary
metadata (signatures), and endless data (every metadata file has a length cap). It answers one
question: the signed length and sha256 of a target path. Fetching the target itself is
``agent.updates.download``'s job, which enforces exactly that length and digest.

The first root comes from provisioning (``control_plane.tuf_root_path`` in the config); after
that the updater's own cached root (``metadata_dir/root.json``) is the anchor, so root
rotations signed by the old root are followed.

Failures keep their class: a refusal of the metadata is a ``VerificationError``; the network or
the control plane away is a ``TransientError``; the device's own disk failing (out of space while
python-tuf persists metadata, an I/O error) is a ``LocalIOError``, never a refusal.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.errors import LocalIOError, TransientError, VerificationError
from agent.logs import get_logger

__all__ = ["SignedMetadata", "SignedTarget"]

log = get_logger(__name__)


@dataclass(frozen=True)
class SignedTarget:
    path: str
    length: int
    sha256: str


class _HttpxFetcher(FetcherInterface):
    """ngclient's transport on the agent's httpx client (auth headers, TLS, timeouts)."""

    def __init__(self, client: httpx.Client, *, chunk_bytes: int = 64 * 1024) -> None:
        self._client = client
        self._chunk = chunk_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            with self._client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise tuf_errors.DownloadHTTPError(f"HTTP {resp.status_code}", resp.status_code)
                yield from resp.iter_raw(self._chunk)
        except httpx.HTTPError as exc:
            raise tuf_errors.DownloadError(f"{type(exc).__name__}: {exc}") from exc


class SignedMetadata:
    """Refreshes TUF metadata and answers for target paths."""

    def __init__(
        self,
        metadata_dir: Path,
        metadata_url: str,
        client: httpx.Client,
        *,
        provisioned_root: Path | None = None,
        config: UpdaterConfig | None = None,
    ) -> None:
        self._dir = metadata_dir
        self._url = metadata_url
        self._fetcher = _HttpxFetcher(client)
        self._provisioned_root = provisioned_root
        self._config = config or UpdaterConfig()

    def _bootstrap(self) -> bytes | None:
        if (self._dir / "root.json").exists():
            return None  # the updater's cached (possibly rotated) root is the anchor
        if self._provisioned_root is None:
            raise VerificationError(
                "no trusted TUF root: set control_plane.tuf_root_path to the fleet's root.json"
            )
        try:
            return self._provisioned_root.read_bytes()
        except OSError as exc:
            raise VerificationError(
                f"cannot read the provisioned TUF root {self._provisioned_root}: {exc}"
            ) from exc

    def target(self, path: str) -> SignedTarget:
        """Refresh the metadata and return the signed length and sha256 of ``path``."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            # ngclient's Updater is meant for one refresh: a new one each time.
            updater = Updater(
                str(self._dir),
                self._url,
                fetcher=self._fetcher,
                config=self._config,
                bootstrap=self._bootstrap(),
            )
            updater.refresh()
            info = updater.get_targetinfo(path)
        except tuf_errors.RepositoryError as exc:
            log.warning("metadata_refused", reason=f"{type(exc).__name__}: {exc}")
            raise VerificationError(
                f"signed metadata refused ({type(exc).__name__}): {exc}"
            ) from exc
        except tuf_errors.DownloadError as exc:
            raise TransientError(f"cannot fetch signed metadata: {exc}") from exc
        except OSError as exc:
            # The device's own disk (full, read-only, failing) while python-tuf reads or
            # persists metadata: nothing was refused, the metadata is unknown.
            what = "out of space" if exc.errno == errno.ENOSPC else "local I/O error"
            raise LocalIOError(
                f"{what} writing signed metadata under {self._dir}: {exc}", errno=exc.errno
            ) from exc
        except ValueError as exc:
            raise VerificationError(f"local TUF metadata unusable: {exc}") from exc
        if info is None:
            raise VerificationError(f"{path} is not a signed target of this fleet")
        sha256 = info.hashes.get("sha256")
        if sha256 is None:
            raise VerificationError(f"{path}: signed metadata carries no sha256")
        return SignedTarget(path=path, length=info.length, sha256=sha256)

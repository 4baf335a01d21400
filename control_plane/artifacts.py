"""Content-addressed artifact storage: uploaded sources, calibration sets, bundle archives.

Owns where blobs live and how they are read back in byte ranges; which blob belongs to what
(and who may read it) is the registry's and the API's business. ``ArtifactStore`` is the
interface; ``LocalArtifactStore`` keeps blobs under ``<root>/sha256/ab/cd/<digest>``;
``control_plane.s3.S3ArtifactStore`` implements the same five methods on an S3-compatible store.
``NamedFiles`` is the second, smaller interface: a handful of named files (TUF metadata and
keys), in a local directory (``DirectoryFiles``) or under an object-store prefix.

Also owns the pure parsing of an HTTP ``Range`` header against a blob size.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent._fs import file_sha256, fsync_dir, write_file_atomic
from control_plane.errors import NotFoundError, RangeNotSatisfiableError, StorageError

__all__ = [
    "ArtifactRef",
    "ArtifactStore",
    "ByteRange",
    "DirectoryFiles",
    "LocalArtifactStore",
    "NamedFiles",
    "digest_path",
    "parse_range",
    "sha256_file",
]

CHUNK = 1024 * 1024  # bytes per read while hashing or streaming
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ArtifactRef:
    sha256: str
    size: int


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class ArtifactStore(Protocol):
    """Where blobs live, addressed by their sha256."""

    def put_file(self, source: Path) -> ArtifactRef:
        """Store a copy of ``source``; storing the same content twice is a no-op."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def size(self, sha256: str) -> int:
        """Raises ``NotFoundError`` for an unknown digest."""
        ...

    def read_range(self, sha256: str, start: int, length: int) -> Iterator[bytes]:
        """Stream ``length`` bytes from ``start`` in chunks."""
        ...

    def copy_to(self, sha256: str, dest: Path) -> Path:
        """Write the blob to ``dest`` (for tools that need a local file); returns ``dest``."""
        ...

    def delete(self, sha256: str) -> None:
        """Remove a blob (garbage-collected model deltas); a missing one is not an error."""
        ...


class NamedFiles(Protocol):
    """Small files by name (no slashes), each written whole and atomically."""

    def read(self, name: str) -> bytes:
        """Raises ``NotFoundError`` for a missing file."""
        ...

    def write(self, name: str, data: bytes) -> None: ...

    def exists(self, name: str) -> bool: ...


def digest_path(sha256: str) -> str:
    """``sha256/ab/cd/<digest>``: where a blob lives under a store's root."""
    if not _DIGEST.match(sha256):
        raise NotFoundError(f"not a sha256 digest: {sha256!r}")
    return f"sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def sha256_file(path: Path) -> ArtifactRef:
    size = path.stat().st_size
    return ArtifactRef(file_sha256(path, chunk=CHUNK), size)


class LocalArtifactStore:
    """Blobs in a local directory, written atomically (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / digest_path(sha256)

    def put_file(self, source: Path) -> ArtifactRef:
        ref = sha256_file(source)
        dest = self._path(ref.sha256)
        if dest.exists() and dest.stat().st_size == ref.size:
            return ref
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                    shutil.copyfileobj(src, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
                tmp.replace(dest)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(dest.parent)
        except OSError as exc:
            raise StorageError(f"cannot store artifact {ref.sha256}: {exc}") from exc
        return ref

    def exists(self, sha256: str) -> bool:
        try:
            return self._path(sha256).is_file()
        except NotFoundError:
            return False

    def size(self, sha256: str) -> int:
        try:
            return self._path(sha256).stat().st_size
        except FileNotFoundError as exc:
            raise NotFoundError(f"no artifact {sha256}") from exc

    def read_range(self, sha256: str, start: int, length: int) -> Iterator[bytes]:
        path = self._path(sha256)
        if not path.is_file():
            raise NotFoundError(f"no artifact {sha256}")
        return _chunks(path, start, length)

    def copy_to(self, sha256: str, dest: Path) -> Path:
        path = self._path(sha256)
        if not path.is_file():
            raise NotFoundError(f"no artifact {sha256}")
        shutil.copyfile(path, dest)
        return dest

    def delete(self, sha256: str) -> None:
        try:
            self._path(sha256).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete artifact {sha256}: {exc}") from exc

    def count(self) -> int:
        """How many blobs are stored (tests check that a refused upload stored nothing)."""
        return sum(1 for p in (self.root / "sha256").rglob("*") if p.is_file())


class DirectoryFiles:
    """Named files in one local directory, written atomically with a mode (keys: 0600)."""

    def __init__(self, directory: Path, *, mode: int = 0o644) -> None:
        self.directory = directory
        self._mode = mode

    def _path(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise NotFoundError(f"not a file name: {name!r}")
        return self.directory / name

    def read(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError as exc:
            raise NotFoundError(f"no file {name!r}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {name!r}: {exc}") from exc

    def write(self, name: str, data: bytes) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_file_atomic(self._path(name), data, mode=self._mode)
        except OSError as exc:
            raise StorageError(f"cannot write {name!r}: {exc}") from exc

    def exists(self, name: str) -> bool:
        try:
            return self._path(name).is_file()
        except NotFoundError:
            return False


def _chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    # Opened on the first read: a response that a client drops before it streams leaks no file.
    with path.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header asks for, or ``None`` to send the whole blob.

    Multiple ranges and headers that do not parse are ignored (RFC 9110 allows it); a range
    that starts past the end raises ``RangeNotSatisfiableError``.
    """
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiableError("empty suffix range", size=size)
        return ByteRange(max(0, size - n), size - 1) if size else _unsatisfiable(size)
    start = int(first)
    if start >= size:
        return _unsatisfiable(size)
    end = min(int(last), size - 1) if last else size - 1
    if end < start:
        return None  # syntactically invalid: ignore the header
    return ByteRange(start, end)


def _unsatisfiable(size: int) -> ByteRange:
    raise RangeNotSatisfiableError(f"range not satisfiable for {size} bytes", size=size)

"""Crash-safe file primitives shared by the agent and the control plane: fsync a directory or a
whole tree, replace a file atomically (with its permission bits from the start), and the sha256 of
a file. Nothing else; standard library only, so both sides may import it (see the dependency rule
in docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

__all__ = ["CHUNK", "file_sha256", "fsync_dir", "fsync_tree", "write_file_atomic"]

CHUNK = 1 << 20  # bytes read at a time when hashing


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before renaming a staged tree into place)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def write_file_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to a temp file beside ``path`` (created with ``mode``, so a secret is never
    readable by others, even for a moment), fsync it, ``os.replace`` it, fsync the directory.

    Raises ``OSError``; the temp file is removed on failure, ``path`` is old or new, never torn.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_sha256(path: Path, *, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

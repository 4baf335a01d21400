"""Crash-safe file writes shared by the store, the update journal, downloads and engine caches:
fsync a directory, replace a file atomically. Nothing else; no agent imports."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["fsync_dir", "write_file_atomic"]


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, ``os.replace`` it, fsync the dir.

    Raises ``OSError``; the temp file is removed on failure, ``path`` is old or new, never torn.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

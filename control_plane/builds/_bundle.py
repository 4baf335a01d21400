"""The bundle directory on disk: staged beside ``out_dir``, published by one rename.

Owns file digests, golden ``.npz`` files, ``manifest.json`` and the all-or-nothing publish: a
failed build leaves no ``out_dir`` and no staging directory behind. What goes into the
manifest is decided by the caller.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from agent._fs import file_sha256, fsync_tree
from agent.contracts.manifest import MANIFEST_FILE, BundleManifest, FileEntry, GoldenCase
from agent.contracts.tensors import storable
from control_plane.builds.errors import BuildError

__all__ = ["file_entry", "staged_bundle", "write_golden", "write_manifest"]


def file_entry(bundle: Path, path: Path) -> FileEntry:
    return FileEntry(
        path=path.relative_to(bundle).as_posix(), sha256=file_sha256(path), size=path.stat().st_size
    )


def write_golden(
    bundle: Path,
    relpath: str,
    inputs: dict[str, np.ndarray[Any, Any]],
    outputs: dict[str, np.ndarray[Any, Any]],
) -> GoldenCase:
    """A golden case: ``in:<input>`` feeds of one inference call, ``out:<output>`` references."""
    path = bundle / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"in:{k}": storable(v) for k, v in inputs.items()} | {
        f"out:{k}": storable(v) for k, v in outputs.items()
    }
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    return GoldenCase(file=file_entry(bundle, path))


def write_manifest(bundle: Path, manifest: BundleManifest) -> None:
    (bundle / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")


def check_destination(out_dir: Path) -> None:
    """``out_dir`` may not exist yet, or be an empty directory."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BuildError(f"bundle directory {out_dir} already exists and is not empty")


@contextmanager
def staged_bundle(out_dir: Path) -> Iterator[Path]:
    """A staging directory beside ``out_dir``; renamed onto it when the block succeeds."""
    check_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        check_destination(out_dir)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

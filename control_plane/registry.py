"""The model registry: models, versions, their built variants and the bundle archives.

Owns the rows and the rules (unique names, semantic versions, no duplicate version, what a
finished build leaves behind). Checking uploads is ``control_plane.uploads``; building variants
is the builds library, driven by ``control_plane.jobs``; blobs live in an ``ArtifactStore``.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.contracts.accuracy import Task
from agent.contracts.manifest import MANIFEST_FILE, BundleManifest, Preprocessing, semver_key
from agent.logs import get_logger
from control_plane.artifacts import ArtifactStore
from control_plane.db.models import BuildJob, Model, ModelVersion, VariantRow
from control_plane.errors import ConflictError, InvalidInputError, NotFoundError

__all__ = [
    "BuildVariants",
    "StagedUpload",
    "archive_path",
    "create_model",
    "create_version",
    "delete_failed_version",
    "get_model",
    "get_version",
    "record_build",
    "write_variant_archive",
]

log = get_logger(__name__)


class BuildVariants(Protocol):
    """The builds library's entry point (``control_plane.builds.build_variants``)."""

    def __call__(
        self,
        source_onnx: Path,
        out_dir: Path,
        *,
        name: str,
        version: str,
        calibration: Path | None,
        validation: Path | None,
        golden: Path | None,
        accuracy_budget: float,
        progress: Callable[[float, str], None],
        task: Task | None,
        preprocessing: Preprocessing | None,
    ) -> BundleManifest: ...


@dataclass(frozen=True)
class StagedUpload:
    """Upload files that passed the checks, still in a temporary directory."""

    onnx: Path
    calibration: Path | None = None
    validation: Path | None = None
    golden: Path | None = None
    task: Task | None = None  # the accuracy gate's task; None: the build decides
    preprocessing: Preprocessing | None = None  # written into every variant's manifest


def archive_path(name: str, version: str, variant_id: str) -> str:
    """The path devices download a variant's bundle archive from (under ``/v1/artifacts/``)."""
    return f"bundles/{name}/{version}/{variant_id}.tar"


def create_model(
    session: Session, *, name: str, accuracy_budget: float, description: str, now: datetime
) -> Model:
    if session.scalar(select(Model.id).where(Model.name == name)) is not None:
        raise ConflictError(f"model {name!r} exists already")
    model = Model(
        name=name, accuracy_budget=accuracy_budget, description=description, created_at=now
    )
    session.add(model)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise ConflictError(f"model {name!r} exists already") from exc
    log.info("model_created", model=name, accuracy_budget=accuracy_budget)
    return model


def get_model(session: Session, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFoundError(f"no model {name!r}")
    return model


def get_version(session: Session, name: str, version: str) -> ModelVersion:
    row = session.scalar(
        select(ModelVersion).join(Model).where(Model.name == name, ModelVersion.version == version)
    )
    if row is None:
        raise NotFoundError(f"no version {version!r} of model {name!r}")
    return row


def delete_failed_version(session: Session, name: str, version: str) -> None:
    """Delete a version whose build failed, with its job rows; the number can be uploaded again.

    A version that is building or ready stays (devices may run it; a rollout may name it).
    Blobs stay in the content-addressed store: other versions may share them.
    """
    row = get_version(session, name, version)
    if row.status != "failed":
        raise ConflictError(
            f"{name} {version} is {row.status}: only a version whose build failed can be deleted"
        )
    session.execute(delete(ModelVersion).where(ModelVersion.id == row.id))  # rows cascade
    session.commit()
    log.info("version_deleted", model=name, version=version)


def check_new_version(session: Session, model: Model, version: str) -> None:
    try:
        semver_key(version)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field="version") from exc
    exists = session.scalar(
        select(ModelVersion.id).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    )
    if exists is not None:
        raise ConflictError(f"version {version} of model {model.name!r} exists already")


def create_version(
    session: Session,
    store: ArtifactStore,
    *,
    model: Model,
    version: str,
    staged: StagedUpload,
    created_by: str,
    now: datetime,
    task: Task | None = None,
) -> tuple[ModelVersion, BuildJob]:
    """Store the checked inputs and queue their build, in one transaction.

    Blobs go into the content-addressed store before the commit: a failed commit leaves at most
    unreferenced blobs (harmless; shared content may belong to other versions), never rows that
    point at missing blobs.
    """
    check_new_version(session, model, version)
    source = store.put_file(staged.onnx)
    digests = {
        key: store.put_file(path).sha256 if path is not None else None
        for key, path in (
            ("calibration", staged.calibration),
            ("validation", staged.validation),
            ("golden", staged.golden),
        )
    }
    row = ModelVersion(
        model_id=model.id,
        version=version,
        status="building",
        source_sha256=source.sha256,
        source_size=source.size,
        calibration_sha256=digests["calibration"],
        validation_sha256=digests["validation"],
        golden_sha256=digests["golden"],
        task=task or staged.task,
        preprocessing=(
            staged.preprocessing.model_dump(mode="json") if staged.preprocessing else None
        ),
        created_at=now,
        created_by=created_by,
    )
    session.add(row)
    try:
        session.flush()
        job = BuildJob(
            version_id=row.id,
            status="queued",
            progress=0.0,
            message="queued",
            log="",
            created_at=now,
        )
        session.add(job)
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise ConflictError(f"version {version} of model {model.name!r} exists already") from exc
    log.info("version_uploaded", model=model.name, version=version, source=source.sha256, task=task)
    return row, job


def write_variant_archive(
    bundle_dir: Path, manifest: BundleManifest, variant_id: str, dest: Path
) -> None:
    """A deterministic ``.tar`` of one variant's bundle: its manifest, files and golden cases.

    The archive's manifest lists only this variant, so a device installs exactly what it runs.
    """
    variant = manifest.variant(variant_id)
    single = manifest.model_copy(update={"variants": (variant,)})
    files = {f.path for f in variant.files} | {g.file.path for g in manifest.golden}
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        body = json.dumps(single.model_dump(mode="json"), indent=2, sort_keys=True).encode()
        _add_bytes(tar, MANIFEST_FILE, body)
        for rel in sorted(files):
            path = bundle_dir / rel
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def record_build(
    session: Session,
    store: ArtifactStore,
    *,
    version: ModelVersion,
    manifest: BundleManifest,
    bundle_dir: Path,
    scratch: Path,
) -> None:
    """Store each accepted variant's archive and every variant's row (rejected ones too)."""
    if manifest.name != version.model.name or manifest.version != version.version:
        raise InvalidInputError(
            f"build produced {manifest.name} {manifest.version}, expected "
            f"{version.model.name} {version.version}"
        )
    for variant in manifest.variants:
        sha256: str | None = None
        size: int | None = None
        if variant.status == "accepted":
            tar_path = scratch / f"{variant.id}.tar"
            write_variant_archive(bundle_dir, manifest, variant.id, tar_path)
            ref = store.put_file(tar_path)
            sha256, size = ref.sha256, ref.size
        session.add(
            VariantRow(
                version_id=version.id,
                variant_id=variant.id,
                runtime=variant.runtime,
                format=variant.format,
                precision=variant.precision,
                status=variant.status,
                spec=variant.model_dump(mode="json"),
                archive_sha256=sha256,
                archive_size=size,
            )
        )
    version.manifest = manifest.model_dump(mode="json")
    version.status = "ready"

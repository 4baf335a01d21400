"""Rows -> public wire models (``control_plane.api.schemas``)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.contracts.manifest import AccuracyReport, TargetConstraints
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import ReportedState
from control_plane.api.schemas import (
    DevicePublic,
    JobPublic,
    ModelPublic,
    TokenPublic,
    VariantPublic,
    VersionPublic,
    VersionSummary,
)
from control_plane.db.models import ApiToken, BuildJob, Device, Model, ModelVersion, VariantRow
from control_plane.registry import archive_path

__all__ = [
    "device_public",
    "job_public",
    "model_public",
    "token_public",
    "variant_public",
    "version_public",
]


def model_public(model: Model) -> ModelPublic:
    return ModelPublic(
        name=model.name,
        accuracy_budget=model.accuracy_budget,
        description=model.description,
        created_at=model.created_at,
        versions=[
            VersionSummary(version=v.version, status=v.status, created_at=v.created_at)  # type: ignore[arg-type]
            for v in model.versions
        ],
    )


def job_public(job: BuildJob, version: ModelVersion) -> JobPublic:
    return JobPublic(
        id=job.id,
        model=version.model.name,
        version=version.version,
        status=job.status,  # type: ignore[arg-type]
        progress=job.progress,
        message=job.message,
        log=job.log.splitlines(),
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def variant_public(row: VariantRow, version: ModelVersion) -> VariantPublic:
    accuracy = row.spec.get("accuracy")
    return VariantPublic(
        id=row.variant_id,
        runtime=row.runtime,
        format=row.format,
        precision=row.precision,
        status=row.status,  # type: ignore[arg-type]
        target=TargetConstraints.model_validate(row.spec.get("target", {})),
        accuracy=AccuracyReport.model_validate(accuracy) if accuracy else None,
        artifact_path=archive_path(version.model.name, version.version, row.variant_id)
        if row.archive_sha256
        else None,
        sha256=row.archive_sha256,
        size=row.archive_size,
    )


def version_public(session: Session, version: ModelVersion) -> VersionPublic:
    job = session.scalar(
        select(BuildJob).where(BuildJob.version_id == version.id).order_by(BuildJob.id.desc())
    )
    return VersionPublic(
        model=version.model.name,
        version=version.version,
        status=version.status,  # type: ignore[arg-type]
        error=version.error,
        source_sha256=version.source_sha256,
        source_size=version.source_size,
        created_at=version.created_at,
        created_by=version.created_by,
        variants=[variant_public(r, version) for r in version.variants],
        job=job_public(job, version) if job else None,
    )


def device_public(device: Device) -> DevicePublic:
    return DevicePublic(
        id=device.id,
        name=device.name,
        labels=device.labels,
        profile=HardwareProfile.model_validate(device.profile) if device.profile else None,
        reported=ReportedState.model_validate(device.reported) if device.reported else None,
        enrolled_at=device.enrolled_at,
        last_seen_at=device.last_seen_at,
        reported_at=device.reported_at,
    )


def token_public(row: ApiToken) -> TokenPublic:
    return TokenPublic(
        id=row.id,
        name=row.name,
        role=row.role,  # type: ignore[arg-type]
        created_at=row.created_at,
        created_by=row.created_by,
        revoked=row.revoked_at is not None,
    )

"""Rows -> public wire models (``control_plane.api.schemas``)."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.contracts.manifest import AccuracyReport, BuildReport, Preprocessing, TargetConstraints
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import ReportedState
from agent.logs import get_logger
from control_plane.api.schemas import (
    BootstrapTokenPublic,
    CredentialStatus,
    DevicePublic,
    JobPublic,
    ModelPublic,
    SkippedVariant,
    TokenPublic,
    VariantPublic,
    VersionPublic,
    VersionSummary,
)
from control_plane.db.models import (
    ApiToken,
    BootstrapToken,
    BuildJob,
    Device,
    Model,
    ModelVersion,
    VariantRow,
)
from control_plane.jobs import skipped_variants
from control_plane.registry import archive_path

__all__ = [
    "bootstrap_token_public",
    "credential_status",
    "device_public",
    "job_public",
    "model_public",
    "token_public",
    "variant_public",
    "version_public",
]

log = get_logger(__name__)
_Stored = TypeVar("_Stored", bound=BaseModel)


def _stored(kind: type[_Stored], doc: dict[str, Any] | None, device_id: str) -> _Stored | None:
    """A device-reported document as stored; one written before today's bounds (or otherwise
    unreadable) is shown as absent instead of failing every page that lists the device."""
    if not doc:
        return None
    try:
        return kind.model_validate(doc)
    except PydanticValidationError as exc:
        log.warning(
            "stored_document_unreadable",
            device_id=device_id,
            kind=kind.__name__,
            errors=exc.error_count(),
        )
        return None


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
        skipped=_skipped(job, version),
    )


def _skipped(job: BuildJob | None, version: ModelVersion) -> list[SkippedVariant]:
    """What the build left out; a target that was built after all (a resumed build) is not."""
    if job is None:
        return []
    built = {r.variant_id for r in version.variants}
    return [
        SkippedVariant(id=target, reason=reason)
        for target, reason in sorted(skipped_variants(job.log).items())
        if target not in built
    ]


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
        build=_build_report(row.spec.get("build")),
    )


def _build_report(doc: Any) -> BuildReport | None:
    """A variant's build report; one from an older build (none, or another shape) is absent."""
    if not isinstance(doc, dict):
        return None
    try:
        return BuildReport.model_validate(doc)
    except PydanticValidationError:
        return None


def _task(version: ModelVersion) -> str | None:
    """The declared task, else the one the build's accuracy reports name."""
    if version.task:
        return version.task
    for row in version.variants:
        accuracy = row.spec.get("accuracy")
        if isinstance(accuracy, dict) and isinstance(accuracy.get("task"), str):
            return str(accuracy["task"])
    return None


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
        task=_task(version),  # type: ignore[arg-type]  # stored values come from TASKS
        preprocessing=_stored(Preprocessing, version.preprocessing, version.version),
        variants=[variant_public(r, version) for r in version.variants],
        skipped=_skipped(job, version),
        job=job_public(job, version) if job else None,
    )


def credential_status(device: Device) -> CredentialStatus:
    if device.credential_revoked_at is not None:
        return "revoked"
    return "rotating" if device.credential_rotate_by is not None else "active"


def device_public(device: Device) -> DevicePublic:
    return DevicePublic(
        id=device.id,
        name=device.name,
        labels=device.labels,
        requested_labels=device.requested_labels or {},
        credential=credential_status(device),
        credential_rotate_by=device.credential_rotate_by,
        profile=_stored(HardwareProfile, device.profile, device.id),
        reported=_stored(ReportedState, device.reported, device.id),
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
        expires_at=row.expires_at,
    )


def bootstrap_token_public(row: BootstrapToken) -> BootstrapTokenPublic:
    return BootstrapTokenPublic(
        id=row.id,
        name=row.name,
        labels=row.labels,
        max_uses=row.max_uses,
        uses=row.uses,
        expires_at=row.expires_at,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked=row.revoked_at is not None,
    )

"""Build jobs: status, progress, log lines and skipped targets of variant builds."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select

from agent.contracts.manifest import NAME_RE
from control_plane.api.deps import CurrentOperator, SessionDep
from control_plane.api.schemas import JobPublic
from control_plane.api.views import job_public
from control_plane.db.models import BuildJob, Model, ModelVersion
from control_plane.errors import NotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_INT32 = 2**31
JobStatus = Literal["queued", "running", "succeeded", "failed"]


@router.get("", summary="Build jobs, newest first")
def list_jobs(
    session: SessionDep,
    operator: CurrentOperator,
    model: Annotated[str | None, Query(pattern=NAME_RE, description="only this model")] = None,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[JobPublic]:
    query = (
        select(BuildJob, ModelVersion)
        .join(ModelVersion, BuildJob.version_id == ModelVersion.id)
        .order_by(BuildJob.id.desc())
        .limit(limit)
    )
    if model is not None:
        query = query.join(Model, ModelVersion.model_id == Model.id).where(Model.name == model)
    if status is not None:
        query = query.where(BuildJob.status == status)
    return [job_public(job, version) for job, version in session.execute(query)]


@router.get("/{job_id}", summary="A build job")
def get_job(job_id: int, session: SessionDep, operator: CurrentOperator) -> JobPublic:
    job = session.get(BuildJob, job_id) if -_INT32 < job_id < _INT32 else None
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    version = session.get(ModelVersion, job.version_id)
    assert version is not None
    return job_public(job, version)

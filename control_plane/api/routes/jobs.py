"""Build jobs: status, progress and log lines of variant builds."""

from __future__ import annotations

from fastapi import APIRouter

from control_plane.api.deps import CurrentOperator, SessionDep
from control_plane.api.schemas import JobPublic
from control_plane.api.views import job_public
from control_plane.db.models import BuildJob, ModelVersion
from control_plane.errors import NotFoundError

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_INT32 = 2**31


@router.get("/{job_id}", summary="A build job")
def get_job(job_id: int, session: SessionDep, operator: CurrentOperator) -> JobPublic:
    job = session.get(BuildJob, job_id) if -_INT32 < job_id < _INT32 else None
    if job is None:
        raise NotFoundError(f"no job {job_id}")
    version = session.get(ModelVersion, job.version_id)
    assert version is not None
    return job_public(job, version)

"""Assignments: a model version to one device or to every device matching a label selector.

A direct assignment; staged rollouts (waves, soak, promote/abort) live in control_plane.rollouts.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from agent.contracts.manifest import semver_key
from agent.logs import get_logger
from control_plane.api.deps import Context, CurrentOperator, OperatorWriter, SessionDep
from control_plane.api.schemas import AssignmentCreate, AssignmentPublic
from control_plane.db.models import Assignment, Device, Model, ModelVersion
from control_plane.desired import selector_matches
from control_plane.errors import ConflictError, InvalidInputError, NotFoundError
from control_plane.registry import get_version

router = APIRouter(prefix="/v1/assignments", tags=["assignments"])
log = get_logger(__name__)


def _matched(session: Session, a: Assignment) -> int:
    if a.device_id is not None:
        return 1
    selector = a.selector or {}
    return sum(
        1 for labels in session.scalars(select(Device.labels)) if selector_matches(selector, labels)
    )


def _public(session: Session, a: Assignment) -> AssignmentPublic:
    model = session.get(Model, a.model_id)
    version = session.get(ModelVersion, a.version_id)
    assert model is not None
    assert version is not None
    return AssignmentPublic(
        id=a.id,
        model=model.name,
        version=version.version,
        device_id=a.device_id,
        selector=a.selector,
        created_at=a.created_at,
        created_by=a.created_by,
        devices_matched=_matched(session, a),
    )


@router.post("", status_code=201, summary="Assign a ready model version to devices")
def create_assignment(
    body: AssignmentCreate, session: SessionDep, operator: OperatorWriter, ctx: Context
) -> AssignmentPublic:
    try:
        semver_key(body.version)
    except ValueError as exc:
        raise InvalidInputError(str(exc), field="version") from exc
    version = get_version(session, body.model, body.version)
    if version.status != "ready":
        raise ConflictError(f"{body.model} {body.version} is {version.status}, not ready")
    if not any(v.archive_sha256 for v in version.variants):
        raise ConflictError(f"{body.model} {body.version} has no accepted variant")
    if body.device_id is not None and session.get(Device, body.device_id) is None:
        raise NotFoundError(f"no device {body.device_id!r}")
    row = Assignment(
        model_id=version.model_id,
        version_id=version.id,
        device_id=body.device_id,
        selector=dict(body.selector) if body.selector is not None else None,
        created_at=ctx.now(),
        created_by=operator.name,
    )
    session.add(row)
    session.commit()
    ctx.desired.invalidate([body.device_id] if body.device_id else None)
    log.info(
        "model_assigned",
        model=body.model,
        version=body.version,
        device_id=body.device_id,
        selector=body.selector,
        by=operator.name,
    )
    return _public(session, row)


@router.get("", summary="List assignments, newest first")
def list_assignments(session: SessionDep, operator: CurrentOperator) -> list[AssignmentPublic]:
    rows = session.scalars(select(Assignment).order_by(Assignment.id.desc()).limit(500)).all()
    return [_public(session, a) for a in rows]

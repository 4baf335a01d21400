"""Staged rollouts over HTTP: create, list, status, pause, resume, abort, roll back.

Viewers read; operators (and admins) change. The decisions are the rollout controller's and the
work the ``RolloutService``'s; this module only maps HTTP onto them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from control_plane.api.deps import Context, CurrentOperator, OperatorWriter
from control_plane.api.schemas import ErrorBody
from control_plane.context import AppContext
from control_plane.errors import UnavailableError
from control_plane.rollouts.schemas import (
    ROLLOUT_ID_RE,
    RolloutCreate,
    RolloutNote,
    RolloutPublic,
    RolloutSummary,
    rollout_public,
    rollout_summary,
)
from control_plane.rollouts.service import RolloutService

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])
RolloutIdPath = Annotated[str, Path(pattern=ROLLOUT_ID_RE, description="rollout id")]
_ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody},
    409: {"model": ErrorBody, "description": "not possible in the rollout's current status"},
}


def _service(ctx: AppContext) -> RolloutService:
    if ctx.rollouts is None:
        raise UnavailableError("rollouts are not enabled on this instance")
    return ctx.rollouts


@router.post(
    "",
    status_code=201,
    summary="Start a staged rollout of a ready model version",
    responses={**_ERRORS, 422: {"model": ErrorBody}},
)
def create_rollout(body: RolloutCreate, operator: OperatorWriter, ctx: Context) -> RolloutPublic:
    service = _service(ctx)
    state = service.create(
        model=body.model,
        version=body.version,
        selector=dict(body.selector),
        waves=[w.model_dump() for w in body.waves],
        rules=body.rules.model_dump(),
        actor=operator.name,
        rollout_id=body.id,
        shadow=body.shadow.model_dump() if body.shadow is not None else None,
    )
    return rollout_public(service.view(state.spec.id))


@router.get("", summary="List rollouts, newest first")
def list_rollouts(operator: CurrentOperator, ctx: Context) -> list[RolloutSummary]:
    return [rollout_summary(row) for row in _service(ctx).list()]


@router.get(
    "/{rollout_id}",
    summary="A rollout's status: per wave, per device, the decisions and their reasons",
    responses=_ERRORS,
)
def get_rollout(
    rollout_id: RolloutIdPath, operator: CurrentOperator, ctx: Context
) -> RolloutPublic:
    return rollout_public(_service(ctx).view(rollout_id))


@router.post(
    "/{rollout_id}/pause", summary="Stop promoting (the soak clock stops)", responses=_ERRORS
)
def pause_rollout(
    rollout_id: RolloutIdPath, operator: OperatorWriter, ctx: Context
) -> RolloutPublic:
    service = _service(ctx)
    service.pause(rollout_id, actor=operator.name)
    return rollout_public(service.view(rollout_id))


@router.post("/{rollout_id}/resume", summary="Continue a paused rollout", responses=_ERRORS)
def resume_rollout(
    rollout_id: RolloutIdPath, operator: OperatorWriter, ctx: Context
) -> RolloutPublic:
    service = _service(ctx)
    service.resume(rollout_id, actor=operator.name)
    return rollout_public(service.view(rollout_id))


@router.post(
    "/{rollout_id}/abort",
    summary="Stop the rollout and roll back every device it touched",
    responses=_ERRORS,
)
def abort_rollout(
    rollout_id: RolloutIdPath,
    operator: OperatorWriter,
    ctx: Context,
    body: RolloutNote | None = None,
) -> RolloutPublic:
    service = _service(ctx)
    service.abort(rollout_id, actor=operator.name, reason=body.reason if body else None)
    return rollout_public(service.view(rollout_id))


@router.post(
    "/{rollout_id}/rollback",
    summary="Roll back every device the rollout touched, also after it completed",
    responses=_ERRORS,
)
def rollback_rollout(
    rollout_id: RolloutIdPath,
    operator: OperatorWriter,
    ctx: Context,
    body: RolloutNote | None = None,
) -> RolloutPublic:
    service = _service(ctx)
    service.rollback(rollout_id, actor=operator.name, reason=body.reason if body else None)
    return rollout_public(service.view(rollout_id))

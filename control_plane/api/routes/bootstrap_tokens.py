"""Bootstrap tokens: operators create, list and revoke the tokens devices enroll with.

A token is shown once; the database keeps its sha256, its labels (given to every device that
enrolls with it, where they select assignments at once), its use count and its expiry. The
settings' token is listed too (``created_by`` = ``settings``) once a device used it. What a
redemption checks is ``control_plane.bootstrap``.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from sqlalchemy import select

from agent.logs import get_logger
from control_plane.api.deps import Context, CurrentOperator, OperatorWriter, SessionDep
from control_plane.api.schemas import (
    BootstrapTokenCreate,
    BootstrapTokenCreated,
    BootstrapTokenPublic,
    ErrorBody,
)
from control_plane.api.views import bootstrap_token_public
from control_plane.auth import BOOTSTRAP_TOKEN_PREFIX, hash_token, new_token
from control_plane.db.models import BootstrapToken
from control_plane.errors import NotFoundError

router = APIRouter(prefix="/v1/bootstrap-tokens", tags=["bootstrap tokens"])
log = get_logger(__name__)


@router.post("", status_code=201, summary="Create a bootstrap token (operator)")
def create_bootstrap_token(
    body: BootstrapTokenCreate, session: SessionDep, operator: OperatorWriter, ctx: Context
) -> BootstrapTokenCreated:
    token = new_token(BOOTSTRAP_TOKEN_PREFIX)
    now = ctx.now()
    row = BootstrapToken(
        name=body.name,
        token_hash=hash_token(token),
        labels=dict(body.labels),
        max_uses=body.max_uses,
        uses=0,
        expires_at=now + timedelta(seconds=body.expires_in_s),
        created_at=now,
        created_by=operator.name,
    )
    session.add(row)
    session.commit()
    log.info(
        "bootstrap_token_created",
        name=row.name,
        labels=row.labels,
        max_uses=row.max_uses,
        expires_at=row.expires_at.isoformat() if row.expires_at else None,
        by=operator.name,
    )
    return BootstrapTokenCreated(**bootstrap_token_public(row).model_dump(), token=token)


@router.get("", summary="List bootstrap tokens (viewer)")
def list_bootstrap_tokens(
    session: SessionDep, operator: CurrentOperator
) -> list[BootstrapTokenPublic]:
    rows = session.scalars(select(BootstrapToken).order_by(BootstrapToken.id))
    return [bootstrap_token_public(r) for r in rows]


@router.delete(
    "/{token_id}",
    summary="Revoke a bootstrap token (operator); devices it enrolled keep their credentials",
    responses={404: {"model": ErrorBody}},
)
def revoke_bootstrap_token(
    token_id: int, session: SessionDep, operator: OperatorWriter, ctx: Context
) -> BootstrapTokenPublic:
    row = session.get(BootstrapToken, token_id) if -(2**31) < token_id < 2**31 else None
    if row is None:
        raise NotFoundError(f"no bootstrap token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = ctx.now()
        session.commit()
        log.info("bootstrap_token_revoked", name=row.name, by=operator.name)
    return bootstrap_token_public(row)

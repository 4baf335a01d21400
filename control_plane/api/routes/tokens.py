"""Operator API tokens: admins create, list and revoke them; each expires (``expires_in_s``,
90 days by default, at most 366). Revoked and expired tokens are refused (401) at once."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from sqlalchemy import select

from control_plane.api.deps import Admin, Context, SessionDep
from control_plane.api.schemas import TokenCreate, TokenCreated, TokenPublic
from control_plane.api.views import token_public
from control_plane.auth import OPERATOR_TOKEN_PREFIX, hash_token, new_token
from control_plane.db.models import ApiToken
from control_plane.errors import NotFoundError

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=201, summary="Create an operator API token (admin)")
def create_token(
    body: TokenCreate, session: SessionDep, admin: Admin, ctx: Context
) -> TokenCreated:
    token = new_token(OPERATOR_TOKEN_PREFIX)
    now = ctx.now()
    row = ApiToken(
        name=body.name,
        role=body.role,
        token_hash=hash_token(token),
        created_at=now,
        created_by=admin.name,
        expires_at=now + timedelta(seconds=body.expires_in_s),
    )
    session.add(row)
    session.commit()
    return TokenCreated(**token_public(row).model_dump(), token=token)


@router.get("", summary="List operator API tokens (admin)")
def list_tokens(session: SessionDep, admin: Admin) -> list[TokenPublic]:
    return [token_public(r) for r in session.scalars(select(ApiToken).order_by(ApiToken.id))]


@router.delete("/{token_id}", summary="Revoke an operator API token (admin)")
def revoke_token(token_id: int, session: SessionDep, admin: Admin, ctx: Context) -> TokenPublic:
    row = session.get(ApiToken, token_id) if -(2**31) < token_id < 2**31 else None
    if row is None:
        raise NotFoundError(f"no token {token_id}")
    if row.revoked_at is None:
        row.revoked_at = ctx.now()
        session.commit()
    return token_public(row)

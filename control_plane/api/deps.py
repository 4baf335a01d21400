"""Route dependencies as ``Annotated`` aliases: the app context, a DB session, the caller.

Principals: ``CurrentOperator`` (any operator token, viewer and up), ``OperatorWriter``
(operator and up), ``Admin``; ``CurrentDevice`` (a device credential); ``DeviceOrViewer`` for
what both may read. The admin token from the settings is an admin; other operator tokens and
device credentials are looked up by their sha256.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from control_plane.auth import (
    DEVICE_TOKEN_PREFIX,
    Operator,
    Role,
    hash_token,
    role_allows,
    tokens_equal,
)
from control_plane.context import AppContext
from control_plane.db.models import ApiToken, Device
from control_plane.desired import CachedState, compute_desired_state
from control_plane.errors import AuthError, ForbiddenError, NotFoundError

__all__ = [
    "Admin",
    "Context",
    "CurrentDevice",
    "CurrentOperator",
    "DeviceOrViewer",
    "DevicePrincipal",
    "OperatorWriter",
    "SessionDep",
    "desired_state_entry",
]

_bearer = HTTPBearer(auto_error=False, description="operator API token or device credential")
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def get_context(request: Request) -> AppContext:
    ctx: AppContext = request.app.state.ctx
    return ctx


Context = Annotated[AppContext, Depends(get_context)]


def get_session(ctx: Context) -> Iterator[Session]:
    with ctx.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


@dataclass(frozen=True)
class DevicePrincipal:
    device_id: str


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise AuthError("missing bearer credential (Authorization: Bearer <token>)")
    return credentials.credentials


def _lookup_operator(ctx: AppContext, token: str) -> Operator:
    if tokens_equal(token, ctx.settings.admin_token.get_secret_value()):
        return Operator(name="admin", role="admin")
    with ctx.sessions() as session:
        row = session.scalar(
            select(ApiToken).where(
                ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)
            )
        )
        if row is None:
            raise AuthError("unknown or revoked API token")
        role: Role = row.role  # type: ignore[assignment]
        return Operator(name=row.name, role=role)


def _lookup_device(ctx: AppContext, token_hash: str) -> str:
    with ctx.sessions() as session:
        device_id = session.scalar(select(Device.id).where(Device.token_hash == token_hash))
    if device_id is None:
        raise AuthError("unknown device credential")
    ctx.credentials.put(token_hash, device_id)
    return device_id


async def _device(ctx: AppContext, token: str) -> DevicePrincipal:
    token_hash = hash_token(token)
    device_id = ctx.credentials.get(token_hash)
    if device_id is None:
        device_id = await run_in_threadpool(_lookup_device, ctx, token_hash)
    return DevicePrincipal(device_id)


async def _operator(
    ctx: AppContext, credentials: HTTPAuthorizationCredentials | None, need: Role
) -> Operator:
    token = _token(credentials)
    if token.startswith(DEVICE_TOKEN_PREFIX):
        raise ForbiddenError("a device credential cannot use operator routes")
    operator = await run_in_threadpool(_lookup_operator, ctx, token)
    if not role_allows(operator.role, need):
        raise ForbiddenError(f"needs role {need}; token {operator.name!r} is {operator.role}")
    return operator


async def require_viewer(ctx: Context, credentials: BearerDep) -> Operator:
    return await _operator(ctx, credentials, "viewer")


async def require_operator(ctx: Context, credentials: BearerDep) -> Operator:
    return await _operator(ctx, credentials, "operator")


async def require_admin(ctx: Context, credentials: BearerDep) -> Operator:
    return await _operator(ctx, credentials, "admin")


async def require_device(ctx: Context, credentials: BearerDep) -> DevicePrincipal:
    token = _token(credentials)
    if not token.startswith(DEVICE_TOKEN_PREFIX):
        raise AuthError("not a device credential")
    return await _device(ctx, token)


async def require_device_or_viewer(
    ctx: Context, credentials: BearerDep
) -> DevicePrincipal | Operator:
    token = _token(credentials)
    if token.startswith(DEVICE_TOKEN_PREFIX):
        return await _device(ctx, token)
    return await _operator(ctx, credentials, "viewer")


CurrentOperator = Annotated[Operator, Depends(require_viewer)]
OperatorWriter = Annotated[Operator, Depends(require_operator)]
Admin = Annotated[Operator, Depends(require_admin)]
CurrentDevice = Annotated[DevicePrincipal, Depends(require_device)]
DeviceOrViewer = Annotated[DevicePrincipal | Operator, Depends(require_device_or_viewer)]


def _fresh_state(ctx: AppContext, device_id: str) -> CachedState:
    with ctx.sessions() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id!r}")
        state = compute_desired_state(session, device)
    return ctx.desired.put(state)


async def desired_state_entry(ctx: AppContext, device_id: str) -> tuple[CachedState, bool]:
    """The device's desired state and ETag, and whether it came from the cache."""
    entry = ctx.desired.get(device_id)
    if entry is not None:
        return entry, True
    return await run_in_threadpool(_fresh_state, ctx, device_id), False

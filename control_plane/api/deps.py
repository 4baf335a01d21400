"""Route dependencies as ``Annotated`` aliases: the app context, a DB session, the caller.

Principals: ``CurrentOperator`` (any operator token, viewer and up), ``OperatorWriter``
(operator and up), ``Admin``; ``CurrentDevice`` (a device credential); ``DeviceOrViewer`` for
what both may read. The admin token from the settings is an admin; other operator tokens and
device credentials are looked up by their sha256.

Refused (401): an operator token that is revoked or past its ``expires_at``; a device credential
that is revoked, or whose rotation deadline (``credential_rotate_by``) passed before the device
fetched its new one. While a rotation is pending, the old credential still works and the
principal says so (``DevicePrincipal.rotate``), so the desired-state answer can carry the hint;
such a credential is never put in the credential cache, so no poll skips the hint. The first
request with the new credential ends the rotation (the old one is refused from then on).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import or_, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from agent.logs import get_logger
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

log = get_logger(__name__)
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
    """A device, by its credential. ``rotate``: an operator asked for a new credential and this
    one may fetch it (``POST /v1/devices/{id}/credential``); ``previous``: this is the credential
    an unfinished rotation replaced (the device has not used the new one yet)."""

    device_id: str
    rotate: bool = False
    previous: bool = False


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
        if row.expires_at is not None and row.expires_at <= ctx.now():
            raise AuthError(f"API token {row.name!r} expired at {row.expires_at.isoformat()}")
        role: Role = row.role  # type: ignore[assignment]
        return Operator(name=row.name, role=role)


def _lookup_device(ctx: AppContext, token_hash: str) -> DevicePrincipal:
    ticket = ctx.credentials.ticket()  # before the read: a revocation during it is not cached
    with ctx.sessions() as session:
        device = session.scalar(
            select(Device).where(
                or_(Device.token_hash == token_hash, Device.previous_token_hash == token_hash)
            )
        )
        if device is None:
            raise AuthError("unknown device credential")
        if device.credential_revoked_at is not None:
            raise AuthError("device credential revoked")
        deadline = device.credential_rotate_by
        fetched = device.previous_token_hash is not None  # the new credential went out
        if deadline is not None and deadline <= ctx.now() and device.token_hash != token_hash:
            raise AuthError(f"device credential rotated: refused since {deadline.isoformat()}")
        if device.previous_token_hash == token_hash:
            return DevicePrincipal(device.id, rotate=True, previous=True)
        if deadline is not None and not fetched:
            if deadline <= ctx.now():
                raise AuthError(
                    "device credential expired: its rotation was due by " + deadline.isoformat()
                )
            return DevicePrincipal(device.id, rotate=True)  # rotation asked, not fetched yet
        if fetched:  # the first request with the new credential ends the rotation
            device.previous_token_hash = None
            device.credential_rotate_by = None
            session.commit()
            log.info("credential_rotated", device_id=device.id)
        device_id = device.id
    ctx.credentials.put(token_hash, device_id, ticket)
    return DevicePrincipal(device_id)


async def _device(ctx: AppContext, token: str) -> DevicePrincipal:
    token_hash = hash_token(token)
    device_id = ctx.credentials.get(token_hash)
    if device_id is None:
        return await run_in_threadpool(_lookup_device, ctx, token_hash)
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
    ticket = ctx.desired.ticket()  # before the read: a change committed during it is not cached
    with ctx.sessions() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id!r}")
        state = compute_desired_state(session, device)
        if ctx.deltas is not None:
            state = ctx.deltas.offer(session, device, state)
    return ctx.desired.put(state, ticket)


async def desired_state_entry(ctx: AppContext, device_id: str) -> tuple[CachedState, bool]:
    """The device's desired state and ETag, and whether it came from the cache."""
    entry = ctx.desired.get(device_id)
    if entry is not None:
        return entry, True
    return await run_in_threadpool(_fresh_state, ctx, device_id), False

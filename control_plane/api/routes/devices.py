"""Devices: enrollment, hardware profile, labels, desired state (ETag) and reported state.

A device credential reaches only its own device's routes; operators read every device and
(operator role and up) edit labels, offer a rejected version again (``retry``) and delete a
device. The desired-state read is the hot path: a cached entry and a cached credential answer
it, including the 304, without touching the database; a device's poll refreshes its
``last_seen_at`` through ``control_plane.presence`` (coalesced writes).

Deleting a device removes its row and its assignments and drops its cached credential and
desired state in this process, so its credential is refused (401) from the next request on.
Its rollout membership and ingested telemetry stay as history.

Enrollment takes a bootstrap token (``control_plane.bootstrap``: expiry, use count, bound
labels). The labels a device sends are kept as ``requested_labels`` and select nothing until an
operator approves them (``POST .../labels/approve``) or sets labels itself; the token's own
labels select at once. Credentials: an operator revokes one (refused at once) or asks for a
rotation; while it is pending the device's desired-state answers carry
``Edgefleet-Credential: rotate`` and the device fetches its new credential with the old one
(``POST .../credential``) before ``credential_rotate_by``.
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from datetime import datetime, timedelta
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import APIRouter, Header, Response
from sqlalchemy import delete, select
from starlette.concurrency import run_in_threadpool

from agent.contracts.enrollment import (
    CREDENTIAL_HEADER,
    ROTATE,
    CredentialResponse,
    EnrollmentRequest,
    EnrollmentResponse,
)
from agent.contracts.events import EVENTS_STORED_HEADER, MAX_STORED_LISTED
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import DesiredState, ReportedState
from agent.contracts.telemetry import CheckUpdateCommand
from agent.logs import get_logger
from control_plane.api.deps import (
    Context,
    CurrentDevice,
    CurrentOperator,
    DeviceOrViewer,
    DevicePrincipal,
    OperatorWriter,
    SessionDep,
    desired_state_entry,
)
from control_plane.api.params import DeviceIdPath
from control_plane.api.schemas import (
    CredentialRotate,
    DevicePublic,
    ErrorBody,
    LabelsApprove,
    LabelsUpdate,
    RetryCreate,
    RetryPublic,
)
from control_plane.api.views import device_public
from control_plane.auth import DEVICE_TOKEN_PREFIX, hash_token, new_token
from control_plane.bootstrap import Enrolled, NewDevice
from control_plane.bootstrap import enroll as enroll_device
from control_plane.context import AppContext
from control_plane.db.models import Device
from control_plane.desired import compute_desired_state, etag_matches
from control_plane.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
)
from control_plane.ingest.tables import DeviceEventRow

router = APIRouter(prefix="/v1/devices", tags=["devices"])
log = get_logger(__name__)


def _own(principal: DevicePrincipal, device_id: str) -> None:
    if principal.device_id != device_id:
        raise ForbiddenError("a device may reach only its own state")


def _get(session: SessionDep, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    return device


# Enrollments in the database at once, per event loop: the engine's 10 kept connections. Past
# them each enrollment would open and close a PostgreSQL connection of its own (a backend fork
# per enrollment), and past the pool's overflow a burst of enrollments would wait on the pool
# in the thread pool's threads, which the other routes need; the rest wait here, in the loop.
ENROLLMENT_CONCURRENCY = 10
_enrollment_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, anyio.CapacityLimiter] = (
    weakref.WeakKeyDictionary()
)


def _enrollment_limiter() -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = _enrollment_slots.get(loop)
    if limiter is None:
        limiter = _enrollment_slots[loop] = anyio.CapacityLimiter(ENROLLMENT_CONCURRENCY)
    return limiter


def _store_enrollment(
    ctx: AppContext, bootstrap_token: str, device: NewDevice, now: datetime
) -> Enrolled:
    with ctx.sessions() as session:
        return enroll_device(session, ctx.settings, bootstrap_token, device, now=now)


@router.post("/enroll", status_code=201, summary="Enroll a device with the bootstrap token")
async def enroll(body: EnrollmentRequest, ctx: Context) -> EnrollmentResponse:
    # one hop to the thread pool for the whole database part (a session dependency would add
    # one hop to open it and one to close it: a third of a busy replica's enrollment CPU)
    now = ctx.now()
    credential = new_token(DEVICE_TOKEN_PREFIX)
    device_id = f"dev-{secrets.token_hex(8)}"
    device = NewDevice(
        id=device_id,
        name=body.name,
        token_hash=hash_token(credential),
        asked_labels=body.labels,
        profile=body.profile.model_dump(mode="json"),
    )
    try:
        enrolled = await run_in_threadpool(
            _store_enrollment, ctx, body.bootstrap_token, device, now
        )
    except AuthError as exc:
        ctx.metrics.enrollments.labels("refused").inc()
        log.warning("enrollment_refused", name=body.name, reason=str(exc))
        raise
    ctx.metrics.enrollments.labels("enrolled").inc()
    log.info(
        "device_enrolled",
        device_id=device_id,
        name=body.name,
        arch=body.profile.arch,
        bootstrap_token=enrolled.token_name,
        labels=enrolled.labels,
        requested_labels=enrolled.requested_labels,
    )
    return EnrollmentResponse(
        device_id=device_id,
        credential=credential,
        desired_state_path=f"/v1/devices/{device_id}/desired-state",
        reported_state_path=f"/v1/devices/{device_id}/reported-state",
    )


@router.get("", summary="List devices")
def list_devices(session: SessionDep, operator: CurrentOperator) -> list[DevicePublic]:
    return [device_public(d) for d in session.scalars(select(Device).order_by(Device.id))]


@router.get("/{device_id}", summary="A device with its profile, reported and desired state")
def show_device(
    device_id: DeviceIdPath, session: SessionDep, operator: CurrentOperator
) -> DevicePublic:
    device = _get(session, device_id)
    public = device_public(device)
    public.desired = compute_desired_state(session, device)
    return public


@router.patch("/{device_id}/labels", summary="Set or remove labels (site, board, group, ...)")
def update_labels(
    device_id: DeviceIdPath,
    body: LabelsUpdate,
    session: SessionDep,
    operator: OperatorWriter,
    ctx: Context,
) -> DevicePublic:
    device = _get(session, device_id)
    labels = {k: v for k, v in device.labels.items() if k not in set(body.remove)}
    labels.update(body.set)
    if len(labels) > 32:
        raise InvalidInputError("a device holds at most 32 labels", field="set")
    device.labels = labels
    device.changed_at = ctx.now()
    # a key the operator decided is no longer a request
    decided = set(body.set) | set(body.remove)
    device.requested_labels = {
        k: v for k, v in (device.requested_labels or {}).items() if k not in decided
    }
    session.commit()
    ctx.desired.invalidate([device_id])
    log.info("labels_updated", device_id=device_id, labels=labels, by=operator.name)
    return device_public(device)


@router.post(
    "/{device_id}/labels/approve",
    summary="Approve labels the device asked for at enrollment (they then select assignments)",
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def approve_labels(
    device_id: DeviceIdPath,
    body: LabelsApprove,
    session: SessionDep,
    operator: OperatorWriter,
    ctx: Context,
) -> DevicePublic:
    device = _get(session, device_id)
    requested = dict(device.requested_labels or {})
    keys = list(requested) if body.keys is None else body.keys
    missing = [k for k in keys if k not in requested]
    if missing:
        raise ConflictError(f"device {device_id!r} did not ask for label(s) {', '.join(missing)}")
    labels = {**device.labels, **{k: requested.pop(k) for k in keys}}
    if len(labels) > 32:
        raise InvalidInputError("a device holds at most 32 labels", field="keys")
    device.labels = labels
    device.requested_labels = requested
    device.changed_at = ctx.now()
    session.commit()
    ctx.desired.invalidate([device_id])
    log.info("labels_approved", device_id=device_id, keys=keys, labels=labels, by=operator.name)
    return device_public(device)


@router.put("/{device_id}/profile", summary="The device reports its hardware profile")
def put_profile(
    device_id: DeviceIdPath,
    body: HardwareProfile,
    session: SessionDep,
    principal: CurrentDevice,
    ctx: Context,
) -> DevicePublic:
    _own(principal, device_id)
    device = _get(session, device_id)
    device.profile = body.model_dump(mode="json")
    device.last_seen_at = device.changed_at = ctx.now()
    session.commit()
    ctx.desired.invalidate([device_id])
    return device_public(device)


@router.get(
    "/{device_id}/desired-state",
    summary="What the device should run (ETag; If-None-Match answers 304)",
    response_model=DesiredState,
    responses={
        200: {"headers": {"ETag": {"schema": {"type": "string"}}}},
        304: {"description": "unchanged since the ETag given in If-None-Match"},
        403: {"model": ErrorBody},
    },
)
async def get_desired_state(
    device_id: DeviceIdPath,
    principal: DeviceOrViewer,
    ctx: Context,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
    edgefleet_events_since: Annotated[int | None, Header(ge=0, le=2**63 - 1)] = None,
) -> Response:
    if isinstance(principal, DevicePrincipal):
        _own(principal, device_id)
    entry, hit = await desired_state_entry(ctx, device_id)
    if isinstance(principal, DevicePrincipal) and ctx.presence is not None:
        ctx.presence.seen(device_id)
    cache = "hit" if hit else "miss"
    headers = {"ETag": entry.etag, "Cache-Control": "no-cache"}
    if isinstance(principal, DevicePrincipal) and principal.rotate:
        headers[CREDENTIAL_HEADER] = ROTATE
    if isinstance(principal, DevicePrincipal) and edgefleet_events_since is not None:
        # End-to-end confirmation: which of the device's events from there on are stored.
        stored = await run_in_threadpool(_stored_events, ctx, device_id, edgefleet_events_since)
        headers[EVENTS_STORED_HEADER] = ",".join(str(seq) for seq in stored)
    if etag_matches(if_none_match, entry.etag):
        ctx.metrics.desired_polls.labels("not_modified", cache).inc()
        return Response(status_code=304, headers=headers)
    ctx.metrics.desired_polls.labels("sent", cache).inc()
    return Response(entry.body, media_type="application/json", headers=headers)


def _stored_events(ctx: AppContext, device_id: str, since: int) -> list[int]:
    """The sequence numbers of ``device_id``'s stored events from ``since`` on (bounded)."""
    with ctx.sessions() as session:
        rows = session.execute(
            select(DeviceEventRow.seq)
            .where(DeviceEventRow.device_id == device_id, DeviceEventRow.seq >= since)
            .order_by(DeviceEventRow.seq)
            .limit(MAX_STORED_LISTED)
        ).all()
    return sorted({int(r.seq) for r in rows})


@router.put("/{device_id}/reported-state", summary="The device reports what it runs")
def put_reported_state(
    device_id: DeviceIdPath,
    body: ReportedState,
    session: SessionDep,
    principal: CurrentDevice,
    ctx: Context,
) -> DevicePublic:
    _own(principal, device_id)
    if body.device_id != device_id:
        raise InvalidInputError(
            f"reported device_id {body.device_id!r} is not {device_id!r}", field="device_id"
        )
    device = _get(session, device_id)
    now = ctx.now()
    device.reported = body.model_dump(mode="json")
    device.reported_at = device.last_seen_at = now
    session.commit()
    return device_public(device)


@router.post(
    "/{device_id}/retry",
    summary="Offer again a version the device rejected (its entries' generation grows)",
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def retry(
    device_id: DeviceIdPath,
    body: RetryCreate,
    session: SessionDep,
    operator: OperatorWriter,
    ctx: Context,
) -> RetryPublic:
    device = _get(session, device_id)
    offered = [m.name for m in compute_desired_state(session, device).models]
    if body.model is not None:
        if body.model not in offered:
            raise ConflictError(
                f"device {device_id!r} is offered no version of model {body.model!r}"
            )
        offered = [body.model]
    if not offered:
        raise ConflictError(f"device {device_id!r} is offered no model to retry")
    retries = dict(device.retries or {})
    for name in offered:
        retries[name] = int(retries.get(name, 0)) + 1
    device.retries = retries
    session.commit()
    ctx.desired.invalidate([device_id])
    desired = compute_desired_state(session, device)
    if ctx.ingester is not None:  # poll now rather than at the next interval
        ctx.ingester.publish_command(
            device_id,
            CheckUpdateCommand(
                id=secrets.token_hex(8), issued_at=ctx.now(), command="check-update"
            ),
        )
    log.info("retry_offered", device_id=device_id, models=offered, by=operator.name)
    return RetryPublic(device_id=device_id, models=offered, desired=desired)


@router.delete(
    "/{device_id}",
    status_code=204,
    summary="Delete a device; its credential is refused from now on",
    responses={404: {"model": ErrorBody}},
)
def delete_device(
    device_id: DeviceIdPath, session: SessionDep, operator: OperatorWriter, ctx: Context
) -> Response:
    _get(session, device_id)
    session.execute(delete(Device).where(Device.id == device_id))  # assignments cascade
    session.commit()
    _forget_credentials(ctx, device_id)
    if ctx.presence is not None:
        ctx.presence.forget(device_id)
    log.info("device_deleted", device_id=device_id, by=operator.name)
    return Response(status_code=204)


def _forget_credentials(ctx: Context, device_id: str) -> None:
    """Drop every cached credential of the device (current and previous) here and, through the
    desired-state invalidation every replica hears, on every replica: its next request is
    looked up."""
    ctx.credentials.forget_device(device_id)
    ctx.desired.invalidate([device_id])


@router.post(
    "/{device_id}/rotate-credential",
    summary="Ask the device to fetch a new credential with its current one, within grace_s",
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def rotate_credential(
    device_id: DeviceIdPath,
    body: CredentialRotate,
    session: SessionDep,
    operator: OperatorWriter,
    ctx: Context,
) -> DevicePublic:
    device = _get(session, device_id)
    if device.credential_revoked_at is not None:
        raise ConflictError(f"device {device_id!r}: its credential is revoked; enroll it again")
    device.credential_rotate_by = ctx.now() + timedelta(seconds=body.grace_s)
    session.commit()
    _forget_credentials(ctx, device_id)
    log.info(
        "credential_rotation_asked",
        device_id=device_id,
        rotate_by=device.credential_rotate_by.isoformat(),
        by=operator.name,
    )
    if ctx.ingester is not None:  # the hint rides on the next poll: ask for it now
        ctx.ingester.publish_command(
            device_id,
            CheckUpdateCommand(
                id=secrets.token_hex(8), issued_at=ctx.now(), command="check-update"
            ),
        )
    return device_public(device)


@router.post(
    "/{device_id}/revoke-credential",
    summary="Refuse the device's credential from now on (enroll it again to come back)",
    responses={404: {"model": ErrorBody}},
)
def revoke_credential(
    device_id: DeviceIdPath, session: SessionDep, operator: OperatorWriter, ctx: Context
) -> DevicePublic:
    device = _get(session, device_id)
    if device.credential_revoked_at is None:
        device.credential_revoked_at = ctx.now()
        device.credential_rotate_by = None
        session.commit()
    _forget_credentials(ctx, device_id)
    log.info("credential_revoked", device_id=device_id, by=operator.name)
    return device_public(device)


@router.post(
    "/{device_id}/credential",
    summary="The device fetches its new credential with its current one (rotation pending)",
    responses={403: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def fetch_credential(
    device_id: DeviceIdPath, session: SessionDep, principal: CurrentDevice, ctx: Context
) -> CredentialResponse:
    _own(principal, device_id)
    if not principal.rotate:
        raise ConflictError("no credential rotation is pending for this device")
    device = _get(session, device_id)
    credential = new_token(DEVICE_TOKEN_PREFIX)
    replaced = device.token_hash
    if not principal.previous:  # the first fetch: the current credential becomes the old one
        device.previous_token_hash = replaced
    # else a fetch again with the old credential: the answer before was lost, replace it
    device.token_hash = hash_token(credential)
    session.commit()
    ctx.credentials.forget(replaced)
    log.info("credential_issued", device_id=device_id, again=principal.previous)
    return CredentialResponse(device_id=device_id, credential=credential)

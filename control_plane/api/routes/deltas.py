"""Model deltas: the list an operator sees, and the download a device resumes with Range.

A device may download only the delta its desired state names; an operator any signed one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from control_plane.api.deps import (
    Context,
    CurrentOperator,
    DeviceOrViewer,
    DevicePrincipal,
    desired_state_entry,
)
from control_plane.api.params import ModelNamePath
from control_plane.api.schemas import ErrorBody
from control_plane.artifacts import parse_range
from control_plane.deltas import DELTA_PREFIX
from control_plane.errors import ForbiddenError, NotFoundError

router = APIRouter(tags=["deltas"])


class DeltaPublic(BaseModel):
    path: str  # the TUF target path, downloaded under /v1/artifacts/
    from_version: str
    from_variant: str
    to_version: str
    to_variant: str
    size: int  # bytes
    sha256: str
    full_size: int | None  # bytes of the full archive it rebuilds


@router.get("/v1/models/{name}/deltas", summary="The signed deltas between versions of a model")
async def list_deltas(
    name: ModelNamePath, ctx: Context, operator: CurrentOperator
) -> list[DeltaPublic]:
    if ctx.deltas is None:
        return []
    found = await run_in_threadpool(ctx.deltas.signed, name)
    return [
        DeltaPublic(
            path=d.path,
            from_version=d.from_version,
            from_variant=d.from_variant,
            to_version=d.to_version,
            to_variant=d.to_variant,
            size=d.size,
            sha256=d.sha256,
            full_size=d.full_size,
        )
        for d in found
    ]


@router.get(
    "/v1/artifacts/deltas/{rest:path}",
    summary="Download a model delta (zstd); supports Range",
    response_class=StreamingResponse,
    responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}, 416: {"model": ErrorBody}},
)
async def download_delta(
    *,
    rest: str,
    principal: DeviceOrViewer,
    ctx: Context,
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
) -> Response:
    path = DELTA_PREFIX + rest
    if isinstance(principal, DevicePrincipal):
        entry, _ = await desired_state_entry(ctx, principal.device_id)
        offered = {m.delta.artifact_path for m in entry.state.models if m.delta is not None}
        if path not in offered:
            raise ForbiddenError("this delta is not offered to this device")
    info = await run_in_threadpool(ctx.deltas.find, path) if ctx.deltas is not None else None
    if info is None:
        raise NotFoundError(f"no delta {path!r}")
    size = ctx.store.size(info.sha256)
    wanted = parse_range(range_header, size)
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{info.sha256}"'}
    media = "application/zstd"
    if wanted is None:
        headers["Content-Length"] = str(size)
        body = ctx.store.read_range(info.sha256, 0, size)
        return StreamingResponse(body, media_type=media, headers=headers)
    headers["Content-Length"] = str(wanted.length)
    headers["Content-Range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    body = ctx.store.read_range(info.sha256, wanted.start, wanted.length)
    return StreamingResponse(body, status_code=206, media_type=media, headers=headers)

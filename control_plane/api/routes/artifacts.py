"""Bundle archive downloads, streamed, with HTTP Range (206/416) so devices resume.

Operators may download any accepted variant; a device only what its desired state names.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from agent.contracts.manifest import NAME_RE
from control_plane.api.deps import (
    Context,
    DeviceOrViewer,
    DevicePrincipal,
    SessionDep,
    desired_state_entry,
)
from control_plane.api.params import ModelNamePath, VersionPath
from control_plane.api.schemas import ErrorBody
from control_plane.artifacts import parse_range
from control_plane.db.models import Model, ModelVersion, VariantRow
from control_plane.errors import ForbiddenError, NotFoundError
from control_plane.registry import archive_path

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])

VariantFile = Annotated[
    str, Path(pattern=NAME_RE.removesuffix("$") + r"\.tar$", description="<variant id>.tar")
]


@router.get(
    "/bundles/{name}/{version}/{variant_file}",
    summary="Download a variant's bundle archive (.tar); supports Range",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/x-tar": {}}},
        206: {"description": "partial content", "content": {"application/x-tar": {}}},
        403: {"model": ErrorBody},
        416: {"model": ErrorBody},
    },
)
async def download_bundle(
    *,
    name: ModelNamePath,
    version: VersionPath,
    variant_file: VariantFile,
    principal: DeviceOrViewer,
    session: SessionDep,
    ctx: Context,
    range_header: Annotated[str | None, Header(alias="Range", max_length=200)] = None,
) -> Response:
    variant_id = variant_file.removesuffix(".tar")
    if isinstance(principal, DevicePrincipal):
        entry, _ = await desired_state_entry(ctx, principal.device_id)
        wanted = archive_path(name, version, variant_id)
        offered = {v.artifact_path for m in entry.state.models for v in m.offered()}
        offered |= {m.shadow.artifact_path for m in entry.state.models if m.shadow is not None}
        if wanted not in offered:
            raise ForbiddenError("this artifact is not assigned to this device")
    row = await run_in_threadpool(
        lambda: session.scalar(
            select(VariantRow)
            .join(ModelVersion)
            .join(Model)
            .where(
                Model.name == name,
                ModelVersion.version == version,
                VariantRow.variant_id == variant_id,
                VariantRow.archive_sha256.is_not(None),
            )
        )
    )
    if row is None or row.archive_sha256 is None:
        raise NotFoundError(f"no accepted variant {variant_id!r} of {name} {version}")
    sha256 = row.archive_sha256
    size = ctx.store.size(sha256)
    wanted_range = parse_range(range_header, size)
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": f'"{sha256}"',
        "Content-Disposition": f'attachment; filename="{name}-{version}-{variant_file}"',
    }
    if wanted_range is None:
        headers["Content-Length"] = str(size)
        body = ctx.store.read_range(sha256, 0, size)
        return StreamingResponse(body, media_type="application/x-tar", headers=headers)
    headers["Content-Length"] = str(wanted_range.length)
    headers["Content-Range"] = f"bytes {wanted_range.start}-{wanted_range.end}/{size}"
    body = ctx.store.read_range(sha256, wanted_range.start, wanted_range.length)
    return StreamingResponse(body, status_code=206, media_type="application/x-tar", headers=headers)

"""TUF metadata, served read-only: ``GET /tuf/<file>`` for devices, ``GET /v1/tuf/root`` for
provisioning.

``/tuf/`` needs no credential: the metadata is signed, and a device trusts it only through the
root it was provisioned with (python-tuf's ngclient checks every signature, version and expiry).
The root for provisioning is an operator read, so a device image gets it over an authenticated
channel (``edgectl tuf root > root.json``). Keeping the files signed is
``control_plane.signing``'s job.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Response
from starlette.concurrency import run_in_threadpool

from control_plane.api.deps import Context, CurrentOperator
from control_plane.context import AppContext
from control_plane.errors import NotFoundError
from control_plane.signing import TufRepository

router = APIRouter(tags=["tuf"])

_FILE = re.compile(r"^(?:[1-9][0-9]{0,9}\.)?(?:root|targets|snapshot|timestamp)\.json$")
MetadataFile = Annotated[
    str,
    Path(
        max_length=32,
        description="timestamp.json, or <version>.root.json / .snapshot.json / .targets.json",
    ),
]


def _repository(ctx: AppContext) -> TufRepository:
    repo: TufRepository | None = getattr(ctx, "tuf", None)
    if repo is None:
        raise NotFoundError("this control plane keeps no signed metadata")
    return repo


@router.get(
    "/tuf/{filename}",
    summary="Signed TUF metadata (root, targets, snapshot, timestamp)",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}, 404: {"description": "no such file"}},
)
async def metadata_file(filename: MetadataFile, ctx: Context) -> Response:
    repo = _repository(ctx)
    if not _FILE.match(filename):
        raise NotFoundError(f"no metadata file {filename!r}")
    try:
        data = await run_in_threadpool(repo.metadata_bytes, filename)
    except NotFoundError as exc:
        raise NotFoundError(f"no metadata file {filename!r}") from exc
    # Versioned files never change; timestamp.json must never come from a cache.
    cache = "no-store" if filename == "timestamp.json" else "public, max-age=31536000, immutable"
    return Response(data, media_type="application/json", headers={"Cache-Control": cache})


@router.get(
    "/v1/tuf/root",
    summary="The current root metadata, to provision devices with",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}},
)
async def provisioning_root(ctx: Context, operator: CurrentOperator) -> Response:
    repo = _repository(ctx)
    data = await run_in_threadpool(repo.root_bytes)
    return Response(
        data,
        media_type="application/json",
        headers={"Content-Disposition": 'attachment; filename="root.json"'},
    )

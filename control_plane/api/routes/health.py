"""Liveness, readiness (the database answers) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from control_plane.api.deps import Context
from control_plane.context import AppContext
from control_plane.errors import UnavailableError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _ping(ctx: AppContext) -> None:
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise UnavailableError(f"database unreachable: {type(exc).__name__}") from exc


@router.get(
    "/readyz",
    summary="The database is reachable",
    responses={503: {"description": "database unreachable"}},
)
async def readyz(ctx: Context) -> dict[str, str]:
    await run_in_threadpool(_ping, ctx)
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(ctx: Context) -> Response:
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

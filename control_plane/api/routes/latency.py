"""The fleet's latency for a model version, read off the devices' merged sketches.

Every device sends, with each telemetry window, its latencies as a sketch
(``agent.contracts.sketch``); the ingester adds them up per model version and time bucket
(``latency_sketch_bins``). A percentile here is the percentile of every latency the fleet
reported in the span, within the sketch's relative accuracy: not an average of the devices'
percentiles, which is the percentile of nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from agent.contracts.sketch import RELATIVE_ACCURACY, quantile
from control_plane.api.deps import Context, CurrentOperator, SessionDep
from control_plane.api.params import ModelNamePath, VersionPath
from control_plane.api.schemas import ErrorBody
from control_plane.ingest.tables import ZERO_KEY, LatencySketchBin
from control_plane.registry import get_version

router = APIRouter(prefix="/v1/models", tags=["models"])


class FleetLatency(BaseModel):
    model: str
    version: str
    since: datetime
    until: datetime
    inferences: float = Field(description="latencies the sketches hold over the span")
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    relative_accuracy: float = Field(description="each percentile is within this of the true one")


@router.get(
    "/{name}/versions/{version}/latency",
    summary="Fleet latency percentiles of a version over the last minutes (merged sketches)",
    responses={404: {"model": ErrorBody}},
)
def fleet_latency(
    *,
    name: ModelNamePath,
    version: VersionPath,
    session: SessionDep,
    operator: CurrentOperator,
    ctx: Context,
    minutes: Annotated[int, Query(ge=1, le=7 * 24 * 60)] = 60,
) -> FleetLatency:
    get_version(session, name, version)  # 404 for an unknown model or version
    until = ctx.now()
    since = until - timedelta(minutes=minutes)
    rows = session.execute(
        select(LatencySketchBin.key, func.sum(LatencySketchBin.count))
        .where(LatencySketchBin.model == name)
        .where(LatencySketchBin.version == version)
        .where(LatencySketchBin.bucket_start >= since)
        .group_by(LatencySketchBin.key)
    ).all()
    counts = {int(key): float(count) for key, count in rows}
    zero = counts.pop(ZERO_KEY, 0.0)

    def at(q: float) -> float | None:
        return quantile(counts, q, zero_count=zero)

    return FleetLatency(
        model=name,
        version=version,
        since=since,
        until=until,
        inferences=zero + sum(counts.values()),
        p50_ms=at(0.50),
        p95_ms=at(0.95),
        p99_ms=at(0.99),
        relative_accuracy=RELATIVE_ACCURACY,
    )

"""Reading and writing rollouts: state rows with an optimistic lock, membership, decisions.

Every function takes the caller's ``Session`` and never commits: the service writes a rollout's
new state, its desired-state changes and its decision log in one transaction. A state written by
someone else in between (another replica, an operator) makes ``save`` raise ``ConflictError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timezone

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from control_plane.errors import ConflictError, NotFoundError
from control_plane.rollouts.controller import RolloutState
from control_plane.rollouts.tables import RolloutDecisionRow, RolloutDeviceRow, RolloutRow

__all__ = [
    "ACTIVE",
    "active_ids",
    "decisions",
    "insert",
    "load",
    "record",
    "save",
    "summaries",
]

ACTIVE: tuple[str, ...] = ("pending", "running", "paused")


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def insert(session: Session, state: RolloutState, *, actor: str, now: float) -> RolloutRow:
    spec = state.spec
    if session.get(RolloutRow, spec.id) is not None:
        raise ConflictError(f"rollout {spec.id!r} exists")
    row = RolloutRow(
        id=spec.id,
        model=spec.model,
        version=spec.version,
        status=state.status,
        state=state.model_dump(mode="json"),
        revision=1,
        created_at=_dt(now),
        created_by=actor,
        updated_at=_dt(now),
    )
    session.add(row)
    session.flush()
    return row


def load(session: Session, rollout_id: str) -> tuple[RolloutRow, RolloutState]:
    row = session.get(RolloutRow, rollout_id)
    if row is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return row, RolloutState.model_validate(row.state)


def active_ids(session: Session, *, model: str | None = None) -> list[str]:
    query = select(RolloutRow.id).where(RolloutRow.status.in_(ACTIVE))
    if model is not None:
        query = query.where(RolloutRow.model == model)
    return list(session.scalars(query.order_by(RolloutRow.created_at, RolloutRow.id)))


def save(session: Session, row: RolloutRow, state: RolloutState, *, now: float) -> None:
    """Write ``state`` over ``row`` if nobody wrote it since it was read; sync membership."""
    result = session.execute(
        update(RolloutRow)
        .where(RolloutRow.id == row.id, RolloutRow.revision == row.revision)
        .values(
            status=state.status,
            state=state.model_dump(mode="json"),
            revision=row.revision + 1,
            updated_at=_dt(now),
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise ConflictError(f"rollout {row.id!r} changed meanwhile; try again")
    known = {
        r.device_id: r
        for r in session.scalars(
            select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == row.id)
        )
    }
    rolled_back = set(state.rolled_back)
    for a in state.assigned:
        member = known.get(a.device_id)
        if member is None:
            session.add(
                RolloutDeviceRow(
                    rollout_id=row.id,
                    device_id=a.device_id,
                    wave=a.wave,
                    previous_version=a.previous_version,
                    baseline_p99_ms=a.baseline_p99_ms,
                    assigned_at=_dt(a.assigned_at),
                    rolled_back=a.device_id in rolled_back,
                )
            )
        elif member.rolled_back != (a.device_id in rolled_back):
            member.rolled_back = a.device_id in rolled_back


def record(
    session: Session,
    rollout_id: str,
    kind: str,
    *,
    now: float,
    actor: str,
    wave: int | None = None,
    devices: int = 0,
    detail: str = "",
) -> None:
    session.add(
        RolloutDecisionRow(
            rollout_id=rollout_id,
            at=_dt(now),
            kind=kind,
            wave=wave,
            devices=devices,
            detail=detail[:2000],
            actor=actor[:64],
        )
    )


def decisions(session: Session, rollout_id: str, *, limit: int = 200) -> list[RolloutDecisionRow]:
    rows = session.scalars(
        select(RolloutDecisionRow)
        .where(RolloutDecisionRow.rollout_id == rollout_id)
        .order_by(RolloutDecisionRow.id.desc())
        .limit(limit)
    )
    return list(reversed(list(rows)))


def summaries(session: Session, *, limit: int = 200) -> Iterable[RolloutRow]:
    return session.scalars(
        select(RolloutRow).order_by(RolloutRow.created_at.desc(), RolloutRow.id).limit(limit)
    )

"""Writing the ingester's rows in batches, on SQLite and PostgreSQL alike.

Owns the SQL: latest-state rows are upserted, merged part by part with the stored row
(``control_plane.ingest.merge``: with several ingesters each sees part of a device's stream, and
the newest of each part wins), bucket deltas are added to what
the row holds (so restarts and replicas merge), events are inserted once per unique key, and
retention deletes rows by age and then the oldest beyond a row cap. One flush is one
transaction; a failure rolls all of it back and the caller keeps the rows for the next try.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from sqlalchemy import Engine, Table, delete, func, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from control_plane.errors import StorageError
from control_plane.ingest.fleet import BucketDelta, BucketKey, SketchKey, Writes
from control_plane.ingest.merge import merge_link
from control_plane.ingest.tables import (
    DeviceEventRow,
    DeviceLink,
    LatencySketchBin,
    TelemetryBucket,
)

__all__ = ["EVENTS_CHANNEL", "FlushResult", "Retention", "TelemetryWriter", "lock_for_write"]

EVENTS_CHANNEL = "edgefleet_events"  # PostgreSQL NOTIFY channel: update events were stored


def lock_for_write(session: Session) -> None:
    """On SQLite, take the write lock now (``BEGIN IMMEDIATE``) instead of at the first write.

    A deferred transaction that reads first and writes later can be refused at once with
    "database is locked" when another connection wrote meanwhile; an immediate one waits for
    the lock (busy timeout) instead. Other databases need nothing.
    """
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@dataclass(frozen=True)
class Retention:
    """How much history is kept: by age (seconds) and by rows, whichever bites first."""

    bucket_max_age_s: float = 7 * 24 * 3600.0
    bucket_max_rows: int = 2_000_000
    event_max_age_s: float = 30 * 24 * 3600.0
    event_max_rows: int = 1_000_000


@dataclass(frozen=True)
class FlushResult:
    links: int
    buckets: int
    events: int
    duplicate_events: int


def _bucket_row(key: BucketKey, d: BucketDelta) -> dict[str, Any]:
    device_id, model, version, start = key
    return {
        "device_id": device_id,
        "model": model,
        "version": version,
        "bucket_start": datetime.fromtimestamp(start, timezone.utc),
        "windows": d.windows,
        "inferences": d.inferences,
        "failed": d.failed,
        "dropped": d.dropped,
        "window_s": d.window_s,
        "latency_weight": d.latency_weight,
        "p50_weighted_sum": d.p50_sum,
        "p95_weighted_sum": d.p95_sum,
        "p99_weighted_sum": d.p99_sum,
        "p99_max_ms": d.p99_max,
        "first_received_at": datetime.fromtimestamp(d.first_received, timezone.utc),
        "last_received_at": datetime.fromtimestamp(d.last_received, timezone.utc),
    }


_ADDITIVE = (
    "windows",
    "inferences",
    "failed",
    "dropped",
    "window_s",
    "latency_weight",
    "p50_weighted_sum",
    "p95_weighted_sum",
    "p99_weighted_sum",
)
LINKS = cast(Table, DeviceLink.__table__)
BUCKETS = cast(Table, TelemetryBucket.__table__)
EVENTS = cast(Table, DeviceEventRow.__table__)
SKETCHES = cast(Table, LatencySketchBin.__table__)
_LINK_COLUMNS = tuple(c.name for c in LINKS.columns if c.name != "device_id")


class TelemetryWriter:
    """Batch writes for one database; ``flush`` is called from the ingester's writer thread."""

    def __init__(self, engine: Engine, *, retention: Retention | None = None) -> None:
        self._engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self.retention = retention or Retention()
        dialect = engine.dialect.name
        if dialect == "postgresql":
            self._insert: Any = postgresql.insert
            self._greatest: Any = func.greatest
        elif dialect == "sqlite":
            self._insert = sqlite.insert
            self._greatest = func.max  # SQLite's two-argument max() is scalar
        else:
            raise StorageError(f"telemetry ingestion supports SQLite and PostgreSQL, not {dialect}")
        self._link_upsert = self._make_link_upsert()
        self._bucket_upsert = self._make_bucket_upsert()
        self._sketch_upsert = self._make_sketch_upsert()

    def _make_link_upsert(self) -> Any:
        stmt = self._insert(LINKS)
        return stmt.on_conflict_do_update(
            index_elements=["device_id"],
            set_={name: getattr(stmt.excluded, name) for name in _LINK_COLUMNS},
        )

    def _make_bucket_upsert(self) -> Any:
        table = BUCKETS
        stmt = self._insert(BUCKETS)
        ex = stmt.excluded
        set_: dict[str, Any] = {name: table.c[name] + getattr(ex, name) for name in _ADDITIVE}
        set_["p99_max_ms"] = self._greatest(table.c.p99_max_ms, ex.p99_max_ms)
        set_["last_received_at"] = ex.last_received_at
        return stmt.on_conflict_do_update(
            index_elements=["device_id", "model", "version", "bucket_start"], set_=set_
        )

    def _make_sketch_upsert(self) -> Any:
        table = SKETCHES
        stmt = self._insert(SKETCHES)
        return stmt.on_conflict_do_update(
            index_elements=["model", "version", "bucket_start", "key"],
            set_={"count": table.c.count + stmt.excluded.count},
        )

    def load_links(self, limit: int) -> list[dict[str, Any]]:
        """The stored latest-state rows, so a restarted ingester keeps status and updates."""
        try:
            with self._engine.connect() as conn:
                result = conn.execute(select(LINKS).limit(limit))
                return [dict(r._mapping) for r in result]
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot read device links: {exc}") from exc

    def flush(self, writes: Writes) -> FlushResult:
        """Write one batch in one transaction; raises ``StorageError`` and writes nothing."""
        duplicates = 0
        try:
            with self._sessions() as session, session.begin():
                lock_for_write(session)
                if writes.events:
                    events = self._new_events(session, writes.events)
                    duplicates = len(writes.events) - len(events)
                    if events:
                        session.execute(
                            self._insert(EVENTS).on_conflict_do_nothing(
                                index_elements=["device_id", "seq", "device_ts"]
                            ),
                            events,
                        )
                    if events and self._engine.dialect.name == "postgresql":
                        # delivered at commit to the rollout runner, whichever replica runs it
                        session.execute(text(f"NOTIFY {EVENTS_CHANNEL}"))
                if writes.links:
                    links = sorted(writes.links, key=lambda r: str(r["device_id"]))
                    stored = self._stored_links(session, [str(r["device_id"]) for r in links])
                    links = [merge_link(stored.get(str(r["device_id"])), r) for r in links]
                    session.execute(self._link_upsert, links)
                if writes.buckets:
                    # A fixed order, so two replicas upserting the same rows cannot deadlock.
                    rows = [_bucket_row(k, d) for k, d in sorted(writes.buckets, key=_bucket_order)]
                    session.execute(self._bucket_upsert, rows)
                if writes.sketches:
                    session.execute(self._sketch_upsert, _sketch_rows(writes.sketches))
        except SQLAlchemyError as exc:
            raise StorageError(f"telemetry flush failed: {type(exc).__name__}: {exc}") from exc
        return FlushResult(
            links=len(writes.links),
            buckets=len(writes.buckets),
            events=len(writes.events) - duplicates,
            duplicate_events=duplicates,
        )

    def _stored_links(self, session: Session, device_ids: list[str]) -> dict[str, Any]:
        """The stored rows of these devices, locked until the transaction ends (PostgreSQL:
        in device id order, the order every writer locks in, so two cannot deadlock)."""
        out: dict[str, Any] = {}
        for start in range(0, len(device_ids), 1000):
            query = (
                select(LINKS)
                .where(LINKS.c.device_id.in_(device_ids[start : start + 1000]))
                .order_by(LINKS.c.device_id)
            )
            if self._engine.dialect.name == "postgresql":
                query = query.with_for_update()
            for row in session.execute(query):
                out[str(row.device_id)] = dict(row._mapping)
        return out

    @staticmethod
    def _new_events(session: Session, events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop events already stored (a replay after a restart of either side) or repeated."""
        devices = {str(e["device_id"]) for e in events}
        seqs = {int(e["seq"]) for e in events}
        stored = {
            (d, s, ts)
            for d, s, ts in session.execute(
                select(DeviceEventRow.device_id, DeviceEventRow.seq, DeviceEventRow.device_ts)
                .where(DeviceEventRow.device_id.in_(devices))
                .where(DeviceEventRow.seq.in_(seqs))
            )
        }
        fresh: list[dict[str, Any]] = []
        for e in events:
            key = (e["device_id"], e["seq"], e["device_ts"])
            if key not in stored:
                stored.add(key)
                fresh.append(e)
        return fresh

    def prune(self, now: datetime) -> tuple[int, int]:
        """Apply the retention; the numbers of bucket and event rows deleted."""
        r = self.retention
        try:
            with self._sessions() as session, session.begin():
                lock_for_write(session)
                buckets = self._prune(
                    session,
                    TelemetryBucket,
                    TelemetryBucket.bucket_start,
                    now - timedelta(seconds=r.bucket_max_age_s),
                    r.bucket_max_rows,
                )
                self._prune(
                    session,
                    LatencySketchBin,
                    LatencySketchBin.bucket_start,
                    now - timedelta(seconds=r.bucket_max_age_s),
                    r.bucket_max_rows,
                )
                events = self._prune(
                    session,
                    DeviceEventRow,
                    DeviceEventRow.received_at,
                    now - timedelta(seconds=r.event_max_age_s),
                    r.event_max_rows,
                )
        except SQLAlchemyError as exc:
            raise StorageError(f"telemetry retention failed: {exc}") from exc
        return buckets, events

    @staticmethod
    def _prune(
        session: Session, table: Any, time_column: Any, cutoff: datetime, max_rows: int
    ) -> int:
        deleted = _rowcount(session.execute(delete(table).where(time_column < cutoff)))
        # Keep the newest max_rows by id (ids grow with insertion, and rows arrive in time order).
        boundary = session.scalar(
            select(table.id).order_by(table.id.desc()).offset(max_rows).limit(1)
        )
        if boundary is not None:
            deleted += _rowcount(session.execute(delete(table).where(table.id <= boundary)))
        return deleted


def _rowcount(result: Any) -> int:
    count = getattr(result, "rowcount", 0)  # a CursorResult for DML
    return int(count) if count and count > 0 else 0


def _sketch_rows(sketches: Sequence[tuple[SketchKey, dict[int, float]]]) -> list[dict[str, Any]]:
    """One row per (model, version, bucket, key), in a fixed order (no deadlock between
    replicas adding to the same rows)."""
    rows = [
        {
            "model": model,
            "version": version,
            "bucket_start": datetime.fromtimestamp(start, timezone.utc),
            "key": key,
            "count": count,
        }
        for (model, version, start), bins in sketches
        for key, count in bins.items()
    ]
    rows.sort(key=lambda r: (r["model"], r["version"], r["bucket_start"], r["key"]))
    return rows


def _bucket_order(item: tuple[BucketKey, BucketDelta]) -> BucketKey:
    return item[0]

"""The ingester's tables: each device's latest link state, the per-model time series, events.

Owns the row shapes only; what is written when is ``control_plane.ingest.writer``'s business and
the schema change is migration ``0002_telemetry_rollouts``. Every time that orders or buckets
rows is the control plane's *receive* time; the device's own timestamps are kept beside it
(``*_device_ts``), never trusted for ordering, so a device with a wrong clock cannot put its
data in the past or the future.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db.models import Base

__all__ = ["ZERO_KEY", "DeviceEventRow", "DeviceLink", "LatencySketchBin", "TelemetryBucket"]

ZERO_KEY = -2_000_000_000  # the key under which a sketch's zero_count is stored

DEVICE_ID_LEN = 128  # agent.contracts.telemetry.DEVICE_ID_PATTERN allows 128 characters


class DeviceLink(Base):
    """One device as its MQTT traffic describes it: online/offline, models, latest telemetry.

    Keyed by the MQTT device id (not a foreign key: a device may talk to the broker before or
    without enrolling). ``models`` holds, per model name, the latest window and a rolled-up
    health over the last ``health_window_s`` (what the rollout runner reads); ``updates`` the
    latest update event per model.
    """

    __tablename__ = "device_links"

    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN), primary_key=True)
    status: Mapped[str | None] = mapped_column(String(16))  # online | offline | None: unknown
    status_reason: Mapped[str | None] = mapped_column(String(64))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    slots: Mapped[list[Any]] = mapped_column(JSON)  # SlotIdentity dumps from the last birth
    profile: Mapped[dict[str, Any] | None]
    state_received_at: Mapped[datetime | None]
    state_device_ts: Mapped[datetime | None]
    telemetry_received_at: Mapped[datetime | None]
    telemetry_device_ts: Mapped[datetime | None]
    telemetry_seq: Mapped[int | None] = mapped_column(BigInteger)
    clock_skew_s: Mapped[float | None] = mapped_column(Float)  # device ts - receive time
    system: Mapped[dict[str, Any] | None]
    models: Mapped[dict[str, Any]]
    updates: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime]


class TelemetryBucket(Base):
    """A device's model statistics over one bucket of receive time (1 minute by default).

    Additive columns, so replicas and restarts merge by adding: percentiles are kept as sums
    weighted by inference count (``p99_ms = p99_weighted_sum / latency_weight``), which is the
    count-weighted mean of the windows' percentiles, plus the worst window's p99.
    """

    __tablename__ = "telemetry_buckets"
    __table_args__ = (
        UniqueConstraint(
            "device_id", "model", "version", "bucket_start", name="uq_telemetry_buckets_key"
        ),
        Index("ix_telemetry_buckets_bucket_start", "bucket_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN))
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))  # "" when the device did not say
    bucket_start: Mapped[datetime]
    windows: Mapped[int] = mapped_column(BigInteger)
    inferences: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)
    dropped: Mapped[int] = mapped_column(BigInteger)
    window_s: Mapped[float] = mapped_column(Float)  # sum of the windows' lengths
    latency_weight: Mapped[int] = mapped_column(BigInteger)  # inferences of windows with latency
    p50_weighted_sum: Mapped[float] = mapped_column(Float)
    p95_weighted_sum: Mapped[float] = mapped_column(Float)
    p99_weighted_sum: Mapped[float] = mapped_column(Float)
    p99_max_ms: Mapped[float] = mapped_column(Float)
    first_received_at: Mapped[datetime]
    last_received_at: Mapped[datetime]


class LatencySketchBin(Base):
    """The fleet's latencies for one model version over one bucket of receive time: how many
    fell in each key of the sketch mapping (``agent.contracts.sketch``), added up over every
    device and window, so a fleet percentile over any span is read off the summed counts (not
    averaged from the devices' percentiles). ``ZERO_KEY`` holds the zero bucket."""

    __tablename__ = "latency_sketch_bins"
    __table_args__ = (
        UniqueConstraint(
            "model", "version", "bucket_start", "key", name="uq_latency_sketch_bins_key"
        ),
        Index("ix_latency_sketch_bins_bucket_start", "bucket_start"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))  # "" when the device did not say
    bucket_start: Mapped[datetime]
    key: Mapped[int] = mapped_column(Integer)
    count: Mapped[float] = mapped_column(Float)


class DeviceEventRow(Base):
    """An update lifecycle event, stored once per ``(device_id, seq, device_ts)``.

    The device timestamp is part of the key because an agent that restarts its event counter
    would otherwise have new events taken for replays; a replay after a reconnect repeats all
    three and is dropped.
    """

    __tablename__ = "device_events"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", "device_ts", name="uq_device_events_key"),
        Index("ix_device_events_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(DEVICE_ID_LEN))
    seq: Mapped[int] = mapped_column(BigInteger)
    device_ts: Mapped[datetime]
    received_at: Mapped[datetime]
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(64))
    from_version: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]]

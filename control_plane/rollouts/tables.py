"""Rollout rows: the spec and controller state, device membership and the decision log.

Owns the row shapes; ``store`` reads and writes them, the migration is
``0002_telemetry_rollouts``. ``state`` is the controller's ``RolloutState`` as JSON (the source
of truth for decisions); ``rollout_devices`` repeats its membership in rows so "which rollout
touched this device" is a query, and ``rollout_decisions`` keeps every action with its reason.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from control_plane.db.models import Base

__all__ = ["RolloutDecisionRow", "RolloutDeviceRow", "RolloutRow"]


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)
    state: Mapped[dict[str, Any]]
    revision: Mapped[int] = mapped_column(Integer)  # optimistic lock: +1 on every write
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime]


class RolloutDeviceRow(Base):
    __tablename__ = "rollout_devices"
    __table_args__ = (Index("ix_rollout_devices_device_id", "device_id"),)

    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    previous_version: Mapped[str | None] = mapped_column(String(64))
    baseline_p99_ms: Mapped[float | None] = mapped_column(Float)
    assigned_at: Mapped[datetime]
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False)


class RolloutDecisionRow(Base):
    __tablename__ = "rollout_decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[str] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(16))  # create|assign|promote|abort|complete|...
    wave: Mapped[int | None] = mapped_column(Integer)
    devices: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(Text, default="")
    actor: Mapped[str] = mapped_column(String(64))  # "controller" or the operator's token name

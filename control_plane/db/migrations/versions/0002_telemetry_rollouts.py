"""Telemetry ingestion and staged rollouts: device links, time buckets, events, rollouts.

Revision ID: 0002_telemetry_rollouts
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_telemetry_rollouts"
down_revision = "0001"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "device_links",
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("status_reason", sa.String(64), nullable=True),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("slots", sa.JSON(), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=True),
        sa.Column("state_received_at", _TS, nullable=True),
        sa.Column("state_device_ts", _TS, nullable=True),
        sa.Column("telemetry_received_at", _TS, nullable=True),
        sa.Column("telemetry_device_ts", _TS, nullable=True),
        sa.Column("telemetry_seq", sa.BigInteger(), nullable=True),
        sa.Column("clock_skew_s", sa.Float(), nullable=True),
        sa.Column("system", sa.JSON(), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("updates", sa.JSON(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "telemetry_buckets",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("bucket_start", _TS, nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("failed", sa.BigInteger(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.Column("window_s", sa.Float(), nullable=False),
        sa.Column("latency_weight", sa.BigInteger(), nullable=False),
        sa.Column("p50_weighted_sum", sa.Float(), nullable=False),
        sa.Column("p95_weighted_sum", sa.Float(), nullable=False),
        sa.Column("p99_weighted_sum", sa.Float(), nullable=False),
        sa.Column("p99_max_ms", sa.Float(), nullable=False),
        sa.Column("first_received_at", _TS, nullable=False),
        sa.Column("last_received_at", _TS, nullable=False),
        sa.UniqueConstraint(
            "device_id", "model", "version", "bucket_start", name="uq_telemetry_buckets_key"
        ),
    )
    op.create_index("ix_telemetry_buckets_bucket_start", "telemetry_buckets", ["bucket_start"])
    op.create_table(
        "device_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("device_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("device_ts", _TS, nullable=False),
        sa.Column("received_at", _TS, nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("from_version", sa.String(64), nullable=True),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.UniqueConstraint("device_id", "seq", "device_ts", name="uq_device_events_key"),
    )
    op.create_index("ix_device_events_received_at", "device_events", ["received_at"])
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )
    op.create_table(
        "rollout_devices",
        sa.Column(
            "rollout_id",
            sa.String(64),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("previous_version", sa.String(64), nullable=True),
        sa.Column("baseline_p99_ms", sa.Float(), nullable=True),
        sa.Column("assigned_at", _TS, nullable=False),
        sa.Column("rolled_back", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_rollout_devices_device_id", "rollout_devices", ["device_id"])
    op.create_table(
        "rollout_decisions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "rollout_id",
            sa.String(64),
            sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
            nullable=False,
            index=True,
        ),
        sa.Column("at", _TS, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=True),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "rollout_decisions",
        "rollout_devices",
        "rollouts",
        "device_events",
        "telemetry_buckets",
        "device_links",
    ):
        op.drop_table(table)

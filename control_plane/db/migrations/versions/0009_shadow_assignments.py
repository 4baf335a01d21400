"""Shadow assignments: a version a device runs beside its serving one (a rollout's shadow stage).

Revision ID: 0009_shadow_assignments
Revises: 0008_preprocess
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_shadow_assignments"
down_revision = "0008_preprocess"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "shadow_assignments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "version_id",
            sa.Integer(),
            sa.ForeignKey("model_versions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "device_id",
            sa.String(length=40),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("rollout_id", sa.String(length=64), nullable=False),
        sa.Column("sample_share", sa.Float(), nullable=False),
        sa.Column("max_busy_share", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_shadow_assignments_device_id", "shadow_assignments", ["device_id"])
    op.create_index("ix_shadow_assignments_rollout_id", "shadow_assignments", ["rollout_id"])


def downgrade() -> None:
    op.drop_index("ix_shadow_assignments_rollout_id", table_name="shadow_assignments")
    op.drop_index("ix_shadow_assignments_device_id", table_name="shadow_assignments")
    op.drop_table("shadow_assignments")

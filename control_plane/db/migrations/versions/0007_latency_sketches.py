"""Fleet latency sketches: counts per sketch key, model version and time bucket.

Revision ID: 0007_latency_sketches
Revises: 0006_identity
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_latency_sketches"
down_revision = "0006_identity"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "latency_sketch_bins",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("key", sa.Integer(), nullable=False),
        sa.Column("count", sa.Float(), nullable=False),
        sa.UniqueConstraint(
            "model", "version", "bucket_start", "key", name="uq_latency_sketch_bins_key"
        ),
    )
    op.create_index("ix_latency_sketch_bins_bucket_start", "latency_sketch_bins", ["bucket_start"])


def downgrade() -> None:
    op.drop_index("ix_latency_sketch_bins_bucket_start", table_name="latency_sketch_bins")
    op.drop_table("latency_sketch_bins")

"""Preprocessing declared with a model version (resize, layout, mean/std, color, fit), written
into every variant's manifest by the build.

Revision ID: 0008_preprocess
Revises: 0007_latency_sketches
Create Date: 2025-01-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_preprocess"
down_revision = "0007_latency_sketches"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("preprocessing", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("preprocessing")

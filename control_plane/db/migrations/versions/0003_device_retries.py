"""Operator retries per device and model (the desired state's per-entry generation).

Revision ID: 0003_device_retries
Revises: 0002_telemetry_rollouts
Create Date: 2025-01-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_device_retries"
down_revision = "0002_telemetry_rollouts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("retries", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("retries")

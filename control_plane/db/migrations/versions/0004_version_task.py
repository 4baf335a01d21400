"""The accuracy gate's task per model version (classification, detection, ...).

Revision ID: 0004_version_task
Revises: 0003_device_retries
Create Date: 2025-01-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_version_task"
down_revision = "0003_device_retries"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("task", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("task")

"""When an operator or the device last changed a device's labels or profile.

The rollout runner's cached snapshot reads a device again when one of its stamps moves
(``reported_at``, ``enrolled_at``, ``changed_at``); a label or profile edit carried none before.

Revision ID: 0010_device_changed_at
Revises: 0009_shadow_assignments
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_device_changed_at"
down_revision = "0009_shadow_assignments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("changed_at")

"""Identity and trust: bootstrap tokens with bounds, token expiry, device credential rotation.

``bootstrap_tokens``: enrollment tokens with an expiry, a use count and the labels they bind
(the settings' token gets a row of its own at its first use). ``api_tokens.expires_at``: tokens
made before this revision expire 90 days after the upgrade. ``devices``: the labels a device asked
for at enrollment (``requested_labels``, selecting nothing until approved), the bootstrap token
it enrolled with, and its credential's rotation and revocation.

Revision ID: 0006_identity
Revises: 0005_leases
Create Date: 2025-01-06
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import op

revision = "0006_identity"
down_revision = "0005_leases"
branch_labels = None
depends_on = None

_EXISTING_TOKENS_LIFETIME = timedelta(days=90)


def upgrade() -> None:
    op.create_table(
        "bootstrap_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False, unique=True),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("max_uses", sa.Integer(), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    tokens = sa.table("api_tokens", sa.column("expires_at", sa.DateTime(timezone=True)))
    op.execute(
        tokens.update()
        .where(tokens.c.expires_at.is_(None))
        .values(expires_at=datetime.now(timezone.utc) + _EXISTING_TOKENS_LIFETIME)
    )
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("requested_labels", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("bootstrap_token_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("previous_token_hash", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("credential_rotate_by", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("credential_revoked_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.create_index("ix_devices_previous_token_hash", ["previous_token_hash"])


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_index("ix_devices_previous_token_hash")
        batch.drop_column("credential_revoked_at")
        batch.drop_column("credential_rotate_by")
        batch.drop_column("previous_token_hash")
        batch.drop_column("bootstrap_token_id")
        batch.drop_column("requested_labels")
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("expires_at")
    op.drop_table("bootstrap_tokens")

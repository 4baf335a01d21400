"""Bootstrap tokens: who may enroll a device, how often, until when, and with which labels.

Owns the decision whether a presented bootstrap token may enroll one more device, and counts
the use. Operators create tokens (``POST /v1/bootstrap-tokens``: labels, ``max_uses``,
expiry); the settings' token (``EDGEFLEET_CP__BOOTSTRAP_TOKEN``) keeps working with the bounds
the settings give it (``BOOTSTRAP_TOKEN_MAX_USES``, ``BOOTSTRAP_TOKEN_EXPIRES_AT``, both unset by
default) and binds no labels. Its uses are counted in a row of its own, made at its first use
and keyed by its hash, so a new settings token starts a new count. The routes own the HTTP side;
the device row is written by the enrollment route in the same transaction as the use.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane.auth import hash_token, tokens_equal
from control_plane.db.models import BootstrapToken
from control_plane.errors import AuthError
from control_plane.settings import Settings

__all__ = ["SETTINGS_TOKEN_NAME", "redeem"]

SETTINGS_TOKEN_NAME = "settings"  # noqa: S105 - a row name, not a secret


def _by_hash(session: Session, token_hash: str) -> BootstrapToken | None:
    return session.scalar(select(BootstrapToken).where(BootstrapToken.token_hash == token_hash))


def _settings_row(session: Session, settings: Settings, now: datetime) -> BootstrapToken:
    """The settings token's row, made (and committed) at its first use; its bounds follow the
    settings."""
    token_hash = hash_token(settings.bootstrap_token.get_secret_value())
    row = _by_hash(session, token_hash)
    if row is None:
        session.add(
            BootstrapToken(
                name=SETTINGS_TOKEN_NAME,
                token_hash=token_hash,
                labels={},
                uses=0,
                created_at=now,
                created_by=SETTINGS_TOKEN_NAME,
            )
        )
        try:
            session.commit()
        except IntegrityError:  # another replica made it first
            session.rollback()
        row = _by_hash(session, token_hash)
        assert row is not None
    row.max_uses = settings.bootstrap_token_max_uses
    row.expires_at = settings.bootstrap_token_expires_at
    session.flush()
    return row


def redeem(session: Session, settings: Settings, token: str, *, now: datetime) -> BootstrapToken:
    """The token's row with one more use counted (uncommitted), or ``AuthError`` saying why not.

    The use is counted by a conditional ``UPDATE`` (``uses < max_uses``), so concurrent
    enrollments on any number of replicas never exceed the bound.
    """
    if tokens_equal(token, settings.bootstrap_token.get_secret_value()):
        row = _settings_row(session, settings, now)
    else:
        found = _by_hash(session, hash_token(token))
        if found is None or found.created_by == SETTINGS_TOKEN_NAME:  # an old settings token
            raise AuthError("bootstrap token refused")
        row = found
    if row.revoked_at is not None:
        raise AuthError(f"bootstrap token {row.name!r} is revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthError(f"bootstrap token {row.name!r} expired at {row.expires_at.isoformat()}")
    counted = update(BootstrapToken).where(BootstrapToken.id == row.id)
    if row.max_uses is not None:
        counted = counted.where(BootstrapToken.uses < row.max_uses)
    result = session.execute(
        counted.values(uses=BootstrapToken.uses + 1).execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise AuthError(f"bootstrap token {row.name!r} is used up ({row.max_uses} enrollments)")
    session.refresh(row)
    return row

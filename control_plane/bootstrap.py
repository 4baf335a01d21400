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

import threading
from datetime import datetime

from sqlalchemy import or_, select, update
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


# Settings rows known to exist with the settings' bounds, per database: checked once per
# process instead of once per enrollment (a site enrolling thousands of robots at once).
_SYNCED: set[tuple[str, str, int | None, datetime | None]] = set()
_SYNCED_LOCK = threading.Lock()


def _settings_row(session: Session, settings: Settings, now: datetime) -> None:
    """Make sure the settings token's row exists (made and committed at its first use) and
    carries the settings' bounds."""
    token_hash = hash_token(settings.bootstrap_token.get_secret_value())
    bounds = (settings.bootstrap_token_max_uses, settings.bootstrap_token_expires_at)
    key = (str(session.get_bind().engine.url), token_hash, *bounds)
    with _SYNCED_LOCK:
        if key in _SYNCED:
            return
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
    row.max_uses, row.expires_at = bounds
    session.commit()
    with _SYNCED_LOCK:
        _SYNCED.add(key)


def _count_use(session: Session, token_hash: str, *, settings_token: bool) -> BootstrapToken | None:
    """One more use of the token, counted by one conditional ``UPDATE ... RETURNING`` (not
    revoked, not used up), so concurrent enrollments on any number of replicas never exceed the
    bound; the row, or None when nothing was counted."""
    stmt = (
        update(BootstrapToken)
        .where(BootstrapToken.token_hash == token_hash)
        .where(BootstrapToken.revoked_at.is_(None))
        .where(
            or_(BootstrapToken.max_uses.is_(None), BootstrapToken.uses < BootstrapToken.max_uses)
        )
        .values(uses=BootstrapToken.uses + 1)
        .returning(BootstrapToken)
        .execution_options(synchronize_session=False)
    )
    if not settings_token:  # an old settings token's row never enrolls by itself
        stmt = stmt.where(BootstrapToken.created_by != SETTINGS_TOKEN_NAME)
    return session.scalars(stmt).one_or_none()


def redeem(session: Session, settings: Settings, token: str, *, now: datetime) -> BootstrapToken:
    """The token's row with one more use counted (uncommitted), or ``AuthError`` saying why not
    (the caller rolls back, so a refused token is never counted)."""
    settings_token = tokens_equal(token, settings.bootstrap_token.get_secret_value())
    token_hash = hash_token(token)
    if settings_token:
        _settings_row(session, settings, now)
    row = _count_use(session, token_hash, settings_token=settings_token)
    if row is None and settings_token:  # the row went (a restored database): make it again
        with _SYNCED_LOCK:
            _SYNCED.clear()
        _settings_row(session, settings, now)
        row = _count_use(session, token_hash, settings_token=True)
    if row is None:
        raise _refusal(session, token_hash, settings_token=settings_token)
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthError(f"bootstrap token {row.name!r} expired at {row.expires_at.isoformat()}")
    return row


def _refusal(session: Session, token_hash: str, *, settings_token: bool) -> AuthError:
    """Why a token counted no use: unknown, revoked or used up."""
    row = _by_hash(session, token_hash)
    if row is None or (row.created_by == SETTINGS_TOKEN_NAME and not settings_token):
        return AuthError("bootstrap token refused")
    if row.revoked_at is not None:
        return AuthError(f"bootstrap token {row.name!r} is revoked")
    return AuthError(f"bootstrap token {row.name!r} is used up ({row.max_uses} enrollments)")

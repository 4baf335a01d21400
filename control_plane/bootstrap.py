"""Bootstrap tokens: who may enroll a device, how often, until when, and with which labels.

Owns the decision whether a presented bootstrap token may enroll one more device, and counts
the use. Operators create tokens (``POST /v1/bootstrap-tokens``: labels, ``max_uses``,
expiry); the settings' token (``EDGEFLEET_CP__BOOTSTRAP_TOKEN``) keeps working with the bounds
the settings give it (``BOOTSTRAP_TOKEN_MAX_USES``, ``BOOTSTRAP_TOKEN_EXPIRES_AT``, both unset by
default) and binds no labels. Its uses are counted in a row of its own, made at its first use
and keyed by its hash, so a new settings token starts a new count.

``enroll`` writes the new device's row and counts the use together, so a refused token is never
counted and a counted use always has its device. Every enrollment with one token updates that
token's row, so enrollments with one token queue on its row lock: on PostgreSQL the use and the
insert are one autocommitted statement (``WITH used AS (UPDATE ... RETURNING) INSERT ...
SELECT``), which holds the lock only while the server runs it, never across a round trip to this
process (held across the round trip and the GIL of a busy replica, it capped a site's
enrollment at about 190 devices/s). SQLite, which has one writer at a time anyway, does the
same in one transaction. The routes own the HTTP side: the device's id, credential and profile.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    Connection,
    bindparam,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from control_plane.auth import hash_token, tokens_equal
from control_plane.db.models import BootstrapToken, Device, UTCDateTime
from control_plane.errors import AuthError
from control_plane.settings import Settings

__all__ = ["SETTINGS_TOKEN_NAME", "Enrolled", "NewDevice", "enroll", "redeem"]

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


def _usable(token_hash: str, *, settings_token: bool) -> list[ColumnElement[bool]]:
    """The conditions under which the token's row may count one more use: not revoked, not used
    up (an old settings token's row never enrolls by itself)."""
    conditions = [
        BootstrapToken.token_hash == token_hash,
        BootstrapToken.revoked_at.is_(None),
        or_(BootstrapToken.max_uses.is_(None), BootstrapToken.uses < BootstrapToken.max_uses),
    ]
    if not settings_token:
        conditions.append(BootstrapToken.created_by != SETTINGS_TOKEN_NAME)
    return conditions


def _count_use(session: Session, token_hash: str, *, settings_token: bool) -> BootstrapToken | None:
    """One more use of the token, counted by one conditional ``UPDATE ... RETURNING`` (not
    revoked, not used up), so concurrent enrollments on any number of replicas never exceed the
    bound; the row, or None when nothing was counted."""
    stmt = (
        update(BootstrapToken)
        .where(*_usable(token_hash, settings_token=settings_token))
        .values(uses=BootstrapToken.uses + 1)
        .returning(BootstrapToken)
        .execution_options(synchronize_session=False)
    )
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


def _refusal(
    session: Session, token_hash: str, *, settings_token: bool, now: datetime | None = None
) -> AuthError:
    """Why a token counted no use: unknown, revoked, expired (when ``now`` is given: the
    single-statement enrollment checks expiry before counting) or used up."""
    row = _by_hash(session, token_hash)
    if row is None or (row.created_by == SETTINGS_TOKEN_NAME and not settings_token):
        return AuthError("bootstrap token refused")
    if row.revoked_at is not None:
        return AuthError(f"bootstrap token {row.name!r} is revoked")
    if now is not None and row.expires_at is not None and row.expires_at <= now:
        return AuthError(f"bootstrap token {row.name!r} expired at {row.expires_at.isoformat()}")
    return AuthError(f"bootstrap token {row.name!r} is used up ({row.max_uses} enrollments)")


@dataclass(frozen=True)
class NewDevice:
    """What the enrollment route decided about the device: its id, its credential's hash, the
    labels it asked for and its hardware profile (JSON)."""

    id: str
    name: str
    token_hash: str
    asked_labels: Mapping[str, str]
    profile: dict[str, Any]


@dataclass(frozen=True)
class Enrolled:
    """The enrollment as stored: the token that allowed it, the labels that token bound (they
    select at once) and the ones the device asked for beyond them (they wait for approval)."""

    token_name: str
    labels: dict[str, str]
    requested_labels: dict[str, str]


def _requested(asked: Mapping[str, str], bound: Mapping[str, Any]) -> dict[str, str]:
    return {k: v for k, v in asked.items() if bound.get(k) != v}


def enroll(
    session: Session, settings: Settings, token: str, device: NewDevice, *, now: datetime
) -> Enrolled:
    """Count one use of ``token`` and store ``device`` with it, both or neither (committed);
    ``AuthError`` saying why the token was refused."""
    settings_token = tokens_equal(token, settings.bootstrap_token.get_secret_value())
    if session.get_bind().dialect.name != "postgresql":
        try:
            row = redeem(session, settings, token, now=now)
        except AuthError:
            session.rollback()
            raise
        bound = dict(row.labels)
        requested = _requested(device.asked_labels, bound)
        session.add(_device_row(device, bound, requested, row.id, now))
        session.commit()
        return Enrolled(token_name=row.name, labels=bound, requested_labels=requested)
    token_hash = hash_token(token)
    if settings_token:
        _settings_row(session, settings, now)
    enrolled = _enroll_in_one_statement(session, token_hash, device, now, settings_token)
    if enrolled is None and settings_token:  # the row went (a restored database): make it again
        session.rollback()
        with _SYNCED_LOCK:
            _SYNCED.clear()
        _settings_row(session, settings, now)
        enrolled = _enroll_in_one_statement(session, token_hash, device, now, settings_token)
    if enrolled is None:
        raise _refusal(session, token_hash, settings_token=settings_token, now=now)
    return enrolled


def _device_row(
    device: NewDevice,
    bound: dict[str, Any],
    requested: dict[str, str],
    token_id: int,
    now: datetime,
) -> Device:
    return Device(
        id=device.id,
        name=device.name,
        token_hash=device.token_hash,
        labels=bound,
        requested_labels=requested,
        bootstrap_token_id=token_id,
        profile=device.profile,
        enrolled_at=now,
        last_seen_at=now,
    )


# The use and the device in one statement; the token's conditions are ``_usable``'s plus its
# expiry. Built once: the text is the same for every enrollment.
_ENROLL_SQL = text(
    """
    WITH used AS (
        UPDATE bootstrap_tokens SET uses = uses + 1
        WHERE token_hash = :token_hash
          AND revoked_at IS NULL
          AND (max_uses IS NULL OR uses < max_uses)
          AND (expires_at IS NULL OR expires_at > :now)
          AND (:settings_token OR created_by <> :settings_name)
        RETURNING id, labels
    )
    INSERT INTO devices (id, name, token_hash, labels, requested_labels, bootstrap_token_id,
                         profile, enrolled_at, last_seen_at)
    SELECT :device_id, :name, :device_token_hash, used.labels, :requested, used.id,
           :profile, :now, :now
    FROM used
    RETURNING id
    """
).bindparams(
    bindparam("now", type_=UTCDateTime()),
    bindparam("settings_token", type_=Boolean()),
    bindparam("requested", type_=JSON()),
    bindparam("profile", type_=JSON()),
)

# name and labels by token hash and database: a token's name and labels never change once it
# exists, so reading them once per process saves a round trip per enrollment (whether the token
# may still enroll is decided by the statement, every time)
_GRANTS: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
_GRANTS_MAX = 1024  # tokens; cleared when full
_GRANTS_LOCK = threading.Lock()


def _grant(connection: Connection, token_hash: str) -> tuple[str, dict[str, Any]] | None:
    key = (str(connection.engine.url), token_hash)
    with _GRANTS_LOCK:
        known = _GRANTS.get(key)
    if known is not None:
        return known
    row = connection.execute(
        select(BootstrapToken.name, BootstrapToken.labels).where(
            BootstrapToken.token_hash == token_hash
        )
    ).first()
    if row is None:
        return None
    grant = (str(row.name), dict(row.labels))
    with _GRANTS_LOCK:
        if len(_GRANTS) >= _GRANTS_MAX:
            _GRANTS.clear()
        _GRANTS[key] = grant
    return grant


def _enroll_in_one_statement(
    session: Session, token_hash: str, device: NewDevice, now: datetime, settings_token: bool
) -> Enrolled | None:
    """PostgreSQL: the use and the device row in one autocommitted statement; None when the
    token counted no use (unknown, revoked, expired or used up)."""
    session.commit()  # the isolation level applies from the start of a transaction
    connection = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    grant = _grant(connection, token_hash)
    if grant is None:
        return None
    name, bound = grant
    requested = _requested(device.asked_labels, bound)
    stored = connection.execute(
        _ENROLL_SQL,
        {
            "token_hash": token_hash,
            "now": now,
            "settings_token": settings_token,
            "settings_name": SETTINGS_TOKEN_NAME,
            "device_id": device.id,
            "name": device.name,
            "device_token_hash": device.token_hash,
            "requested": requested,
            "profile": device.profile,
        },
    ).first()
    if stored is None:
        return None
    return Enrolled(token_name=name, labels=bound, requested_labels=requested)

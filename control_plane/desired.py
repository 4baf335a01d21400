"""Desired state per device: which assignment applies per model slot and which variant it gets.

Owns assignment precedence, selector matching and the in-memory caches that make an idle poll
cheap (an ETag per device, device credential -> device id). The variant choice itself is the
pure variant contract ``agent.contracts.fit`` (the same functions the device chooses with).

Precedence per model: the newest assignment naming the device, else the newest assignment whose
selector matches the device's labels (every key equal). Only versions whose build is ``ready``
are offered (a build is ready once its archives are signed TUF targets). Each entry's
``generation`` is the id of its assignment plus the operator's retries of that model on this
device: it grows with a new assignment or rollout wave and with ``edgectl devices retry``, and
never otherwise, so a device re-tries a version it rejected only when asked to. The state's own
``generation`` is the largest of its entries'.

The caches live in this process; entries expire after ``ttl_s`` so several replicas converge,
and this process drops them at once when assignments, labels or a profile change.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from agent.contracts.fit import fitting
from agent.contracts.manifest import Variant
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import (
    MAX_CANDIDATES,
    DesiredModel,
    DesiredShadow,
    DesiredState,
    DesiredVariant,
)
from agent.logs import get_logger
from control_plane.coordination import NotificationListener, notify
from control_plane.db.models import Assignment, Device, Model, ModelVersion, ShadowAssignment
from control_plane.registry import archive_path

__all__ = [
    "DESIRED_CHANNEL",
    "ROLLOUT_TAG",
    "CachedState",
    "CredentialCache",
    "DesiredStateCache",
    "compute_desired_state",
    "entry_generation",
    "etag_matches",
    "invalidation_payload",
    "parse_invalidation",
    "selector_matches",
]

log = get_logger(__name__)


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


ROLLOUT_TAG = "rollout:"  # Assignment.created_by of a rollout's assignments


def entry_generation(assignment_id: int, retries: int) -> int:
    """A desired-state entry's generation: strictly grows with either argument."""
    return assignment_id + retries


def _offer(name: str, version: str, row: Any) -> DesiredVariant:
    assert row.archive_sha256 is not None
    assert row.archive_size is not None
    return DesiredVariant(
        variant_id=row.variant_id,
        artifact_path=archive_path(name, version, row.variant_id),
        sha256=row.archive_sha256,
        size=row.archive_size,
    )


def compute_desired_state(session: Session, device: Device) -> DesiredState:
    """What ``device`` should run now, each model resolved to one variant for its profile."""
    assignments = session.scalars(
        select(Assignment)
        .where(or_(Assignment.device_id == device.id, Assignment.selector.is_not(None)))
        .order_by(Assignment.id.desc())
    ).all()
    chosen: dict[int, Assignment] = {}
    for a in assignments:  # direct assignments first, newest first within each kind
        if a.device_id == device.id:
            chosen.setdefault(a.model_id, a)
    for a in assignments:
        if (
            a.device_id is None
            and a.selector is not None
            and selector_matches(a.selector, device.labels)
        ):
            chosen.setdefault(a.model_id, a)
    profile = HardwareProfile.model_validate(device.profile) if device.profile else None
    retries: dict[str, Any] = device.retries or {}
    shadows: dict[int, ShadowAssignment] = {}
    for shadow in session.scalars(
        select(ShadowAssignment)
        .where(ShadowAssignment.device_id == device.id)
        .order_by(ShadowAssignment.id.desc())
    ):
        shadows.setdefault(shadow.model_id, shadow)
    models: list[DesiredModel] = []
    generation = 0
    for assignment in sorted(chosen.values(), key=lambda a: a.model_id):
        version = session.get(ModelVersion, assignment.version_id)
        model = session.get(Model, assignment.model_id)
        if model is None:
            continue
        entry_gen = entry_generation(assignment.id, int(retries.get(model.name, 0)))
        generation = max(generation, entry_gen)
        if version is None or profile is None or version.status != "ready":
            continue
        rows = {r.variant_id: r for r in version.variants if r.archive_sha256}
        variants = [Variant.model_validate(r.spec) for r in rows.values()]
        fit = fitting(variants, profile)
        if not fit.ranked:
            log.warning(
                "no_variant_fits",
                device_id=device.id,
                model=model.name,
                version=version.version,
                reasons=fit.reasons(),
            )
            continue
        offered = [_offer(model.name, version.version, rows[v.id]) for v in fit.ranked]
        best = fit.ranked[0]
        row = rows[best.id]
        assert row.archive_sha256 is not None
        assert row.archive_size is not None
        models.append(
            DesiredModel(
                name=model.name,
                version=version.version,
                variant_id=best.id,
                artifact_path=archive_path(model.name, version.version, best.id),
                sha256=row.archive_sha256,
                size=row.archive_size,
                rollout_id=assignment.created_by.removeprefix(ROLLOUT_TAG)
                if assignment.created_by.startswith(ROLLOUT_TAG)
                else None,
                generation=entry_gen,
                candidates=tuple(offered[:MAX_CANDIDATES]),
                shadow=_shadow(session, model.name, shadows.get(model.id), profile),
            )
        )
    return DesiredState(device_id=device.id, generation=generation, models=tuple(models))


def _shadow(
    session: Session, name: str, shadow: ShadowAssignment | None, profile: HardwareProfile
) -> DesiredShadow | None:
    """The shadow entry of a model, resolved to the variant this device would serve."""
    if shadow is None:
        return None
    version = session.get(ModelVersion, shadow.version_id)
    if version is None or version.status != "ready":
        return None
    rows = {r.variant_id: r for r in version.variants if r.archive_sha256}
    fit = fitting([Variant.model_validate(r.spec) for r in rows.values()], profile)
    if not fit.ranked:
        return None
    offer = _offer(name, version.version, rows[fit.ranked[0].id])
    return DesiredShadow(
        version=version.version,
        variant_id=offer.variant_id,
        artifact_path=offer.artifact_path,
        sha256=offer.sha256,
        size=offer.size,
        rollout_id=shadow.rollout_id,
        sample_share=shadow.sample_share,
        max_busy_share=shadow.max_busy_share,
    )


@dataclass(frozen=True)
class CachedState:
    etag: str
    body: bytes
    state: DesiredState
    expires_at: float


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 weak comparison of an ``If-None-Match`` list against our strong ETag."""
    if not if_none_match:
        return False
    for raw in if_none_match.split(","):
        tag = raw.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


DESIRED_CHANNEL = "edgefleet_desired"  # PostgreSQL NOTIFY: desired states changed
MAX_DROPPED_MARKS = 100_000  # keys (devices, credentials) whose latest drop a cache remembers


class _Invalidations:
    """Which keys were dropped after which ticket: a cache keeps what a read found only if no
    key of it was dropped while the read was in flight (a read that began before a change
    committed would otherwise be cached after the change dropped the old entry, and served for
    the whole TTL). The caller holds its cache's lock around every method."""

    def __init__(self) -> None:
        self.epoch = 0  # counts drops
        self._dropped_at: dict[str, int] = {}  # key -> epoch of its latest drop
        self._all_dropped_at = 0  # epoch of the latest drop of every key

    def drop(self, keys: Iterable[str] | None) -> None:
        self.epoch += 1
        if keys is None:
            self._dropped_at.clear()  # the cache-wide mark covers every key
            self._all_dropped_at = self.epoch
            return
        for key in keys:
            self._dropped_at[key] = self.epoch
        if len(self._dropped_at) > MAX_DROPPED_MARKS:
            # bounded: one cache-wide mark instead (reads in flight are not cached, which only
            # costs them a read next time)
            self._dropped_at.clear()
            self._all_dropped_at = self.epoch

    def keeps(self, ticket: int | None, keys: Iterable[str]) -> bool:
        """Whether a read that took ``ticket`` before it began may be cached (no ticket: yes)."""
        if ticket is None:
            return True
        if self._all_dropped_at > ticket:
            return False
        return all(self._dropped_at.get(key, 0) <= ticket for key in keys)

    def __len__(self) -> int:
        return len(self._dropped_at)


class _TicketedCache:
    """A TTL cache whose readers take a ``ticket()`` before they read the database and hand it
    to ``put``, which keeps what they read only if none of its keys was dropped in between."""

    def __init__(self, *, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._dropped = _Invalidations()

    def ticket(self) -> int:
        """Taken before reading the database for a ``put``: the drops so far."""
        with self._lock:
            return self._dropped.epoch


class DesiredStateCache(_TicketedCache):
    """The serialized desired state and its ETag per device.

    ``broadcast``, when set (replicas on PostgreSQL), tells every other replica what this one
    invalidated, so none answers a poll from a copy older than the last committed change;
    ``invalidate_local`` is what a replica does when it hears of one.

    A state computed from a read that began before an invalidation must not be cached after it
    (it would be served stale for ``ttl_s``): a reader takes a ``ticket()`` before it reads and
    hands it to ``put``, which keeps the state only if no invalidation of that device came in
    between."""

    def __init__(self, *, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl_s=ttl_s, clock=clock)
        self._entries: dict[str, CachedState] = {}
        self.broadcast: Callable[[list[str] | None], None] | None = None

    def get(self, device_id: str) -> CachedState | None:
        entry = self._entries.get(device_id)
        if entry is None or entry.expires_at <= self._clock():
            return None
        return entry

    def put(self, state: DesiredState, ticket: int | None = None) -> CachedState:
        """The entry for ``state``, kept unless the device was invalidated after ``ticket``
        (then it is returned for this answer only); without a ticket, kept."""
        body = json.dumps(
            state.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
        ).encode()
        entry = CachedState(_etag(body), body, state, self._clock() + self._ttl)
        with self._lock:
            if self._dropped.keeps(ticket, (state.device_id,)):
                self._entries[state.device_id] = entry
        return entry

    def invalidate(self, device_ids: Iterable[str] | None = None) -> None:
        """Forget some devices' entries, or every entry when ``device_ids`` is None, here and
        (through ``broadcast``) on every other replica. Called after the change committed."""
        ids = None if device_ids is None else list(device_ids)
        self.invalidate_local(ids)
        if self.broadcast is not None:
            try:
                self.broadcast(ids)
            except Exception as exc:  # the others' entries still expire after ttl_s
                log.warning("desired_invalidation_not_broadcast", error=str(exc))

    def invalidate_local(self, device_ids: Iterable[str] | None = None) -> None:
        """Forget some devices' entries in this process only."""
        ids = None if device_ids is None else list(device_ids)
        with self._lock:
            self._dropped.drop(ids)
            if ids is None:
                self._entries.clear()
            else:
                for device_id in ids:
                    self._entries.pop(device_id, None)


class CredentialCache(_TicketedCache):
    """Device credential hash -> device id, so a cached poll touches no database.

    A lookup takes a ``ticket()`` before it reads and hands it to ``put``: a credential revoked
    (its device or its hash forgotten) while the lookup was in flight is not cached."""

    def __init__(self, *, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttl_s=ttl_s, clock=clock)  # dropped keys: "d:" + device, "h:" + hash
        self._entries: dict[str, tuple[str, float]] = {}
        self._hashes: dict[str, set[str]] = {}  # device id -> its cached credential hashes

    def get(self, token_hash: str) -> str | None:
        hit = self._entries.get(token_hash)
        if hit is None or hit[1] <= self._clock():
            return None
        return hit[0]

    def put(self, token_hash: str, device_id: str, ticket: int | None = None) -> None:
        with self._lock:
            if self._dropped.keeps(ticket, (f"d:{device_id}", f"h:{token_hash}")):
                self._pop(token_hash)
                self._entries[token_hash] = (device_id, self._clock() + self._ttl)
                self._hashes.setdefault(device_id, set()).add(token_hash)

    def forget(self, token_hash: str) -> None:
        with self._lock:
            self._dropped.drop((f"h:{token_hash}",))
            self._pop(token_hash)

    def forget_devices(self, device_ids: Iterable[str]) -> None:
        """Drop every cached credential of these devices (deleted, revoked, rotated)."""
        ids = list(device_ids)
        with self._lock:
            self._dropped.drop(f"d:{device_id}" for device_id in ids)
            for device_id in ids:
                for token_hash in self._hashes.pop(device_id, ()):
                    self._entries.pop(token_hash, None)

    def forget_device(self, device_id: str) -> None:
        self.forget_devices((device_id,))

    def clear(self) -> None:
        with self._lock:
            self._dropped.drop(None)
            self._entries.clear()
            self._hashes.clear()

    def _pop(self, token_hash: str) -> None:
        old = self._entries.pop(token_hash, None)
        if old is not None:
            hashes = self._hashes.get(old[0])
            if hashes is not None:
                hashes.discard(token_hash)
                if not hashes:
                    del self._hashes[old[0]]


def invalidation_payload(device_ids: list[str] | None, sender: str) -> str:
    """What a replica sends on ``DESIRED_CHANNEL``: ``{"from": sender, "ids": [...]}``, the
    device ids or ``"*"`` for every device (asked for, or a list too long for one
    notification). ``sender`` names the process, so it can tell its own notifications, which
    PostgreSQL delivers to it too, from another replica's."""
    ids: list[str] | str = "*" if device_ids is None else device_ids
    payload = json.dumps({"from": sender, "ids": ids}, separators=(",", ":"))
    if len(payload.encode()) <= 7900:
        return payload
    return json.dumps({"from": sender, "ids": "*"}, separators=(",", ":"))


def parse_invalidation(payload: str) -> tuple[str | None, list[str] | None]:
    """``(sender, device ids)`` of a notification: ids None for every device (or for one that
    does not parse: dropping every cached entry is always safe), sender None where it names
    none (the bare list or ``*`` an older replica sends)."""
    try:
        message = json.loads(payload)
    except ValueError:
        return None, None
    sender: str | None = None
    ids = message
    if isinstance(message, dict):
        sender = message.get("from") if isinstance(message.get("from"), str) else None
        ids = message.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        return sender, None
    return sender, ids


def share_invalidations(
    engine: Engine, desired: DesiredStateCache, credentials: CredentialCache
) -> NotificationListener:
    """Replicas on PostgreSQL: what ``desired`` invalidates is sent on ``DESIRED_CHANNEL``, and
    what another replica sends is dropped here, from ``desired`` and from ``credentials`` (a
    credential deleted, revoked or asked to rotate through another replica is looked up again).
    Listening again after a lost connection drops both caches whole (what was sent meanwhile is
    lost). The listener is returned unstarted.

    Each process names itself in what it sends (a random name, not ``replica_id``, which two
    replicas could share by mistake) and ignores its own notifications, which PostgreSQL
    delivers to it too: it dropped those entries itself before it sent them, and dropping them
    again would drop what it cached since (every device's next poll a database read)."""
    sender = secrets.token_hex(8)
    desired.broadcast = lambda ids: notify(
        engine, DESIRED_CHANNEL, invalidation_payload(ids, sender)
    )

    def heard(payload: str) -> None:
        origin, ids = parse_invalidation(payload)
        if origin == sender:
            return
        desired.invalidate_local(ids)
        if ids is not None:
            credentials.forget_devices(ids)

    def missed() -> None:
        desired.invalidate_local(None)
        credentials.clear()

    return NotificationListener(engine, DESIRED_CHANNEL, heard, on_relisten=missed)

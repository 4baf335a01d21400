"""How replicas that share one PostgreSQL agree: a name per replica, locks, a lease per role.

Owns four primitives, all kept in the database so that no replica's memory matters:

- ``replica_name``: how a process names itself in leases (``<host>-<pid>-<random>`` unless set);
- ``advisory_lock``: a PostgreSQL session-level advisory lock for a short critical section
  (signing TUF metadata that every replica shares); on SQLite, one process serialises itself;
- ``NotificationListener`` / ``notify``: PostgreSQL ``LISTEN`` / ``NOTIFY``, how a replica
  hears at once what another committed (stored update events for the runner; desired states
  that changed, so every replica drops its cached copy);
- ``RoleLease``: one holder at a time for a named role (the rollout runner), as a row in
  ``leases`` whose expiry the holder renews. Expiry is compared with the database's clock, so
  replicas with skewed clocks still agree. A holder that dies (``kill -9``, a lost host, a
  process frozen past its lease) is replaced once its lease runs out; a holder that stops
  cleanly hands over at once by deleting its row.

A lease row, rather than an advisory lock, for the runner: an advisory lock lives as long as
its TCP connection, so a frozen holder (or a half-open connection after a network fault) keeps
it until keepalives give up, minutes later; a lease expires on time whatever the network does.
SQLite is the one-machine set-up: there, every role is held by the single process.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from agent.logs import get_logger
from control_plane.errors import StorageError

__all__ = [
    "NOTIFY_PAYLOAD_MAX",
    "NotificationListener",
    "RoleLease",
    "advisory_lock",
    "is_postgres",
    "notify",
    "replica_name",
]

NOTIFY_PAYLOAD_MAX = 7900  # bytes; PostgreSQL refuses a NOTIFY payload of 8000 or more

log = get_logger(__name__)


def replica_name(configured: str = "") -> str:
    """The configured id, else ``<hostname>-<pid>-<4 random bytes>`` (unique per process)."""
    if configured:
        return configured
    host = socket.gethostname().split(".")[0][:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _lock_key(name: str) -> int:
    # A stable signed 64-bit key per name (pg_advisory_lock takes a bigint).
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


_local_locks: dict[str, threading.Lock] = {}
_local_guard = threading.Lock()


@contextmanager
def advisory_lock(engine: Engine, name: str) -> Iterator[None]:
    """Hold ``name`` across every replica (PostgreSQL) or this process (SQLite) until exit."""
    if not is_postgres(engine):
        with _local_guard:
            lock = _local_locks.setdefault(name, threading.Lock())
        with lock:
            yield
        return
    key = _lock_key(name)
    try:
        connection = engine.connect()
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        connection.commit()
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot take the lock {name!r}: {exc}") from exc
    try:
        yield
    finally:
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            connection.commit()
        finally:
            connection.close()


_HOLD = text(
    """
    INSERT INTO leases (name, holder, expires_at, acquired_at)
    VALUES (:name, :holder, now() + :ttl, now())
    ON CONFLICT (name) DO UPDATE
        SET holder = excluded.holder,
            expires_at = excluded.expires_at,
            acquired_at = CASE WHEN leases.holder = excluded.holder
                               THEN leases.acquired_at ELSE excluded.acquired_at END
        WHERE leases.holder = excluded.holder OR leases.expires_at < now()
    RETURNING holder
    """
)
_RELEASE = text("DELETE FROM leases WHERE name = :name AND holder = :holder")


class RoleLease:
    """One replica at a time holds ``name``; ``hold()`` takes or renews it, says whether held."""

    def __init__(self, engine: Engine, name: str, *, holder: str, ttl_s: float) -> None:
        self._engine = engine
        self.name = name
        self.holder = holder
        self.ttl_s = ttl_s
        self.held = False

    def hold(self) -> bool:
        """Take the role if it is free or expired, renew it if ours; False while another holds
        it or the database does not answer (a holder that cannot renew must stop acting)."""
        if not is_postgres(self._engine):
            self._note(held=True)
            return True
        try:
            with self._engine.begin() as connection:
                row = connection.execute(
                    _HOLD,
                    {
                        "name": self.name,
                        "holder": self.holder,
                        "ttl": timedelta(seconds=self.ttl_s),
                    },
                ).first()
        except SQLAlchemyError as exc:
            log.warning("lease_renew_failed", role=self.name, error=str(exc))
            self._note(held=False)
            return False
        self._note(held=row is not None)
        return self.held

    def release(self) -> None:
        """Hand the role over now (a clean stop); the next candidate takes it at once."""
        if not self.held or not is_postgres(self._engine):
            self.held = False
            return
        try:
            with self._engine.begin() as connection:
                connection.execute(_RELEASE, {"name": self.name, "holder": self.holder})
        except SQLAlchemyError as exc:
            log.warning("lease_release_failed", role=self.name, error=str(exc))
        self._note(held=False)

    def _note(self, *, held: bool) -> None:
        if held != self.held:
            log.info("lease_taken" if held else "lease_lost", role=self.name, holder=self.holder)
        self.held = held


def notify(engine: Engine, channel: str, payload: str = "") -> None:
    """``NOTIFY channel, payload`` on its own autocommitted connection (the caller committed
    what the notification announces). ``StorageError`` when the database refuses it."""
    if not channel.isidentifier():
        raise ValueError(f"not a channel name: {channel!r}")
    if len(payload.encode()) > NOTIFY_PAYLOAD_MAX:
        raise ValueError(f"a NOTIFY payload is at most {NOTIFY_PAYLOAD_MAX} bytes")
    try:
        with engine.connect() as conn:
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {
                    "channel": channel,
                    "payload": payload,
                },
            )
            conn.commit()
    except SQLAlchemyError as exc:
        raise StorageError(f"NOTIFY {channel} failed: {exc}") from exc


class NotificationListener:
    """``LISTEN`` on a PostgreSQL channel in a thread of its own, calling ``on_notify`` for each
    notification: how a replica hears at once what another replica committed (the ingester's
    stored update events, for the rollout runner). Reconnects with backoff when the database
    goes away. What was sent while it was not listening is lost: ``on_relisten`` is called each
    time it listens again after losing its connection, so the caller can drop what it may have
    missed (the desired-state and credential caches); for the runner a missed notification only
    delays the work to the next regular tick."""

    def __init__(
        self,
        engine: Engine,
        channel: str,
        on_notify: Callable[[str], None],
        *,
        on_relisten: Callable[[], None] | None = None,
    ) -> None:
        if not channel.isidentifier():
            raise ValueError(f"not a channel name: {channel!r}")
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._channel = channel
        self._on_notify = on_notify
        self._on_relisten = on_relisten
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = threading.Event()
        self.received = 0

    def start(self) -> NotificationListener:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"listen-{self._channel}", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        import psycopg

        backoff = 0.5
        lost = False  # whether a connection that listened (or tried to) was lost
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self.listening.set()
                    backoff = 0.5
                    if lost:
                        lost = False
                        log.info("listening_again", channel=self._channel)
                        if self._on_relisten is not None:
                            self._on_relisten()
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self.received += 1
                            self._on_notify(note.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                lost = True
                log.warning("listen_failed", channel=self._channel, error=str(exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self.listening.clear()

"""Store-and-forward spool: every outgoing MQTT message waits here, on disk, until delivered.

Owns ordering, the byte bound and durability of queued messages; knows nothing of MQTT (the
client in ``agent.telemetry.client`` peeks, publishes and acks).

Storage is one SQLite database (``<state_dir>/spool/spool.db``) in WAL mode. Rows are read back
in insertion order (the integer primary key), so delivery after a reconnect or an agent restart
keeps the order in which messages were produced.

Bound (bytes = topic + payload of every queued row):
- above ``max_bytes`` the oldest telemetry is dropped first, counted in ``telemetry_dropped``;
- events are never dropped to make room; if events alone exceed ``max_bytes`` the spool keeps
  them, counts ``events_over_bound`` and logs ``spool_events_over_bound``;
- past ``hard_max_bytes`` (default 4 x ``max_bytes``) a new event is refused with
  ``TelemetryError`` and counted in ``events_refused``: the disk is protected before the event.

fsync policy: an event's insert commits with ``synchronous=FULL`` (the WAL is fsynced before
``enqueue`` returns, so an acknowledged event survives a power cut). Telemetry inserts and acks
commit with ``synchronous=NORMAL`` (no fsync; made durable by the next event commit or WAL
checkpoint): a power cut may lose the last seconds of telemetry or replay an acked message,
never lose an event. Delivery is therefore at least once; receivers drop duplicates by
``(device_id, seq)``.

End-to-end confirmation (when the client asks for it): an event the broker acknowledged is only
marked sent (``mark_sent``); it leaves the spool when the control plane says it stored its
sequence number (``confirm``), and goes out again when that has not happened in time
(``resend_unconfirmed``). Events are matched by their sequence number (``enqueue(seq=...)``),
which the daemon's ``agent.events.EventSequence`` keeps unique across restarts.

A database file that SQLite cannot open is renamed aside
(``spool.db.corrupt-<n>``), never deleted, and a fresh spool is started.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.errors import TelemetryError
from agent.logs import get_logger

__all__ = ["MessageKind", "Spool", "SpoolCounters", "SpooledMessage"]

log = get_logger(__name__)
MessageKind = Literal["event", "telemetry"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    kind    TEXT    NOT NULL CHECK (kind IN ('event', 'telemetry')),
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    size    INTEGER NOT NULL,
    seq     INTEGER,
    sent_at REAL
);
CREATE INDEX IF NOT EXISTS messages_kind_id ON messages (kind, id);
"""


@dataclass(frozen=True)
class SpooledMessage:
    id: int
    kind: MessageKind
    topic: str
    payload: bytes
    qos: int

    @property
    def size(self) -> int:
        return len(self.topic.encode()) + len(self.payload)


@dataclass(frozen=True)
class SpoolCounters:
    """Totals since this ``Spool`` was opened (not persisted)."""

    enqueued: int
    acked: int
    telemetry_dropped: int
    events_over_bound: int
    events_refused: int
    corrupt_files_moved: int


class Spool:
    """A bounded, ordered, on-disk queue of outgoing messages. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        hard_max_bytes: int | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise TelemetryError("spool max_bytes must be positive")
        self.max_bytes = max_bytes
        self.hard_max_bytes = hard_max_bytes if hard_max_bytes is not None else 4 * max_bytes
        if self.hard_max_bytes < max_bytes:
            raise TelemetryError("spool hard_max_bytes must be >= max_bytes")
        self.path = directory / "spool.db"
        self._lock = threading.Lock()
        self._enqueued = self._acked = self._dropped = 0
        self._over = self._refused = self._moved = 0
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TelemetryError(f"cannot create spool directory {directory}: {exc}") from exc
        self._db = self._open()
        row = self._db.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM messages").fetchone()
        self._bytes, self._count = int(row[0]), int(row[1])
        row = self._db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM messages WHERE kind = 'event'"
        ).fetchone()
        self._event_bytes = int(row[0])
        if self._count:
            log.info("spool_opened", messages=self._count, bytes=self._bytes, path=str(self.path))

    # -- opening -----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(messages)").fetchall()}
            for column, kind in (("seq", "INTEGER"), ("sent_at", "REAL")):
                if column not in columns:  # a spool written by an earlier agent
                    db.execute(f"ALTER TABLE messages ADD COLUMN {column} {kind}")
            db.execute("SELECT COUNT(*) FROM messages").fetchone()
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            moved = self._move_aside()
            log.error(
                "spool_corrupt_moved_aside", path=str(self.path), to=str(moved), error=str(exc)
            )
            self._moved += 1
        try:
            return self._connect()
        except sqlite3.Error as exc:
            raise TelemetryError(f"cannot open spool {self.path}: {exc}") from exc

    def _move_aside(self) -> Path:
        n = 0
        while (target := self.path.with_name(f"{self.path.name}.corrupt-{n}")).exists():
            n += 1
        self.path.replace(target)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.replace(target.with_name(target.name + suffix))
        return target

    # -- queue operations --------------------------------------------------------------------

    def enqueue(
        self,
        kind: MessageKind,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        seq: int | None = None,
    ) -> int | None:
        """Append a message; return its id, or None for telemetry that did not fit. ``seq`` is
        an event's sequence number, by which the control plane confirms it stored it.

        Raises ``TelemetryError`` when an event would take the spool past ``hard_max_bytes``
        (nothing is written then) or the disk write fails.
        """
        size = len(topic.encode()) + len(payload)
        with self._lock:
            if kind == "event" and self._event_bytes + size > self.hard_max_bytes:
                self._refused += 1
                log.error("spool_event_refused", bytes=self._bytes, hard_max=self.hard_max_bytes)
                raise TelemetryError(
                    f"spool full: events fill {self.hard_max_bytes} bytes, event refused"
                )
            if kind == "telemetry" and self._event_bytes + size > self.max_bytes:
                # no room even with every older window dropped: this one goes, they stay
                self._dropped += 1
                return None
            try:
                self._db.execute(f"PRAGMA synchronous={'FULL' if kind == 'event' else 'NORMAL'}")
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT INTO messages (kind, topic, payload, qos, size, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (kind, topic, payload, qos, size, seq),
                )
                new_id = int(cur.lastrowid or 0)
                bytes_now = self._bytes + size
                dropped = 0
                while bytes_now > self.max_bytes:
                    oldest = self._db.execute(
                        "SELECT id, size FROM messages WHERE kind = 'telemetry' ORDER BY id LIMIT 1"
                    ).fetchone()
                    if oldest is None:
                        break
                    self._db.execute("DELETE FROM messages WHERE id = ?", (oldest[0],))
                    bytes_now -= int(oldest[1])
                    dropped += 1
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise TelemetryError(f"spool write failed: {exc}") from exc
            self._bytes = bytes_now
            self._count += 1 - dropped
            self._enqueued += 1
            self._dropped += dropped
            if kind == "event":
                self._event_bytes += size
            if dropped:
                log.debug("spool_telemetry_dropped", count=dropped, bytes=bytes_now)
            if kind == "event" and bytes_now > self.max_bytes:
                self._over += 1
                log.warning("spool_events_over_bound", bytes=bytes_now, max_bytes=self.max_bytes)
            kept = self._db.execute("SELECT 1 FROM messages WHERE id = ?", (new_id,)).fetchone()
            return new_id if kept else None

    def peek(self, *, after_id: int = 0, limit: int = 100) -> list[SpooledMessage]:
        """The oldest ``limit`` messages with an id above ``after_id`` and not sent (awaiting
        the control plane's confirmation), in order."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT id, kind, topic, payload, qos FROM messages WHERE id > ? "
                    "AND sent_at IS NULL ORDER BY id LIMIT ?",
                    (after_id, limit),
                ).fetchall()
            except sqlite3.Error as exc:
                raise TelemetryError(f"spool read failed: {exc}") from exc
        return [SpooledMessage(int(r[0]), r[1], r[2], bytes(r[3]), int(r[4])) for r in rows]

    def ack(self, message_id: int) -> bool:
        """Remove a delivered message; False if it was already gone (dropped or acked)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT size, kind FROM messages WHERE id = ?", (message_id,)
                ).fetchone()
                if row is None:
                    return False
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("DELETE FROM messages WHERE id = ?", (message_id,))
            except sqlite3.Error as exc:
                raise TelemetryError(f"spool write failed: {exc}") from exc
            self._bytes -= int(row[0])
            if row[1] == "event":
                self._event_bytes -= int(row[0])
            self._count -= 1
            self._acked += 1
            return True

    # -- end-to-end confirmation of events -----------------------------------------------------

    def mark_sent(self, message_id: int, *, now: float) -> None:
        """The broker took this event (PUBACK); it stays until the control plane confirms it
        stored it (``confirm``), and goes again if that takes too long (``resend_unconfirmed``)."""
        with self._lock:
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("UPDATE messages SET sent_at = ? WHERE id = ?", (now, message_id))
            except sqlite3.Error as exc:
                raise TelemetryError(f"spool write failed: {exc}") from exc

    def confirm(self, seqs: Iterable[int]) -> int:
        """Remove the events whose sequence numbers the control plane says it stored; returns
        how many were removed."""
        wanted = sorted(set(seqs))
        removed = size = 0
        with self._lock:
            try:
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.execute("BEGIN IMMEDIATE")
                for seq in wanted:
                    row = self._db.execute(
                        "SELECT id, size FROM messages WHERE kind = 'event' AND seq = ?", (seq,)
                    ).fetchone()
                    if row is None:
                        continue
                    self._db.execute("DELETE FROM messages WHERE id = ?", (row[0],))
                    size += int(row[1])
                    removed += 1
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise TelemetryError(f"spool write failed: {exc}") from exc
            self._bytes -= size
            self._event_bytes -= size
            self._count -= removed
            self._acked += removed
        return removed

    def resend_unconfirmed(self, *, sent_before: float) -> int:
        """Events sent before ``sent_before`` and still not confirmed go out again; returns how
        many (receivers drop duplicates by device and sequence number)."""
        with self._lock:
            try:
                cur = self._db.execute(
                    "UPDATE messages SET sent_at = NULL WHERE kind = 'event' "
                    "AND sent_at IS NOT NULL AND sent_at < ?",
                    (sent_before,),
                )
            except sqlite3.Error as exc:
                raise TelemetryError(f"spool write failed: {exc}") from exc
            return int(cur.rowcount or 0)

    def lowest_unconfirmed_seq(self) -> int | None:
        """The lowest sequence number of an event still waiting for confirmation, or None."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT MIN(seq) FROM messages WHERE kind = 'event' AND seq IS NOT NULL"
                ).fetchone()
            except sqlite3.Error as exc:
                raise TelemetryError(f"spool read failed: {exc}") from exc
        return int(row[0]) if row and row[0] is not None else None

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # no transaction was open
            self._db.execute("ROLLBACK")

    # -- introspection -----------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return self._count

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def counters(self) -> SpoolCounters:
        with self._lock:
            return SpoolCounters(
                enqueued=self._enqueued,
                acked=self._acked,
                telemetry_dropped=self._dropped,
                events_over_bound=self._over,
                events_refused=self._refused,
                corrupt_files_moved=self._moved,
            )

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(sqlite3.Error):  # the WAL is replayed on the next open
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""When each device was last heard from over HTTP: ``last_seen_at``, refreshed by every poll.

Owns the coalescing of ``devices.last_seen_at`` writes. A poll (a 304 answered on the fast
path included) only notes the time in memory (``seen``: a dict store under a lock, no I/O);
a background thread writes the noted times every ``interval_s`` in one transaction, one row
update per device that polled since the last flush. So a fleet polling every 2 s costs at most
one write per device per ``interval_s`` (and one transaction per interval for the whole fleet),
and an operator reads a ``last_seen_at`` at most ``interval_s`` plus the flush's own time older
than the device's latest poll. A write never moves ``last_seen_at`` back (a reported-state write
may have set a later time meanwhile), and a deleted device's pending time is dropped.

Routes that write the device row anyway (profile, reported state) set ``last_seen_at`` there
and do not come through here. Which requests count as a device's poll is the routes' call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.logs import get_logger
from control_plane.db.models import Device

__all__ = ["LastSeenRecorder"]

log = get_logger(__name__)


class LastSeenRecorder:
    """Notes polls in memory; ``flush`` (or the thread ``start`` runs) writes them."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        interval_s: float,
        now: Callable[[], datetime],
    ) -> None:
        self._sessions = sessions
        self.interval_s = interval_s
        self._now = now
        self._pending: dict[str, datetime] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.flushes = 0
        self.rows_written = 0

    def seen(self, device_id: str) -> None:
        """The device polled now (cheap: called on the 304 fast path)."""
        when = self._now()
        with self._lock:
            self._pending[device_id] = when

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._pending.pop(device_id, None)

    def flush(self) -> int:
        """Write every pending time; the number of devices written. A failure keeps them."""
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return 0
        try:
            with self._sessions() as session, session.begin():
                for device_id, when in sorted(pending.items()):
                    session.execute(
                        update(Device)
                        .where(Device.id == device_id)
                        .where(or_(Device.last_seen_at.is_(None), Device.last_seen_at < when))
                        .values(last_seen_at=when)
                        .execution_options(synchronize_session=False)
                    )
        except SQLAlchemyError as exc:
            log.warning("last_seen_flush_failed", devices=len(pending), error=str(exc))
            with self._lock:  # keep them for the next flush, newer polls win
                for device_id, when in pending.items():
                    self._pending.setdefault(device_id, when)
            return 0
        self.flushes += 1
        self.rows_written += len(pending)
        return len(pending)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="last-seen", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and write what is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

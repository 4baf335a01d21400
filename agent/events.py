"""In-process event bus for update lifecycle events.

Producers (store, slots, update client) call ``emit``; consumers (MQTT publisher, HTTP reporter,
metrics, tests) subscribe. Delivery is synchronous and a failing subscriber is logged and never
breaks the producer. The bus stamps ``device_id`` and a monotonic ``seq``; with an
``EventSequence`` (the daemon's, in ``<state_dir>/events.seq``) the numbers outlive restarts, so
the control plane's confirmation of stored events by number never confuses two events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent._fs import write_file_atomic
from agent.contracts.events import EventStep, UpdateEvent
from agent.logs import get_logger

__all__ = ["EventBus", "EventSequence", "Subscriber"]

log = get_logger(__name__)
Subscriber = Callable[[UpdateEvent], None]


class EventSequence:
    """Event sequence numbers that outlive restarts: blocks of ``block`` numbers are reserved in
    ``path`` (written atomically) before they are used, so a restart, even after kill -9,
    continues past every number an earlier process could have given out. A missing or corrupt
    file starts at the wall clock in milliseconds, past any number used before."""

    def __init__(
        self, path: Path, *, block: int = 1000, wall: Callable[[], float] = time.time
    ) -> None:
        self._path = path
        self._block = block
        try:
            start = int(path.read_text(encoding="ascii").strip())
            if start < 1:
                raise ValueError(start)
        except FileNotFoundError:
            start = max(1, int(wall() * 1000))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            start = max(1, int(wall() * 1000))
            log.error("event_sequence_corrupt", path=str(path), error=str(exc), start=start)
        self._next = self._ceiling = start

    def take(self) -> int:
        """The next number (callers serialize; ``EventBus`` holds its lock)."""
        if self._next >= self._ceiling:
            ceiling = self._next + self._block
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                write_file_atomic(self._path, f"{ceiling}\n".encode())
                self._ceiling = ceiling
            except OSError as exc:  # the number is still unique in this process
                log.error("event_sequence_not_saved", path=str(self._path), error=str(exc))
        seq = self._next
        self._next += 1
        return seq


class EventBus:
    def __init__(
        self,
        device_id: str = "",
        *,
        start_seq: int = 0,
        sequence: EventSequence | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self._device_id = device_id
        self._seq = start_seq
        self._sequence = sequence
        self._now = now
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()

    @property
    def device_id(self) -> str:
        return self._device_id

    def set_device_id(self, device_id: str) -> None:
        """Stamp later events with ``device_id`` (the id the control plane enrolled us under)."""
        with self._lock:
            self._device_id = device_id

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        with self._lock:
            self._subs.append(fn)
        return lambda: self._unsubscribe(fn)

    def _unsubscribe(self, fn: Subscriber) -> None:
        with self._lock:
            if fn in self._subs:
                self._subs.remove(fn)

    def emit(
        self,
        step: EventStep,
        *,
        model: str,
        version: str | None = None,
        reason: str | None = None,
        **fields: Any,
    ) -> UpdateEvent:
        with self._lock:
            if self._sequence is not None:
                seq = self._seq = self._sequence.take()
            else:
                self._seq += 1
                seq = self._seq
            subs = list(self._subs)
        known = {k: fields.pop(k) for k in ("from_version", "variant_id") if k in fields}
        event = UpdateEvent(
            device_id=self._device_id,
            seq=seq,
            ts=self._now(),
            model=model,
            version=version,
            step=step,
            reason=reason,
            details=fields,
            **known,
        )
        log.info("update_event", step=step, seq=seq, model=model, version=version, reason=reason)
        for fn in subs:
            try:
                fn(event)
            except Exception:
                log.exception("event_subscriber_failed", step=step)
        return event

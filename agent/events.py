"""In-process event bus for update lifecycle events.

Producers (store, slots, update client) call ``emit``; consumers (MQTT publisher, HTTP reporter,
metrics, tests) subscribe. Delivery is synchronous and a failing subscriber is logged and never
breaks the producer. The bus stamps ``device_id`` and a monotonic ``seq``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from agent.contracts.events import EventStep, UpdateEvent
from agent.logs import get_logger

__all__ = ["EventBus", "Subscriber"]

log = get_logger(__name__)
Subscriber = Callable[[UpdateEvent], None]


class EventBus:
    def __init__(
        self,
        device_id: str = "",
        *,
        start_seq: int = 0,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self._device_id = device_id
        self._seq = start_seq
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
        log.info("update_event", step=step, model=model, version=version, reason=reason)
        for fn in subs:
            try:
                fn(event)
            except Exception:
                log.exception("event_subscriber_failed", step=step)
        return event

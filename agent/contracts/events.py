"""Update lifecycle events: every step of an install, swap, probation and rollback, and the
health of each model's inference loop (``loop_failed`` with the reason, ``loop_recovered``).

Emitted in-process through ``agent.events.EventBus``; published over MQTT (``/events``, QoS 1)
and reported over HTTP by later stages. ``seq`` is per-device and monotonic so receivers can
drop duplicates after a reconnect.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "EVENTS_SINCE_HEADER",
    "EVENTS_STORED_HEADER",
    "MAX_STORED_LISTED",
    "EventStep",
    "UpdateEvent",
    "parse_stored",
]

# End-to-end confirmation of events, on the desired-state poll: the device names the lowest
# sequence number it still holds (``EVENTS_SINCE_HEADER``); the answer lists the sequence
# numbers from there on that the control plane has stored (``EVENTS_STORED_HEADER``, comma
# separated, ascending, at most ``MAX_STORED_LISTED``). The device drops exactly those.
EVENTS_SINCE_HEADER = "Edgefleet-Events-Since"
EVENTS_STORED_HEADER = "Edgefleet-Events-Stored"
MAX_STORED_LISTED = 256
_MAX_SEQ = 2**63 - 1


def parse_stored(value: str | None) -> tuple[int, ...]:
    """The sequence numbers in an ``EVENTS_STORED_HEADER`` value; anything malformed or past
    the bound is left out (a device never drops an event on a guess)."""
    if not value or len(value) > MAX_STORED_LISTED * 21:
        return ()
    out: list[int] = []
    for raw in value.split(",")[:MAX_STORED_LISTED]:
        part = raw.strip()
        if not part.isdigit() or len(part) > 19:
            return ()
        seq = int(part)
        if seq > _MAX_SEQ:
            return ()
        out.append(seq)
    return tuple(out)


EventStep = Literal[
    "download_started",
    "download_finished",
    "download_failed",
    "delta_applied",
    "delta_refused",
    "retrying",
    "verified",
    "refused",
    "staged",
    "loaded",
    "warmed",
    "validated",
    "swapped",
    "probation_started",
    "committed",
    "rolled_back",
    "failed",
    "activated",
    "removed",
    "paused",
    "loop_failed",
    "loop_recovered",
]


class UpdateEvent(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    device_id: str = ""
    seq: int = Field(default=0, ge=0)
    ts: datetime
    model: str
    version: str | None = None
    from_version: str | None = None
    variant_id: str | None = None
    step: EventStep
    reason: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

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

__all__ = ["EventStep", "UpdateEvent"]

EventStep = Literal[
    "download_started",
    "download_finished",
    "download_failed",
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

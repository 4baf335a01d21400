"""Merging a device's latest-state row with the one already stored: several ingesters, one row.

MQTT 5 shared subscriptions deal a device's messages out to the ingesters in turn, so each
ingester sees only part of a device's stream: one may hold its newest update event, another its
newest telemetry. Each writes the device's row from its own view; ``merge_link`` keeps, part by
part, whichever side received that part last, so no ingester's write undoes another's:

- the state part (status, reason, agent version, slots, profile) by ``state_received_at``;
- the telemetry part (its receive time, device time, sequence, system metrics) by
  ``telemetry_received_at``; ``clock_skew_s`` goes with the newer of the two parts;
- each model's latest window and health by the health's ``reported_at``;
- each model's latest update event by its ``received_at`` (then its sequence number);
- ``updated_at`` moves forward on every write, to the writer's time or, when the stored stamp
  is later (another ingester's clock runs ahead), a microsecond past it: a reader that keeps
  rows by their stamp (the rollout runner's snapshot) sees every write as a change.

Pure: rows in, row out. The writer reads the stored rows under a row lock in the same
transaction (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's write lock is whole-database).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

__all__ = ["merge_link"]

_STATE = ("status", "status_reason", "agent_version", "slots", "profile", "state_device_ts")
_TELEMETRY = ("telemetry_device_ts", "telemetry_seq", "system")


def _time(value: Any) -> float:
    """A receive time as seconds; -inf when absent or unreadable (anything beats it)."""
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return float("-inf")
    return float("-inf")


def _newer(mine: Any, theirs: Any) -> bool:
    """Whether ``mine`` (a receive time) is strictly newer than ``theirs``."""
    return _time(mine) > _time(theirs)


def _model_time(entry: Any) -> float:
    if not isinstance(entry, Mapping):
        return float("-inf")
    health = entry.get("health")
    return _time(health.get("reported_at")) if isinstance(health, Mapping) else float("-inf")


def _event_key(event: Any) -> tuple[float, int]:
    if not isinstance(event, Mapping):
        return (float("-inf"), -1)
    seq = event.get("seq")
    return (_time(event.get("received_at")), seq if isinstance(seq, int) else -1)


def merge_link(stored: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """``new`` (a full row from one ingester's view) merged with the ``stored`` row."""
    out = dict(new)
    if stored is None:
        return out
    if _newer(stored.get("state_received_at"), new.get("state_received_at")):
        for name in (*_STATE, "state_received_at"):
            out[name] = stored.get(name)
    if _newer(stored.get("telemetry_received_at"), new.get("telemetry_received_at")):
        for name in (*_TELEMETRY, "telemetry_received_at"):
            out[name] = stored.get(name)
    latest_stored = max(
        _time(stored.get("state_received_at")), _time(stored.get("telemetry_received_at"))
    )
    latest_new = max(_time(new.get("state_received_at")), _time(new.get("telemetry_received_at")))
    if latest_stored > latest_new:
        out["clock_skew_s"] = stored.get("clock_skew_s")
    models = dict(new.get("models") or {})
    for name, entry in (stored.get("models") or {}).items():
        if name not in models or _model_time(entry) > _model_time(models[name]):
            models[name] = entry
    out["models"] = models
    updates = dict(new.get("updates") or {})
    for name, event in (stored.get("updates") or {}).items():
        if name not in updates or _event_key(event) > _event_key(updates[name]):
            updates[name] = event
    out["updates"] = updates
    stored_at, new_at = stored.get("updated_at"), new.get("updated_at")
    if isinstance(stored_at, datetime) and not _newer(new_at, stored_at):
        out["updated_at"] = stored_at + timedelta(microseconds=1)
    return out

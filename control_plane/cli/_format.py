"""How ``edgectl`` tables show sizes and times: decimal units (``12.3 MB``) and UTC times with
their age (``2026-12-04 03:50 (5 min ago)``). ``--json`` prints the API's raw values instead."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from rich.filesize import decimal

__all__ = ["human_age", "human_size", "human_time", "reduced_compute_text"]


def human_size(value: int | float | None) -> str:
    """Bytes as ``1.2 MB`` (powers of 1000); ``-`` for none."""
    if value is None:
        return "-"
    return str(decimal(int(value)))


def human_age(seconds: float) -> str:
    """``12 s``, ``5 min``, ``3 h``, ``2 d``."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def human_time(value: str | None, *, now: datetime | None = None, never: str = "-") -> str:
    """An API timestamp (ISO 8601) as ``YYYY-MM-DD HH:MM`` (UTC) with its age."""
    if not value:
        return never
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if at.tzinfo is None:
        at = at.replace(tzinfo=timezone.utc)
    now = now or datetime.now(timezone.utc)
    delta = (now - at).total_seconds()
    text = at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")
    age = human_age(abs(delta))
    return f"{text} ({age} ago)" if delta >= 0 else f"{text} (in {age})"


def reduced_compute_text(accuracy: Mapping[str, Any]) -> str:
    """A variant's metric with its float parts computed in a reduced type (the manifest's
    ``accuracy.reduced_compute``) and what a device does about it: ``; bf16 96.4 (delta +3.64):
    f32 on such CPUs``. Empty where none was measured."""
    parts = []
    checks = accuracy.get("reduced_compute")
    for kind, check in checks.items() if isinstance(checks, Mapping) else ():
        try:
            value, delta = float(check["value"]), float(check["delta"])
        except (KeyError, TypeError, ValueError):
            continue
        verdict = f"runs {kind}" if check.get("accepted") else f"f32 on {kind} CPUs"
        parts.append(f"; {kind} {value:.4g} (delta {delta:+.3g}): {verdict}")
    return "".join(parts)

"""Which device events count against a rollout's version (``update_phase``): the version's own
failures do; a transient or local I/O failure the device retries does not."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from control_plane.rollouts.snapshot import update_phase

ASSIGNED = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _event(step: str, **kw: Any) -> dict[str, Any]:
    return {
        "step": step,
        "version": "2.0.0",
        "received_at": (ASSIGNED + timedelta(seconds=5)).isoformat(),
        **kw,
    }


@pytest.mark.parametrize(
    ("event", "phase"),
    [
        (_event("failed", reason="no variant fits this device"), "failed"),
        (_event("refused"), "failed"),
        (_event("download_failed", reason="HTTP 404"), "failed"),
        (_event("retrying", details={"failure_class": "transient"}), "updating"),
        (_event("retrying", details={"failure_class": "local_io"}), "updating"),
        (_event("download_started"), "updating"),
        (_event("committed"), "committed"),
        (_event("rolled_back", from_version="2.0.0"), "rolled_back"),
        # the store drops the failed version right after the failure: still a failure
        (_event("removed", reason="rejected: golden case 0: rel L2 0.7 > 0.0001"), "failed"),
        (_event("removed", reason="removed"), "updating"),  # housekeeping, not a verdict
    ],
)
def test_only_the_versions_own_failures_count(event: dict[str, Any], phase: str) -> None:
    assert update_phase(event, "2.0.0", ASSIGNED.timestamp()) == phase

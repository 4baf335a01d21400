"""What one running control-plane instance holds: settings, database, store, worker, caches.

Built by ``create_app`` and reached by routes through ``control_plane.api.deps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from control_plane.artifacts import ArtifactStore
from control_plane.desired import CredentialCache, DesiredStateCache
from control_plane.jobs import BuildWorker
from control_plane.metrics import Metrics
from control_plane.presence import LastSeenRecorder
from control_plane.settings import Settings
from control_plane.signing import TufRepository

if TYPE_CHECKING:
    from control_plane.deltas import DeltaService
    from control_plane.ingest import TelemetryIngester
    from control_plane.rollouts.service import RolloutService

__all__ = ["AppContext"]


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ArtifactStore
    worker: BuildWorker
    desired: DesiredStateCache
    credentials: CredentialCache
    metrics: Metrics
    now: Callable[[], datetime]
    ingester: TelemetryIngester | None = None  # None: settings.mqtt_host is not set
    rollouts: RolloutService | None = None
    tuf: TufRepository | None = None  # signed metadata for every artifact served
    presence: LastSeenRecorder | None = None  # None: polls do not refresh last_seen_at
    deltas: DeltaService | None = None  # None: only full archives are offered

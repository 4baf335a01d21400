"""Staged rollouts: a model version rolled out to label-selected devices in waves, promoted or
aborted from telemetry.

``controller`` is the pure decision core. Persisting rollouts, building fleet snapshots from
ingested telemetry, and carrying out actions (desired-state changes, ``rollback`` commands) are
the API and ingestion layers' job.
"""

from control_plane.rollouts.controller import (
    Abort,
    Action,
    Assign,
    AssignedDevice,
    Complete,
    DeviceStatus,
    FleetSnapshot,
    Promote,
    Rollback,
    RolloutController,
    RolloutRules,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    ShadowAssign,
    ShadowedDevice,
    ShadowFigures,
    ShadowHealth,
    ShadowPassed,
    ShadowStage,
    ShadowStop,
    Wave,
    WaveHealth,
    touched_devices,
    wave_rank,
)

__all__ = [
    "Abort",
    "Action",
    "Assign",
    "AssignedDevice",
    "Complete",
    "DeviceStatus",
    "FleetSnapshot",
    "Promote",
    "Rollback",
    "RolloutController",
    "RolloutRules",
    "RolloutSpec",
    "RolloutState",
    "RolloutStatus",
    "ShadowAssign",
    "ShadowFigures",
    "ShadowHealth",
    "ShadowPassed",
    "ShadowStage",
    "ShadowStop",
    "ShadowedDevice",
    "Wave",
    "WaveHealth",
    "touched_devices",
    "wave_rank",
]

"""Desired state (control plane -> device) and reported state (device -> control plane)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DesiredModel", "DesiredState", "Phase", "ReportedModel", "ReportedState"]

Phase = Literal[
    "idle",
    "downloading",
    "verifying",
    "installing",
    "loading",
    "validating",
    "swapping",
    "probation",
    "committed",
    "rolled_back",
    "failed",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DesiredModel(_Frozen):
    """What one model slot should run; the control plane resolved the variant for this device."""

    name: str
    version: str
    variant_id: str
    artifact_path: str  # TUF target path of the bundle archive
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    rollout_id: str | None = None
    policy: Literal["auto", "availability", "resources"] = "auto"


class DesiredState(_Frozen):
    schema_version: Literal[1] = 1
    device_id: str
    generation: int = Field(ge=0)
    models: tuple[DesiredModel, ...] = ()


class ReportedModel(_Frozen):
    name: str
    active_version: str | None = None
    variant_id: str | None = None
    backend: str | None = None
    phase: Phase = "idle"
    target_version: str | None = None
    last_error: str | None = None


class ReportedState(_Frozen):
    schema_version: Literal[1] = 1
    device_id: str
    agent_version: str
    generation_seen: int | None = None
    models: tuple[ReportedModel, ...] = ()
    updated_at: datetime

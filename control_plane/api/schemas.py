"""Operator-facing wire models of the HTTP API (the device-facing ones are agent contracts).

Split per resource as Create (request body), Update and Public (response). Every string that
reaches the database is bounded and free of control characters.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from agent.contracts.accuracy import Task
from agent.contracts.enrollment import LabelKey, LabelValue
from agent.contracts.manifest import (
    NAME_RE,
    AccuracyReport,
    BuildReport,
    Preprocessing,
    TargetConstraints,
)
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import DesiredState, ReportedState
from control_plane.auth import Role

__all__ = [
    "AssignmentCreate",
    "AssignmentPublic",
    "BootstrapTokenCreate",
    "BootstrapTokenCreated",
    "BootstrapTokenPublic",
    "CredentialRotate",
    "CredentialStatus",
    "DevicePublic",
    "ErrorBody",
    "JobPublic",
    "LabelsApprove",
    "LabelsUpdate",
    "ModelCreate",
    "ModelPublic",
    "RetryCreate",
    "RetryPublic",
    "SkippedVariant",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "VariantPublic",
    "VersionPublic",
    "VersionSummary",
]

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


Name = Annotated[str, Field(pattern=NAME_RE, examples=["ppocr-det"])]
Text = Annotated[str, Field(max_length=2000), AfterValidator(_printable)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: the error's name, a sentence saying what is wrong, details."""

    error: str = Field(examples=["ConflictError"])
    message: str
    detail: Any = None


class ModelCreate(_Body):
    name: Name
    accuracy_budget: float = Field(
        default=1.0, ge=0.0, le=100.0, description="allowed top-1 drop in points vs FP32"
    )
    description: Text = ""


class VersionSummary(BaseModel):
    version: str
    status: Literal["building", "ready", "failed"]
    created_at: datetime


class ModelPublic(BaseModel):
    name: str
    accuracy_budget: float
    description: str
    created_at: datetime
    versions: list[VersionSummary] = []


class SkippedVariant(BaseModel):
    """A target the build left out (a tool failed on it, or it needs a set not uploaded)."""

    id: str
    reason: str


class JobPublic(BaseModel):
    id: int
    model: str
    version: str
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float
    message: str
    log: list[str]
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    skipped: list[SkippedVariant] = []


class VariantPublic(BaseModel):
    id: str
    runtime: str
    format: str
    precision: str
    status: Literal["accepted", "rejected"]
    target: TargetConstraints
    accuracy: AccuracyReport | None
    artifact_path: str | None = Field(description="download path under /v1/artifacts/")
    sha256: str | None
    size: int | None
    build: BuildReport | None = Field(
        default=None,
        description="build-host latency, weight bytes, precision per compute op, INT8 search",
    )


class VersionPublic(BaseModel):
    model: str
    version: str
    status: Literal["building", "ready", "failed"]
    error: str | None
    source_sha256: str
    source_size: int
    created_at: datetime
    created_by: str
    task: Task | None = Field(
        default=None, description="the accuracy gate's task (declared, or the one the build used)"
    )
    preprocessing: Preprocessing | None = Field(
        default=None,
        description="how a device's loop turns frames into the first input (declared at upload;"
        " in every variant's manifest)",
    )
    variants: list[VariantPublic]
    skipped: list[SkippedVariant] = []
    job: JobPublic | None


DAY_S = 24 * 3600


class TokenCreate(_Body):
    name: Name
    role: Role = "viewer"
    expires_in_s: int = Field(
        default=90 * DAY_S, ge=1, le=366 * DAY_S, description="seconds until the token expires"
    )


class TokenPublic(BaseModel):
    id: int
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked: bool
    expires_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="shown only once")


class BootstrapTokenCreate(_Body):
    """An enrollment token: how many devices may enroll with it, until when, with what labels."""

    name: Name
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="given to every device that enrolls with it; they select assignments",
    )
    max_uses: int = Field(default=1, ge=1, le=100_000, description="enrollments it may make")
    expires_in_s: int = Field(
        default=DAY_S, ge=1, le=90 * DAY_S, description="seconds until the token expires"
    )


class BootstrapTokenPublic(BaseModel):
    id: int
    name: str
    labels: dict[str, str]
    max_uses: int | None = Field(description="None: no bound (the settings' token by default)")
    uses: int
    expires_at: datetime | None
    created_at: datetime
    created_by: str
    revoked: bool


class BootstrapTokenCreated(BootstrapTokenPublic):
    token: str = Field(description="shown only once")


CredentialStatus = Literal["active", "rotating", "revoked"]


class DevicePublic(BaseModel):
    id: str
    name: str
    labels: dict[str, str] = Field(description="labels that select assignments")
    requested_labels: dict[str, str] = Field(
        default_factory=dict,
        description="what the device asked for at enrollment; selects nothing until approved",
    )
    credential: CredentialStatus = "active"
    credential_rotate_by: datetime | None = Field(
        default=None, description="a pending rotation: the old credential is refused after it"
    )
    profile: HardwareProfile | None
    reported: ReportedState | None
    enrolled_at: datetime
    last_seen_at: datetime | None
    reported_at: datetime | None
    desired: DesiredState | None = None


class LabelsUpdate(_Body):
    set: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)
    remove: list[LabelKey] = Field(default_factory=list, max_length=32)


class LabelsApprove(_Body):
    """Approve requested labels (they then select assignments): these keys, or all of them."""

    keys: list[LabelKey] | None = Field(default=None, max_length=32)


class CredentialRotate(_Body):
    grace_s: int = Field(
        default=7 * DAY_S,
        ge=1,
        le=90 * DAY_S,
        description="seconds the device has to fetch its new credential with the old one",
    )


class RetryCreate(_Body):
    """Offer again what a device rejected: one model, or every model it is assigned."""

    model: Name | None = None


class RetryPublic(BaseModel):
    device_id: str
    models: list[str] = Field(description="models offered again (their generation grew)")
    desired: DesiredState


class AssignmentCreate(_Body):
    """Assign a model version to one device or to every device whose labels match."""

    model: Name
    version: str = Field(min_length=5, max_length=64, pattern=r"^[0-9A-Za-z.+-]+$")
    device_id: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,40}$")
    selector: dict[LabelKey, LabelValue] | None = Field(default=None, min_length=1, max_length=16)

    @model_validator(mode="after")
    def _one_target(self) -> AssignmentCreate:
        if (self.device_id is None) == (self.selector is None):
            raise ValueError("give exactly one of device_id or selector")
        return self


class AssignmentPublic(BaseModel):
    id: int
    model: str
    version: str
    device_id: str | None
    selector: dict[str, str] | None
    created_at: datetime
    created_by: str
    devices_matched: int

"""Enrollment: a device trades the fleet's bootstrap token for its own credential.

``POST /v1/devices/enroll`` takes an ``EnrollmentRequest`` and answers ``EnrollmentResponse``.
The credential is shown once; the control plane keeps only its hash. Afterwards the device sends
``Authorization: Bearer <credential>`` and may read only its own desired state and artifacts.
The labels a device sends are a request: they select assignments only once an operator approves
them (the bootstrap token's own labels select at once).

Rotation: while an operator's rotation is pending, the control plane's answers to the device
carry ``Edgefleet-Credential: rotate`` (``CREDENTIAL_HEADER``, ``ROTATE``); the device then
``POST``s to ``/v1/devices/<id>/credential`` with its current credential and receives a
``CredentialResponse``, keeps it, and uses it from then on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from agent.contracts.manifest import NAME_RE
from agent.contracts.profile import HardwareProfile

__all__ = [
    "CREDENTIAL_HEADER",
    "LABEL_KEY_RE",
    "LABEL_VALUE_RE",
    "ROTATE",
    "CredentialResponse",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "LabelKey",
    "LabelValue",
]

LABEL_KEY_RE = r"^[a-z][a-z0-9_.-]{0,31}$"
LABEL_VALUE_RE = r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$"
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_RE)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_RE)]
CREDENTIAL_HEADER = "Edgefleet-Credential"
ROTATE = "rotate"  # the header's value: fetch a new credential with the current one
_DEVICE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
_CREDENTIAL = Field(
    min_length=1,
    max_length=512,
    pattern=r"^[\x21-\x7e]+$",  # printable ASCII: it goes into an HTTP header
    description="bearer token for this device; shown only once",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EnrollmentRequest(_Frozen):
    schema_version: Literal[1] = 1
    bootstrap_token: str = Field(min_length=1, max_length=512)
    name: str = Field(
        pattern=NAME_RE, max_length=64, description="human-readable name, e.g. the hostname"
    )
    profile: HardwareProfile
    # Labels the device asks for (site, board, group): recorded as requested, selecting nothing
    # until an operator approves them; the bootstrap token's own labels apply at once.
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=32)


class EnrollmentResponse(_Frozen):
    schema_version: Literal[1] = 1
    device_id: str = Field(pattern=_DEVICE_ID_RE)
    credential: str = _CREDENTIAL
    desired_state_path: str = Field(
        max_length=512, description="e.g. /v1/devices/<id>/desired-state"
    )
    reported_state_path: str = Field(max_length=512)


class CredentialResponse(_Frozen):
    """``POST /v1/devices/<id>/credential``: the device's new credential, shown once."""

    schema_version: Literal[1] = 1
    device_id: str = Field(pattern=_DEVICE_ID_RE)
    credential: str = _CREDENTIAL

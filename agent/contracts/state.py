"""Desired state (control plane -> device) and reported state (device -> control plane).

Every field is bounded here, at the contract, so both sides refuse the same things: names,
versions, variant ids and artifact paths match safe patterns (no ``..``, no absolute path, no
separator where a single path component is meant), strings and lists have maximum lengths.

A desired state is parsed entry by entry (``parse_desired_state``): one entry that breaks the
contract is refused alone, with its reason, and the valid entries beside it still apply. What
the device refused travels back in ``ReportedState.refused``.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from agent.contracts.errors import ContractError
from agent.contracts.manifest import NAME_RE, semver_key

__all__ = [
    "ARTIFACT_PATH_MAX",
    "LAST_ERROR_MAX",
    "MAX_CANDIDATES",
    "MAX_MODELS",
    "DesiredDelta",
    "DesiredModel",
    "DesiredShadow",
    "DesiredState",
    "DesiredVariant",
    "LoopHealth",
    "ModelName",
    "ParsedDesiredState",
    "Phase",
    "RefusedEntry",
    "ReportedModel",
    "ReportedShadow",
    "ReportedState",
    "Version",
    "bounded_text",
    "check_artifact_path",
    "parse_desired_state",
]

MAX_MODELS = 64  # model slots per device, in either direction
LAST_ERROR_MAX = 2000  # characters
ARTIFACT_PATH_MAX = 512  # characters
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

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

# The configured inference loop of a model: running, failed (cannot start, died, or every frame
# of its last window failed; ``loop_error`` says why), or no version installed to run.
LoopHealth = Literal["running", "failed", "not_installed"]


def _semver(value: str) -> str:
    try:
        semver_key(value)
    except ValueError:
        raise ValueError(f"not a semantic version: {value!r}") from None
    return value


def check_artifact_path(value: str) -> str:
    """``value`` if it is a safe relative path (segments of ``[A-Za-z0-9._+-]`` that start with
    a letter or digit: no ``..``, no ``.``, no empty segment, not absolute); ``ValueError``."""
    segments = value.split("/")
    if len(value) > ARTIFACT_PATH_MAX or len(segments) > 8:
        raise ValueError(f"artifact path longer than {ARTIFACT_PATH_MAX} characters or 8 parts")
    if not all(_SEGMENT.match(s) for s in segments):
        raise ValueError(f"unsafe artifact path: {value[:100]!r}")
    return value


def _printable(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def bounded_text(text: str, limit: int = LAST_ERROR_MAX) -> str:
    """``text`` cut to ``limit`` characters with control characters replaced: what a sender
    does before putting free text (an error message) into a bounded field."""
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


ModelName = Annotated[str, Field(pattern=NAME_RE, max_length=64)]
VariantId = Annotated[str, Field(pattern=NAME_RE, max_length=64)]
Version = Annotated[
    str, Field(min_length=5, max_length=64, pattern=r"^[0-9A-Za-z.+-]+$"), AfterValidator(_semver)
]
ArtifactPath = Annotated[str, AfterValidator(check_artifact_path)]
RolloutId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")]
DeviceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")]
Text = Annotated[str, Field(max_length=LAST_ERROR_MAX), AfterValidator(_printable)]
Short = Annotated[str, Field(max_length=64), AfterValidator(_printable)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Offered(BaseModel):
    """What the control plane sends: unknown fields are ignored, so a control plane that adds
    one (a newer release) still reaches older agents; every known field stays bounded."""

    model_config = ConfigDict(frozen=True, extra="ignore")


MAX_CANDIDATES = 8  # variants offered per model entry


class DesiredVariant(_Offered):
    """One downloadable variant of a desired version: its bundle archive as a TUF target."""

    variant_id: VariantId
    artifact_path: ArtifactPath
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**53)


class DesiredDelta(_Offered):
    """The primary variant's archive as a delta against an archive the device already holds
    (``agent.updates.delta``): a TUF target of its own. Optional: the full archive stays the
    reference, and the device falls back to it whenever the delta cannot give its signed bytes."""

    from_version: Version
    from_variant_id: VariantId
    base_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the archive the delta applies to
    artifact_path: ArtifactPath  # TUF target path of the delta
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**53)


class DesiredShadow(_Offered):
    """A version to run *beside* the one serving, on a share of its inferences, never answering
    with it (a rollout's shadow stage): the device compares the two outputs with the model's
    task metric and reports agreement and latency in its telemetry (``ShadowTelemetry``)."""

    version: Version
    variant_id: VariantId
    artifact_path: ArtifactPath
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**53)
    rollout_id: RolloutId | None = None
    sample_share: float = Field(default=0.1, gt=0, le=1)  # of the serving inferences
    max_busy_share: float = Field(default=0.25, gt=0, le=1)  # of wall-clock time running it


class DesiredModel(_Offered):
    """What one model slot should run. The control plane resolved, with the variant contract
    (``agent.contracts.fit``), every variant that fits this device: the best by the contract's
    prior in ``variant_id``/``artifact_path``/``sha256``/``size``, and all of them, best first,
    in ``candidates`` (the first is the same variant). The device measures the candidates and
    serves the fastest that stays within tolerance; a device that does not measure takes the
    first."""

    name: ModelName
    version: Version
    variant_id: VariantId
    artifact_path: ArtifactPath  # TUF target path of the bundle archive
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**53)
    rollout_id: RolloutId | None = None
    policy: Literal["auto", "availability", "resources"] = "auto"
    # Grows whenever the control plane offers this entry again on purpose (a new assignment or
    # rollout wave, or an operator's retry): a device that rejected (version, generation)
    # tries the version again once the generation differs, never while it is unchanged.
    generation: int = Field(default=0, ge=0, le=2**63 - 1)
    candidates: tuple[DesiredVariant, ...] = Field(default=(), max_length=MAX_CANDIDATES)
    # The primary variant as a delta from the version this device reported serving, when the
    # control plane has one signed.
    delta: DesiredDelta | None = None
    shadow: DesiredShadow | None = None

    def offered(self) -> tuple[DesiredVariant, ...]:
        """The variants offered, best first (the primary one alone when no list was sent)."""
        if self.candidates:
            return self.candidates
        return (DesiredVariant(**self.model_dump(include=_PRIMARY)),)


_PRIMARY = {"variant_id", "artifact_path", "sha256", "size"}


class DesiredState(_Offered):
    schema_version: Literal[1] = 1
    device_id: DeviceId
    generation: int = Field(ge=0, le=2**63 - 1)
    models: tuple[DesiredModel, ...] = Field(default=(), max_length=MAX_MODELS)


class RefusedEntry(_Frozen):
    """A desired-state entry the device refused because it breaks the contract."""

    index: int = Field(ge=0, le=MAX_MODELS)
    name: Short  # the entry's name as given, cut and cleaned for display
    reason: Text


ShadowPhase = Literal["downloading", "loading", "running", "refused", "failed"]


class ReportedShadow(_Frozen):
    """Where the device stands with the shadow version it was asked to run."""

    version: Version
    phase: ShadowPhase
    reason: Text | None = None  # why refused (memory) or failed (download, load, validation)


class ReportedModel(_Frozen):
    name: ModelName
    active_version: Version | None = None
    variant_id: VariantId | None = None
    backend: Short | None = None
    device: Short | None = None  # where it runs: an ONNX Runtime provider, an OpenVINO device
    choice: Text | None = None  # why this variant serves (measured figures)
    phase: Phase = "idle"
    target_version: Version | None = None
    last_error: Text | None = None
    detail: Text | None = None  # what the phase waits for (probation short of inferences)
    loop: LoopHealth | None = None  # None: no inference loop is configured for this model
    loop_error: Text | None = None
    shadow: ReportedShadow | None = None


class ReportedState(_Frozen):
    schema_version: Literal[1] = 1
    device_id: str = Field(max_length=128)
    agent_version: Short
    generation_seen: int | None = Field(default=None, ge=0, le=2**63 - 1)
    models: tuple[ReportedModel, ...] = Field(default=(), max_length=MAX_MODELS)
    refused: tuple[RefusedEntry, ...] = Field(default=(), max_length=MAX_MODELS)
    updated_at: datetime


class _DesiredEnvelope(_Offered):
    """A desired state with its entries not yet checked (each is checked on its own)."""

    schema_version: Literal[1] = 1
    device_id: DeviceId
    generation: int = Field(ge=0, le=2**63 - 1)
    models: tuple[Any, ...] = Field(default=(), max_length=MAX_MODELS)


class ParsedDesiredState(BaseModel):
    """The valid part of a desired state, and the entries refused with their reasons."""

    model_config = ConfigDict(frozen=True)

    state: DesiredState
    refused: tuple[RefusedEntry, ...] = ()


def _entry_name(entry: Any) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return bounded_text(name, 64) if isinstance(name, str) else "?"


def _first_problem(exc: PydanticValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "entry"
    return bounded_text(f"{where}: {err.get('msg', 'invalid')}", 500)


def parse_desired_state(data: bytes | str) -> ParsedDesiredState:
    """Parse a desired-state document; a bad entry is refused alone (and so is a second entry
    for a model already named). ``ContractError`` if the envelope itself is unusable."""
    try:
        envelope = _DesiredEnvelope.model_validate_json(data)
    except PydanticValidationError as exc:
        raise ContractError(f"desired state does not parse: {_first_problem(exc)}") from None
    models: list[DesiredModel] = []
    refused: list[RefusedEntry] = []
    seen: set[str] = set()
    for index, entry in enumerate(envelope.models):
        try:
            model = DesiredModel.model_validate(entry)
        except PydanticValidationError as exc:
            reason = _first_problem(exc)
        else:
            if model.name not in seen:
                seen.add(model.name)
                models.append(model)
                continue
            reason = f"model {model.name!r} is named by an earlier entry"
        refused.append(RefusedEntry(index=index, name=_entry_name(entry), reason=reason))
    state = DesiredState(
        device_id=envelope.device_id, generation=envelope.generation, models=tuple(models)
    )
    return ParsedDesiredState(state=state, refused=tuple(refused))

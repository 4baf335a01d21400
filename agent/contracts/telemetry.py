"""MQTT wire contract between a device and everything that listens to it: topics and payloads.

Owns the topic tree (``<prefix>/<device_id>/state|telemetry|events|cmd|results``), device-id
rules that keep topics safe, and the pydantic models of the state (birth / last will), telemetry
and command payloads. Update events reuse ``agent.contracts.events.UpdateEvent``, loop results
``agent.contracts.results``. Pure data: publishing is
``agent.telemetry``'s job, ingestion the control plane's. JSON Schemas are generated from these
models by ``python -m agent.contracts.schemas``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from agent.contracts.errors import ContractError
from agent.contracts.events import UpdateEvent
from agent.contracts.profile import HardwareProfile
from agent.contracts.sketch import LatencySketch

__all__ = [
    "DEFAULT_TOPIC_PREFIX",
    "DEVICE_ID_PATTERN",
    "MAX_COMMAND_BYTES",
    "CheckUpdateCommand",
    "Command",
    "DeviceTopics",
    "GpuMetrics",
    "ModelTelemetry",
    "RollbackCommand",
    "ShadowTelemetry",
    "SlotIdentity",
    "StatePayload",
    "SystemMetrics",
    "TelemetryPayload",
    "TopicKind",
    "UpdateEvent",
    "parse_command",
    "parse_topic",
    "validate_device_id",
]

DEFAULT_TOPIC_PREFIX = "edgefleet/v1"
# Letters, digits and . _ : @ - ; no MQTT wildcards, separators, spaces or control characters,
# so a device id can be substituted into topics and into the broker's %u/%c pattern ACLs.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
_DEVICE_ID_RE = re.compile(DEVICE_ID_PATTERN)
MAX_COMMAND_BYTES = 16 * 1024  # bytes; a command is a few hundred bytes, anything larger is abuse

TopicKind = Literal["state", "telemetry", "events", "cmd", "results"]
_KINDS: tuple[TopicKind, ...] = ("state", "telemetry", "events", "cmd", "results")

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe inside a topic; raise ``ContractError`` otherwise."""
    if not isinstance(device_id, str) or not _DEVICE_ID_RE.fullmatch(device_id):
        raise ContractError(
            f"device id {device_id!r} is not topic-safe: 1-128 of A-Z a-z 0-9 . _ : @ -, "
            "starting with a letter or digit"
        )
    return device_id


def _validate_prefix(prefix: str) -> str:
    parts = prefix.split("/")
    if not prefix or any(not p or p.startswith("$") or set(p) & set("#+\0 ") for p in parts):
        raise ContractError(f"topic prefix {prefix!r} is not a plain topic path")
    return prefix


@dataclass(frozen=True)
class DeviceTopics:
    """The topics of one device under a prefix (default ``edgefleet/v1``)."""

    device_id: str
    prefix: str = DEFAULT_TOPIC_PREFIX

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        _validate_prefix(self.prefix)

    def topic(self, kind: TopicKind) -> str:
        return f"{self.prefix}/{self.device_id}/{kind}"

    @property
    def state(self) -> str:
        """Retained birth (``online``) and last will (``offline``); QoS 1."""
        return self.topic("state")

    @property
    def telemetry(self) -> str:
        """Periodic window statistics and system metrics; QoS 0."""
        return self.topic("telemetry")

    @property
    def events(self) -> str:
        """Update lifecycle events; QoS 1."""
        return self.topic("events")

    @property
    def results(self) -> str:
        """The inference loop's postprocessed results (``agent.contracts.results``); QoS 0."""
        return self.topic("results")

    @property
    def cmd(self) -> str:
        """Commands from the control plane; the device subscribes at QoS 1."""
        return self.topic("cmd")


def parse_topic(topic: str, prefix: str = DEFAULT_TOPIC_PREFIX) -> tuple[str, TopicKind]:
    """Split ``<prefix>/<device_id>/<kind>``; raise ``ContractError`` for anything else.

    Receivers use it to attribute a message to the device whose topic it arrived on, and compare
    that with the ``device_id`` inside the payload.
    """
    head = prefix + "/"
    if not topic.startswith(head):
        raise ContractError(f"topic {topic!r} is outside {prefix!r}")
    rest = topic[len(head) :].split("/")
    if len(rest) != 2 or rest[1] not in _KINDS:
        raise ContractError(f"topic {topic!r} is not <prefix>/<device_id>/<kind>")
    device_id = validate_device_id(rest[0])
    kind: TopicKind = rest[1]  # checked against _KINDS above
    return device_id, kind


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SlotIdentity(_Frozen):
    """Which model a slot runs, as reported in the birth message."""

    name: str
    version: str | None = None
    variant_id: str | None = None
    backend: str | None = None
    device: str | None = Field(default=None, max_length=64)  # ORT provider, OpenVINO device
    choice: str | None = Field(default=None, max_length=1000)  # why this variant serves
    digest: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")  # sha256 of the artifact


class StatePayload(_Frozen):
    """Retained on ``/state``: the birth message on every connect, and the last will."""

    schema_version: Literal[1] = 1
    device_id: DeviceId
    status: Literal["online", "offline"]
    ts: datetime
    agent_version: str
    profile: HardwareProfile | None = None
    models: tuple[SlotIdentity, ...] = ()
    # Why the device is offline: "connection_lost" (last will) or "shutdown" (clean stop).
    reason: str | None = None


class ShadowTelemetry(_Frozen):
    """A shadow version's comparison with the serving one over the last telemetry window.

    ``samples`` inferences were run on both; ``metric`` is the model's task metric
    (``agent.contracts.accuracy``), ``value`` its mean over the samples in percent (the serving
    version scores 100; for ``rel_l2`` the error itself, the serving version 0) and ``delta`` the
    mean points lost. Latencies are of the same sampled inferences, each version on its own.
    ``skipped`` counts inferences due for a sample that were left out to keep within the busy
    budget or because the previous sample was still running."""

    version: str = Field(max_length=64)
    variant_id: str | None = Field(default=None, max_length=64)
    task: str = Field(max_length=32)
    metric: str = Field(max_length=32)
    samples: int = Field(ge=0)
    skipped: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)  # shadow runs that raised
    value: float | None = None
    delta: float | None = Field(default=None, ge=0)
    latency_p50_ms: float | None = Field(default=None, ge=0)
    latency_p99_ms: float | None = Field(default=None, ge=0)
    serving_p99_ms: float | None = Field(default=None, ge=0)
    busy_share: float = Field(default=0.0, ge=0)  # of the window's wall-clock time


class ModelTelemetry(_Frozen):
    """One model's inference statistics over the last window."""

    name: str
    version: str | None = None
    variant_id: str | None = None
    backend: str | None = None
    window_s: float = Field(gt=0)
    count: int = Field(ge=0)  # inferences completed (ok + failed)
    failed: int = Field(ge=0)
    dropped: int = Field(ge=0)  # frames the loop skipped to keep its rate
    throughput_per_s: float = Field(ge=0)
    latency_p50_ms: float | None = Field(default=None, ge=0)  # None when count == 0
    latency_p95_ms: float | None = Field(default=None, ge=0)
    latency_p99_ms: float | None = Field(default=None, ge=0)
    # The window's latencies as a mergeable sketch (agent.contracts.sketch): what fleet
    # percentiles are computed from. None from agents that do not send one.
    latency_sketch: LatencySketch | None = None
    shadow: ShadowTelemetry | None = None  # a version running beside this one, never answering


class GpuMetrics(_Frozen):
    """What the device exposes of its GPU; each field is None where it cannot be read."""

    name: str | None = None
    utilization_percent: float | None = Field(default=None, ge=0, le=100)
    memory_used_bytes: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    power_w: float | None = Field(default=None, ge=0)


class SystemMetrics(_Frozen):
    cpu_percent: float | None = Field(default=None, ge=0, le=100)
    memory_used_bytes: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)
    cpu_temperature_c: float | None = None
    # Every readable thermal zone by its type name, e.g. {"CPU-therm": 41.5, "GPU-therm": 39.0}.
    temperatures_c: dict[str, float] = Field(default_factory=dict)
    gpus: tuple[GpuMetrics, ...] = ()


class TelemetryPayload(_Frozen):
    """Published on ``/telemetry`` every ``telemetry_interval_s`` (QoS 0, not retained)."""

    schema_version: Literal[1] = 1
    device_id: DeviceId
    seq: int = Field(ge=0)  # per agent process; restarts at 0, receivers order by ts
    ts: datetime
    models: tuple[ModelTelemetry, ...] = ()
    system: SystemMetrics = SystemMetrics()


class _CommandBase(_Frozen):
    schema_version: Literal[1] = 1
    id: str = Field(min_length=1, max_length=64)  # receivers drop an id they have seen
    issued_at: datetime


class CheckUpdateCommand(_CommandBase):
    """Ask the device to poll its desired state now instead of at the next interval."""

    command: Literal["check-update"]


class RollbackCommand(_CommandBase):
    """Ask the device to roll ``model`` back to its previous committed version."""

    command: Literal["rollback"]
    model: str = Field(min_length=1, max_length=64)
    rollout_id: str | None = None


Command = Annotated[CheckUpdateCommand | RollbackCommand, Field(discriminator="command")]
COMMAND_ADAPTER: TypeAdapter[CheckUpdateCommand | RollbackCommand] = TypeAdapter(Command)


def parse_command(payload: bytes, *, max_bytes: int = MAX_COMMAND_BYTES) -> Command:
    """Decode a ``/cmd`` payload; raise ``ContractError`` if oversized or malformed."""
    if len(payload) > max_bytes:
        raise ContractError(f"command of {len(payload)} bytes exceeds {max_bytes} bytes")
    try:
        return COMMAND_ADAPTER.validate_json(payload)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise ContractError(f"malformed command: {where}: {first['msg']}") from exc

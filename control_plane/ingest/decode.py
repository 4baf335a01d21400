"""Turning one MQTT message into a validated payload, or a reason to ignore it.

Pure: no I/O, no clock. Owns what the ingester accepts: a topic of the documented tree, a payload
within the size bound that validates against the agent's wire contract, whose ``device_id`` is
the one in the topic (the broker ACL stops a device publishing on another's topics; this is the
second line), and whose strings fit the database columns. Counting and storing rejected
messages is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timezone
from typing import Any, Literal

from pydantic import ValidationError as PydanticValidationError

from agent.contracts.errors import ContractError
from agent.contracts.events import UpdateEvent
from agent.contracts.telemetry import StatePayload, TelemetryPayload, parse_topic
from control_plane.errors import ControlPlaneError

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "Decoded",
    "MessageRejectedError",
    "RejectReason",
    "decode_message",
]

DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024  # bytes; a telemetry message is ~1 KiB, a birth ~4 KiB
MAX_NAME_CHARS = 64  # model names and versions: the column widths of the time series
MAX_MODELS_PER_MESSAGE = 32
MAX_SEQ = 2**63 - 1  # the columns are 64-bit
MAX_COUNT = 2**31 - 1  # inferences per window; sums stay far inside 64 bits

RejectReason = Literal["oversized", "malformed", "mismatch"]


class MessageRejectedError(ControlPlaneError):
    """An MQTT message the ingester ignores; ``reason`` is the counter it goes to."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        self.reason: RejectReason = reason
        super().__init__(message)


@dataclass(frozen=True)
class Decoded:
    """A message that passed every check, attributed to the device of its topic."""

    device_id: str
    payload: StatePayload | TelemetryPayload | UpdateEvent


def _check_text(value: str | None, what: str, limit: int = MAX_NAME_CHARS) -> None:
    if value is None:
        return
    if len(value) > limit or "\x00" in value:
        raise MessageRejectedError(
            "malformed", f"{what} is longer than {limit} characters or holds NUL"
        )


def _malformed(what: str) -> MessageRejectedError:
    return MessageRejectedError("malformed", what)


def _check_finite(values: Iterable[float | None], what: str) -> None:
    # NaN and infinities pass the contract's bounds but no database or JSON column takes them.
    for v in values:
        if v is not None and not math.isfinite(v):
            raise _malformed(f"{what}: {v} is not a finite number")


def _walk_finite(value: Any, what: str) -> None:
    if isinstance(value, float):
        _check_finite((value,), what)
    elif isinstance(value, dict):
        for v in value.values():
            _walk_finite(v, what)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _walk_finite(v, what)


def _check_numbers(payload: StatePayload | TelemetryPayload | UpdateEvent) -> None:
    try:
        payload.ts.astimezone(timezone.utc)
    except (OverflowError, ValueError) as exc:
        raise _malformed(f"ts {payload.ts} is out of range") from exc
    if isinstance(payload, TelemetryPayload):
        if payload.seq > MAX_SEQ:
            raise _malformed(f"seq {payload.seq} exceeds 64 bits")
        for m in payload.models:
            _check_finite(
                (
                    m.window_s,
                    m.throughput_per_s,
                    m.latency_p50_ms,
                    m.latency_p95_ms,
                    m.latency_p99_ms,
                ),
                f"model {m.name!r}",
            )
            if max(m.count, m.failed, m.dropped) > MAX_COUNT:
                raise _malformed(f"model {m.name!r}: counts over {MAX_COUNT} in one window")
        system = payload.system
        _check_finite(
            (system.cpu_percent, system.cpu_temperature_c, *system.temperatures_c.values()),
            "system",
        )
        for g in system.gpus:
            _check_finite((g.utilization_percent, g.temperature_c, g.power_w), "gpu")
    elif isinstance(payload, UpdateEvent):
        if payload.seq > MAX_SEQ:
            raise _malformed(f"seq {payload.seq} exceeds 64 bits")
        _walk_finite(payload.details, "event details")
    else:
        _walk_finite(payload.model_dump(), "state")


def _check_fields(payload: StatePayload | TelemetryPayload | UpdateEvent) -> None:
    _check_numbers(payload)
    if isinstance(payload, TelemetryPayload):
        if len(payload.models) > MAX_MODELS_PER_MESSAGE:
            raise MessageRejectedError("malformed", f"{len(payload.models)} models in one window")
        for m in payload.models:
            _check_text(m.name, "model name")
            _check_text(m.version, "model version")
            _check_text(m.variant_id, "variant id", 128)
            _check_text(m.backend, "backend")
    elif isinstance(payload, StatePayload):
        _check_text(payload.agent_version, "agent_version")
        _check_text(payload.reason, "reason")
        if len(payload.models) > MAX_MODELS_PER_MESSAGE:
            raise MessageRejectedError("malformed", f"{len(payload.models)} slots in one birth")
        for s in payload.models:
            _check_text(s.name, "slot name")
            _check_text(s.version, "slot version")
    else:
        _check_text(payload.model, "event model", 128)
        _check_text(payload.version, "event version")
        _check_text(payload.from_version, "event from_version")
        _check_text(payload.reason, "event reason", 4096)


def decode_message(
    topic: str,
    payload: bytes,
    *,
    prefix: str,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Decoded:
    """Validate one message from ``<prefix>/<device_id>/state|telemetry|events``.

    Raises ``MessageRejectedError`` with reason ``oversized`` (over ``max_bytes``), ``malformed``
    (wrong topic, invalid JSON, fails the contract, strings too long) or ``mismatch`` (the
    payload names another device than its topic).
    """
    if len(payload) > max_bytes:
        raise MessageRejectedError(
            "oversized", f"{len(payload)} bytes on {topic!r} exceed {max_bytes} bytes"
        )
    try:
        device_id, kind = parse_topic(topic, prefix)
    except ContractError as exc:
        raise MessageRejectedError("malformed", str(exc)) from exc
    parsed: StatePayload | TelemetryPayload | UpdateEvent
    try:
        if kind == "telemetry":
            parsed = TelemetryPayload.model_validate_json(payload)
        elif kind == "state":
            parsed = StatePayload.model_validate_json(payload)
        elif kind == "events":
            parsed = UpdateEvent.model_validate_json(payload)
        else:
            raise MessageRejectedError("malformed", f"{kind!r} is not an ingested topic")
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise MessageRejectedError(
            "malformed", f"{kind} from {device_id!r}: {where}: {first['msg']}"
        ) from exc
    if parsed.device_id != device_id:
        raise MessageRejectedError(
            "mismatch", f"payload of device {parsed.device_id!r} on {device_id!r}'s {kind} topic"
        )
    if parsed.ts.tzinfo is None:
        raise MessageRejectedError("malformed", f"{kind} from {device_id!r}: ts has no zone")
    _check_fields(parsed)
    return Decoded(device_id, parsed)

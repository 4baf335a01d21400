"""Topics, device-id safety, payload validation and the published JSON Schemas."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema_rs
import pytest

from agent.contracts import schemas
from agent.contracts.errors import ContractError
from agent.contracts.telemetry import (
    CheckUpdateCommand,
    DeviceTopics,
    RollbackCommand,
    StatePayload,
    parse_command,
    parse_topic,
    validate_device_id,
)
from tests.conftest import ROOT


def test_topics() -> None:
    topics = DeviceTopics("robot-7")
    assert topics.state == "edgefleet/v1/robot-7/state"
    assert topics.telemetry == "edgefleet/v1/robot-7/telemetry"
    assert topics.events == "edgefleet/v1/robot-7/events"
    assert topics.cmd == "edgefleet/v1/robot-7/cmd"
    assert parse_topic("edgefleet/v1/robot-7/events") == ("robot-7", "events")
    assert DeviceTopics("r1", prefix="acme/fleet/v1").state == "acme/fleet/v1/r1/state"


@pytest.mark.parametrize(
    "bad", ["", "a/b", "a+b", "a#", "has space", "-leading", "x" * 129, "nul\0", "émoji", "$SYS"]
)
def test_unsafe_device_ids_are_refused(bad: str) -> None:
    with pytest.raises(ContractError, match="not topic-safe"):
        validate_device_id(bad)
    with pytest.raises(ContractError):
        DeviceTopics(bad)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/robot/state",
        "edgefleet/v1/robot/state/extra",
        "edgefleet/v1/robot/firmware",
        "edgefleet/v1/+/state",
        "edgefleet/v1//state",
    ],
)
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(ContractError):
        parse_topic(topic)


def test_bad_prefix_refused() -> None:
    for prefix in ("", "a//b", "fleet/#", "$SYS/x"):
        with pytest.raises(ContractError, match="topic prefix"):
            DeviceTopics("r1", prefix=prefix)


def test_commands_parse_and_refuse() -> None:
    ok = parse_command(b'{"id":"1","issued_at":"2025-01-01T00:00:00Z","command":"check-update"}')
    assert isinstance(ok, CheckUpdateCommand)
    rb = parse_command(
        b'{"id":"2","issued_at":"2025-01-01T00:00:00Z","command":"rollback","model":"det"}'
    )
    assert isinstance(rb, RollbackCommand)
    with pytest.raises(ContractError, match="exceeds 10 bytes"):
        parse_command(b"x" * 11, max_bytes=10)
    with pytest.raises(ContractError, match=r"malformed command: rollback\.model"):
        parse_command(b'{"id":"2","issued_at":"2025-01-01T00:00:00Z","command":"rollback"}')
    with pytest.raises(ContractError, match="malformed command"):
        parse_command(b'{"id":"3","issued_at":"2025-01-01T00:00:00Z","command":"format-disk"}')


def test_payload_device_id_must_be_topic_safe() -> None:
    with pytest.raises(ValueError, match="device_id"):
        StatePayload(device_id="a/b", status="online", ts="2025-01-01T00:00:00Z", agent_version="1")


def test_published_schemas_are_current_and_validate_payloads(tmp_path: Path) -> None:
    assert schemas.write_schemas(ROOT / "docs" / "schemas", check=True) == [], (
        "run: python -m agent.contracts.schemas"
    )
    written = schemas.write_schemas(tmp_path)
    assert sorted(p.name for p in written) == [
        "command.json",
        "event.json",
        "result.json",
        "state.json",
        "telemetry.json",
    ]
    state = json.loads((tmp_path / "state.json").read_text())
    birth = StatePayload(
        device_id="r1", status="online", ts="2025-01-01T00:00:00Z", agent_version="0.1.0"
    )
    assert jsonschema_rs.validator_for(state).is_valid(json.loads(birth.model_dump_json()))
    assert not jsonschema_rs.validator_for(state).is_valid({"device_id": "r1", "status": "maybe"})
    command = json.loads((tmp_path / "command.json").read_text())
    assert jsonschema_rs.validator_for(command).is_valid(
        {"id": "1", "issued_at": "2025-01-01T00:00:00Z", "command": "rollback", "model": "m"}
    )
    assert not jsonschema_rs.validator_for(command).is_valid(
        {"id": "1", "issued_at": "2025-01-01T00:00:00Z", "command": "rollback"}
    )


def test_schema_cli_check_mode(tmp_path: Path) -> None:
    assert schemas.main([str(tmp_path)]) == 0
    assert schemas.main([str(tmp_path), "--check"]) == 0
    (tmp_path / "state.json").write_text("{}")
    assert schemas.main([str(tmp_path), "--check"]) == 1
    assert (tmp_path / "state.json").read_text() == "{}"  # check never writes

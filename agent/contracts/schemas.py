"""JSON Schemas of the MQTT payloads, generated from the pydantic models.

``python -m agent.contracts.schemas [OUT_DIR]`` writes one ``<name>.json`` per payload into
``docs/schemas`` (or OUT_DIR); ``--check`` exits 1 when a written file is out of date, so CI can
keep the published schemas in step with the models. Only the schema text is owned here; the
models live in ``agent.contracts.telemetry``, ``agent.contracts.events`` and
``agent.contracts.results``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from agent.contracts.events import UpdateEvent
from agent.contracts.results import ResultMessage
from agent.contracts.telemetry import Command, StatePayload, TelemetryPayload

__all__ = ["SCHEMA_DIALECT", "payload_schemas", "render", "write_schemas"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_ID_BASE = "https://edgefleet.dev/schemas/v1/"

# file stem -> (model, topic suffix it travels on)
_PAYLOADS: dict[str, tuple[Any, str]] = {
    "state": (StatePayload, "state"),
    "telemetry": (TelemetryPayload, "telemetry"),
    "event": (UpdateEvent, "events"),
    "command": (Command, "cmd"),
    "result": (ResultMessage, "results"),
}


def payload_schemas() -> dict[str, dict[str, Any]]:
    """Every payload's JSON Schema (validation mode, i.e. what a receiver accepts), by name."""
    out: dict[str, dict[str, Any]] = {}
    for name, (model, topic) in _PAYLOADS.items():
        schema = TypeAdapter(model).json_schema()
        out[name] = {
            "$schema": SCHEMA_DIALECT,
            "$id": f"{_ID_BASE}{name}.json",
            "title": schema.pop("title", name),
            "description": f"Payload on edgefleet/v1/<device_id>/{topic}",
            **schema,
        }
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(out_dir: Path, *, check: bool = False) -> list[Path]:
    """Write (or with ``check``, compare) the schema files; return the paths that differ."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale: list[Path] = []
    for name, schema in payload_schemas().items():
        path = out_dir / f"{name}.json"
        text = render(schema)
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not check:
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    rest = [a for a in args if a != "--check"]
    out_dir = Path(rest[0]) if rest else Path("docs/schemas")
    stale = write_schemas(out_dir, check=check)
    for path in stale:
        print(f"{'stale' if check else 'wrote'} {path}")
    return 1 if check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``edgectl tokens`` and ``edgectl bootstrap-tokens``: who may call the API and who may enroll.

    edgectl tokens create NAME [--role viewer|operator|admin] [--expires 90d]
    edgectl tokens ls [--json] | revoke ID
    edgectl bootstrap-tokens create NAME [--label key=value ...] [--uses 1] [--expires 24h]
    edgectl bootstrap-tokens ls [--json] | revoke ID

A token is printed once, at creation, as the last word of the line. Durations are a number with
``s``, ``m``, ``h`` or ``d``. The device-side commands (approve labels, rotate or revoke a
credential) are under ``edgectl devices``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from control_plane.cli._client import ControlPlaneClient
from control_plane.cli._format import human_time
from control_plane.errors import ConfigError

__all__ = ["bootstrap_tokens_app", "parse_duration_s", "tokens_app"]

tokens_app = typer.Typer(help="Operator API tokens (admin).", no_args_is_help=True)
bootstrap_tokens_app = typer.Typer(
    help="Bootstrap tokens: how many devices may enroll, until when, with which labels.",
    no_args_is_help=True,
)

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON")]


def _client() -> ControlPlaneClient:
    from control_plane.cli import _client as configured_client  # the package imports this module

    return configured_client()


def _console() -> Console:
    return Console(highlight=False)


def parse_duration_s(text: str, *, option: str) -> int:
    """``90s``, ``30m``, ``2h``, ``7d`` -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ConfigError(f"{option} {text!r}: write a number with s, m, h or d (e.g. 30d)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_label_items(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--label {item!r}: write key=value")
        labels[key] = value
    return labels


def _when(value: str | None) -> str:
    return human_time(value, never="never")


# -- operator API tokens ---------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    name: str,
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
    expires: Annotated[str, typer.Option(help="lifetime, e.g. 30d (at most 366d)")] = "90d",
) -> None:
    """Create an operator API token; it is printed once."""
    expires_in_s = parse_duration_s(expires, option="--expires")
    with _client() as client:
        t = client.create_token(name, role, expires_in_s=expires_in_s)
    _console().print(
        f"token {t['name']} ({t['role']}, expires {_when(t['expires_at'])}): {t['token']}"
    )


@tokens_app.command("ls")
def tokens_ls(as_json: JsonOption = False) -> None:
    """List operator API tokens (never the tokens themselves)."""
    with _client() as client:
        tokens = client.list_tokens()
    if as_json:
        print(json.dumps(tokens, indent=2))
        return
    table = Table("id", "name", "role", "created by", "expires (UTC)", "state")
    for t in tokens:
        state = "revoked" if t["revoked"] else "active"
        table.add_row(
            str(t["id"]), t["name"], t["role"], t["created_by"], _when(t["expires_at"]), state
        )
    _console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int) -> None:
    """Revoke an operator API token: refused from the next request on."""
    with _client() as client:
        t = client.revoke_token(token_id)
    _console().print(f"token {t['id']} ({t['name']}) revoked")


# -- bootstrap tokens ------------------------------------------------------------------------


@bootstrap_tokens_app.command("create")
def bootstrap_tokens_create(
    name: str,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="key=value given to every device it enrolls (repeat)"),
    ] = None,
    uses: Annotated[int, typer.Option(help="how many devices may enroll with it")] = 1,
    expires: Annotated[str, typer.Option(help="lifetime, e.g. 24h (at most 90d)")] = "24h",
) -> None:
    """Create a bootstrap token; it is printed once. Put it in the device's
    control_plane.bootstrap_token."""
    labels = parse_label_items(label or [])
    expires_in_s = parse_duration_s(expires, option="--expires")
    with _client() as client:
        t = client.create_bootstrap_token(
            name, labels=labels, max_uses=uses, expires_in_s=expires_in_s
        )
    shown = ",".join(f"{k}={v}" for k, v in sorted(t["labels"].items())) or "no labels"
    _console().print(
        f"bootstrap token {t['name']} ({shown}; {t['max_uses']} uses; "
        f"expires {_when(t['expires_at'])}): {t['token']}"
    )


@bootstrap_tokens_app.command("ls")
def bootstrap_tokens_ls(as_json: JsonOption = False) -> None:
    """List bootstrap tokens: labels, uses, expiry (never the tokens themselves)."""
    with _client() as client:
        tokens: list[dict[str, Any]] = client.list_bootstrap_tokens()
    if as_json:
        print(json.dumps(tokens, indent=2))
        return
    table = Table("id", "name", "labels", "uses", "expires (UTC)", "created by", "state")
    for t in tokens:
        labels = ",".join(f"{k}={v}" for k, v in sorted(t["labels"].items()))
        bound = "-" if t["max_uses"] is None else str(t["max_uses"])
        table.add_row(
            str(t["id"]),
            t["name"],
            labels or "-",
            f"{t['uses']}/{bound}",
            _when(t["expires_at"]),
            t["created_by"],
            "revoked" if t["revoked"] else "active",
        )
    _console().print(table)


@bootstrap_tokens_app.command("revoke")
def bootstrap_tokens_revoke(token_id: int) -> None:
    """Revoke a bootstrap token: no more enrollments (enrolled devices keep their credential)."""
    with _client() as client:
        t = client.revoke_bootstrap_token(token_id)
    _console().print(f"bootstrap token {t['id']} ({t['name']}) revoked after {t['uses']} uses")

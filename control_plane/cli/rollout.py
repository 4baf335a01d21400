"""``edgectl rollout``: create, watch and steer staged rollouts over the HTTP API.

    edgectl rollout create MODEL VERSION --to key=value[,...] --waves 1%,10%,50%,100% --soak 30m
                           [--report-timeout 15m] [--silent failed|skipped]
                           [--shadow 10% [--shadow-soak 10m] [--shadow-sample 0.1]
                            [--shadow-max-delta 1.0] [--shadow-max-latency 1.5]
                            [--shadow-min-samples 100]]
    edgectl rollout ls [--json]
    edgectl rollout status ID [--watch] [--interval 2] [--json]
    edgectl rollout pause|resume ID
    edgectl rollout abort|rollback ID [--reason TEXT]

The decisions are the control plane's; this module only formats them.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from control_plane.cli._client import ControlPlaneClient
from control_plane.errors import ConfigError

__all__ = ["parse_duration", "parse_waves", "rollout_app", "status_view"]

rollout_app = typer.Typer(help="Staged rollouts.", no_args_is_help=True)
_TERMINAL = ("aborted", "completed")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")
JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON")]


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def _client() -> ControlPlaneClient:
    from control_plane.cli import _client as configured_client  # the package imports this module

    return configured_client()


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h`` -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ConfigError(f"duration {text!r}: use seconds or a number with s, m or h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def parse_waves(text: str, soak_s: float) -> list[dict[str, Any]]:
    """``1%,10%,100%`` or ``5,50,100%``: each wave soaks ``soak_s`` except the last."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError("--waves: give at least one wave, e.g. 1%,10%,100%")
    waves: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        soak = soak_s if i < len(parts) - 1 else 0.0
        try:
            if part.endswith("%"):
                waves.append({"percent": float(part[:-1]), "soak_s": soak})
            else:
                waves.append({"count": int(part), "soak_s": soak})
        except ValueError as exc:
            raise ConfigError(f"--waves: {part!r} is neither N% nor a device count") from exc
    return waves


def _selector(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"--to: {pair!r} is not key=value")
        out[key] = value
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def status_view(r: dict[str, Any], *, max_devices: int = 20) -> Group:
    """The status of one rollout as rich renderables (what ``status`` prints or refreshes)."""
    head = Text.assemble(
        (f"{r['id']}", "bold"),
        f"  {r['model']} {r['version']}  ",
        (r["status"], "bold green" if r["status"] in ("running", "completed") else "bold yellow"),
        f"  wave {r['wave'] + 1}/{r['waves']}  fleet {r['fleet_size']}  "
        f"assigned {r['assigned']}  rolled back {r['rolled_back']}",
    )
    parts: list[Any] = [head]
    if r.get("reason"):
        parts.append(Text(f"reason: {r['reason']}", style="red"))
    waves = Table("wave", "size", "target", "assigned", "reporting", "failed", "p99", "errors", "")
    for w in r["wave_status"]:
        size = f"{w['percent']:g}%" if w["percent"] is not None else str(w["count"])
        waves.add_row(
            str(w["index"] + 1),
            size,
            str(w["target"]),
            str(w["assigned"]),
            str(w["reporting"]),
            str(w["failed_updates"]),
            _pct(w["p99_regression"]),
            "-" if w["error_rate"] is None else f"{w['error_rate']:.2%}",
            w["state"],
        )
    parts.append(waves)
    shadow = r.get("shadow")
    if shadow:
        parts.extend(_shadow_view(shadow, max_devices))
    devices = Table("device", "wave", "online", "version", "update", "p99 ms", "base ms", "infer")
    for d in r["devices"][:max_devices]:
        devices.add_row(
            d["device_id"],
            str(d["wave"] + 1),
            "yes" if d["online"] else "no",
            f"{d['version'] or '-'}" + (" (rolled back)" if d["rolled_back"] else ""),
            "silent" if d.get("silent") else d["update"],
            "-" if d["p99_ms"] is None else f"{d['p99_ms']:.1f}",
            "-" if d["baseline_p99_ms"] is None else f"{d['baseline_p99_ms']:.1f}",
            str(d["inferences"]),
        )
    if r["devices"]:
        parts.append(devices)
    if len(r["devices"]) > max_devices:
        parts.append(Text(f"... and {len(r['devices']) - max_devices} more devices"))
    log = Table("at", "decision", "wave", "devices", "detail", "by")
    for e in r["decisions"][-10:]:
        log.add_row(
            e["at"][11:19],
            e["kind"],
            "-" if e["wave"] is None else str(e["wave"] + 1),
            str(e["devices"]),
            e["detail"],
            e["actor"],
        )
    parts.append(log)
    return Group(*parts)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _shadow_view(shadow: dict[str, Any], max_devices: int) -> list[Any]:
    """The shadow stage: its state and figures for the stage, then per device."""
    stage, h = shadow["stage"], shadow.get("health") or {}
    size = f"{stage['percent']:g}%" if stage.get("percent") else str(stage.get("count") or "wave 1")
    head = Text.assemble(
        ("shadow ", "bold"),
        (shadow["state"], "bold green" if shadow["state"] == "passed" else "bold yellow"),
        f"  on {size}  {h.get('reporting', 0)}/{h.get('assigned', 0)} reporting  "
        f"{h.get('samples', 0)} samples  {h.get('metric') or 'metric'} "
        f"-{_num(h.get('delta'), '.2f')} points (max {stage['max_delta']:g})  "
        f"p99 x{_num(h.get('latency_ratio'), '.2f')}"
        + (f" (max {stage['max_latency_ratio']:g})" if stage.get("max_latency_ratio") else "")
        + (f"  refused {h['refused']}" if h.get("refused") else ""),
    )
    table = Table("device", "shadow", "samples", "metric", "value", "lost", "p99 ms", "serving ms")
    for d in shadow["devices"][:max_devices]:
        table.add_row(
            d["device_id"],
            d["phase"] or "-",
            str(d["samples"]),
            d["metric"] or "-",
            _num(d["value"], ".2f"),
            _num(d["delta"], ".2f"),
            _num(d["p99_ms"], ".1f"),
            _num(d["serving_p99_ms"], ".1f"),
        )
    return [head, table] if shadow["devices"] else [head]


@rollout_app.command("create")
def create(  # noqa: PLR0917 - typer maps each CLI option to a parameter
    model: str,
    version: str,
    to: Annotated[str, typer.Option("--to", help="label selector key=value[,key=value]")] = "",
    waves: Annotated[str, typer.Option(help="cumulative sizes: 1%,10%,100% or counts")] = (
        "1%,10%,50%,100%"
    ),
    soak: Annotated[str, typer.Option(help="soak per wave: 600, 10m, 1h")] = "10m",
    rollout_id: Annotated[str | None, typer.Option("--id", help="default: generated")] = None,
    max_failed_share: Annotated[float, typer.Option(help="failed installs / assigned")] = 0.05,
    max_p99_regression: Annotated[float, typer.Option(help="0.2 = +20% p99")] = 0.20,
    max_error_rate: Annotated[float, typer.Option(help="failed / inferences")] = 0.01,
    min_reporting: Annotated[int, typer.Option(help="devices reporting before judging")] = 3,
    min_p99_increase_ms: Annotated[
        float, typer.Option(help="p99 must also rise by this many ms to abort")
    ] = 1.0,
    report_timeout: Annotated[
        str, typer.Option(help="after a wave's soak, silent devices are judged: 15m, 600")
    ] = "15m",
    silent: Annotated[
        str, typer.Option(help="a silent device counts as: failed or skipped")
    ] = "failed",
    shadow: Annotated[
        str | None,
        typer.Option(
            help="a shadow stage first on N% or N devices ('wave' = the first wave's size): "
            "the version runs beside the serving one, never answering"
        ),
    ] = None,
    shadow_soak: Annotated[str, typer.Option(help="how long the shadow stage runs")] = "10m",
    shadow_sample: Annotated[float, typer.Option(help="share of inferences shadowed")] = 0.1,
    shadow_max_busy: Annotated[float, typer.Option(help="share of time busy shadowing")] = 0.25,
    shadow_min_samples: Annotated[int, typer.Option(help="compared inferences per device")] = 100,
    shadow_max_delta: Annotated[
        float, typer.Option(help="task-metric points the shadow may lose vs serving")
    ] = 1.0,
    shadow_max_latency: Annotated[
        float, typer.Option(help="shadow p99 / serving p99 at most; 0 = not judged")
    ] = 1.5,
) -> None:
    """Start a staged rollout of MODEL VERSION to the devices matching --to."""
    wave_list = parse_waves(waves, parse_duration(soak))
    body: dict[str, Any] = {
        "id": rollout_id,
        "model": model,
        "version": version,
        "selector": _selector(to),
        "waves": wave_list,
        "rules": {
            "max_failed_update_share": max_failed_share,
            "max_p99_regression": max_p99_regression,
            "max_error_rate": max_error_rate,
            "min_devices_reporting": min_reporting,
            "min_p99_increase_ms": min_p99_increase_ms,
            "report_timeout_s": parse_duration(report_timeout),
            "silent_devices": silent,
        },
    }
    if shadow is not None:
        body["shadow"] = {
            **_shadow_size(shadow),
            "soak_s": parse_duration(shadow_soak),
            "sample_share": shadow_sample,
            "max_busy_share": shadow_max_busy,
            "min_samples": shadow_min_samples,
            "max_delta": shadow_max_delta,
            "max_latency_ratio": shadow_max_latency or None,
        }
    with _client() as client:
        r = client._call("POST", "/v1/rollouts", json=body)
    _console().print(
        f"rollout {r['id']} created: {model} {version}, {len(wave_list)} waves"
        + (", shadow stage first" if shadow is not None else "")
    )


def _shadow_size(text: str) -> dict[str, Any]:
    text = text.strip()
    try:
        if text == "wave":
            return {}
        if text.endswith("%"):
            return {"percent": float(text[:-1])}
        return {"count": int(text)}
    except ValueError as exc:
        raise ConfigError(f"--shadow: {text!r} is neither N%, a device count nor 'wave'") from exc


@rollout_app.command("ls")
def ls(as_json: JsonOption = False) -> None:
    """List rollouts, newest first."""
    with _client() as client:
        rows = client._call("GET", "/v1/rollouts")
    if as_json:
        _print_json(rows)
        return
    table = Table("id", "model", "version", "status", "wave", "assigned", "reason")
    for r in rows:
        table.add_row(
            r["id"],
            r["model"],
            r["version"],
            r["status"],
            f"{r['wave'] + 1}/{r['waves']}",
            str(r["assigned"]),
            r["reason"] or "",
        )
    _console().print(table)


@rollout_app.command("status")
def status(
    rollout_id: str,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="refresh until it ends")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes")] = 2.0,
    as_json: JsonOption = False,
) -> None:
    """Show a rollout per wave and per device, with the decisions and their reasons."""
    console = _console()
    with _client() as client:
        r = client._call("GET", f"/v1/rollouts/{rollout_id}")
        if as_json:
            _print_json(r)
            return
        if not watch:
            console.print(status_view(r))
            return
        with Live(status_view(r), console=console, refresh_per_second=4) as live:
            while r["status"] not in _TERMINAL:
                time.sleep(interval)
                r = client._call("GET", f"/v1/rollouts/{rollout_id}")
                live.update(status_view(r))


def _transition(rollout_id: str, action: str, reason: str | None = None) -> None:
    body = {"reason": reason} if reason else None
    with _client() as client:
        r = client._call("POST", f"/v1/rollouts/{rollout_id}/{action}", json=body)
    tail = f": {r['reason']}" if r.get("reason") else ""
    _console().print(f"rollout {r['id']} {r['status']}{tail}")


@rollout_app.command("pause")
def pause(rollout_id: str) -> None:
    """Stop promoting; the soak clock stops too."""
    _transition(rollout_id, "pause")


@rollout_app.command("resume")
def resume(rollout_id: str) -> None:
    """Continue a paused rollout."""
    _transition(rollout_id, "resume")


@rollout_app.command("abort")
def abort(
    rollout_id: str, reason: Annotated[str | None, typer.Option(help="recorded")] = None
) -> None:
    """Stop the rollout and roll back every device it touched."""
    _transition(rollout_id, "abort", reason)


@rollout_app.command("rollback")
def rollback(
    rollout_id: str, reason: Annotated[str | None, typer.Option(help="recorded")] = None
) -> None:
    """Roll back every device the rollout touched, also after it completed."""
    _transition(rollout_id, "rollback", reason)


def _console() -> Console:
    return Console(highlight=False)

"""``edgectl``: the operator's command line (typer + rich) over the control plane's HTTP API.

    edgectl serve                                   run the service (settings from EDGEFLEET_CP__*)
    edgectl login --url URL --token TOKEN           remember where and who (a 0600 file)
    edgectl models create NAME [--budget 1.0]
    edgectl models push FILE --name N --version V [--calibration F] [--validation F] [--golden F]
    edgectl models ls | show NAME [VERSION]
    edgectl devices ls | show ID | label ID key=value ... key-
    edgectl deploy MODEL VERSION --to SELECTOR      device=<id> or key=value[,key=value]
    edgectl tokens create NAME --role viewer|operator|admin
    edgectl tuf root > root.json                    the fleet's TUF root, to provision devices
    edgectl rollout create|ls|status|pause|resume|abort|rollback   (see cli/rollout.py)

``main`` catches ``ControlPlaneError``, prints ``Name: message`` and exits 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from control_plane.cli._client import ControlPlaneClient
from control_plane.cli.images import images_app
from control_plane.cli.rollout import rollout_app
from control_plane.errors import ClientError, ConfigError, ControlPlaneError

__all__ = ["app", "main"]

CONFIG_ENV = "EDGECTL_CONFIG"
URL_ENV, TOKEN_ENV = "EDGEFLEET_URL", "EDGEFLEET_TOKEN"
JOB_POLL_INTERVAL_S = 0.5

app = typer.Typer(
    help="Operate an edgefleet control plane.", no_args_is_help=True, pretty_exceptions_enable=False
)
models_app = typer.Typer(help="Model registry.", no_args_is_help=True)
devices_app = typer.Typer(help="Device registry.", no_args_is_help=True)
tokens_app = typer.Typer(help="Operator API tokens (admin).", no_args_is_help=True)
tuf_app = typer.Typer(help="Signed metadata (TUF).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
app.add_typer(tokens_app, name="tokens")
app.add_typer(tuf_app, name="tuf")
app.add_typer(rollout_app, name="rollout")
app.add_typer(images_app, name="images")


def _console() -> Console:
    return Console(highlight=False)


def _config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "edgefleet" / "edgectl.json"


def _load_config() -> dict[str, str]:
    path = _config_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return {k: str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _client() -> ControlPlaneClient:
    config = _load_config()
    url = os.environ.get(URL_ENV) or config.get("url")
    token = os.environ.get(TOKEN_ENV) or config.get("token")
    if not url:
        raise ConfigError(f"no control plane URL: run `edgectl login` or set {URL_ENV}")
    return ControlPlaneClient(url, token)


# -- serve / login ---------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (default: settings)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default: settings)")] = None,
) -> None:
    """Run the control-plane service (settings from EDGEFLEET_CP__* variables)."""
    import uvicorn
    from pydantic import ValidationError

    from agent.logs import configure_logging
    from control_plane.app import create_app
    from control_plane.settings import Settings

    try:
        settings = Settings()  # type: ignore[call-arg]  # required fields come from the env
    except ValidationError as exc:
        problems = "; ".join(
            f"EDGEFLEET_CP__{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        raise ConfigError(problems) from exc
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.port,
        log_config=None,
        access_log=False,
    )


@app.command()
def login(
    url: Annotated[str, typer.Option(help="control plane URL, e.g. http://127.0.0.1:8080")],
    token: Annotated[str, typer.Option(help="operator API token", prompt=True, hide_input=True)],
) -> None:
    """Check URL and token, then remember them (file mode 0600)."""
    with ControlPlaneClient(url, token) as client:
        client.whoami_check()
    path = _config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "token": token}, f)
    _console().print(f"logged in to {url}; saved to {path}")


# -- models ----------------------------------------------------------------------------------


@models_app.command("create")
def models_create(
    name: str,
    budget: Annotated[float, typer.Option(help="allowed top-1 drop, points")] = 1.0,
    description: str = "",
) -> None:
    """Create a model."""
    with _client() as client:
        model = client.create_model(name, accuracy_budget=budget, description=description)
    _console().print(f"created model {model['name']} (budget {model['accuracy_budget']})")


def _wait_for_job(client: ControlPlaneClient, job: dict[str, Any], console: Console) -> Any:
    with Progress(
        TextColumn("[bold]build"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(job["message"], total=1.0)
        while True:
            job = client.get_job(job["id"])
            progress.update(task, completed=job["progress"], description=job["message"][:60])
            if job["status"] in ("succeeded", "failed"):
                return job
            time.sleep(JOB_POLL_INTERVAL_S)


@models_app.command("push")
def models_push(  # noqa: PLR0917 - typer maps each CLI option to a parameter
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="ONNX model")],
    name: Annotated[str, typer.Option(help="model name")],
    version: Annotated[str, typer.Option(help="semantic version")],
    calibration: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    validation: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    golden: Annotated[Path | None, typer.Option(exists=True, dir_okay=False)] = None,
    wait: Annotated[bool, typer.Option(help="follow the build to its end")] = True,
) -> None:
    """Upload a version and follow its variant build."""
    files = {"onnx": file}
    for field, path in (
        ("calibration", calibration),
        ("validation", validation),
        ("golden", golden),
    ):
        if path is not None:
            files[field] = path
    total = sum(p.stat().st_size for p in files.values())
    console = _console()
    with _client() as client:
        with Progress(
            TextColumn("[bold]upload"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("upload", total=total)
            result = client.upload_version(
                name, version, files, on_bytes=lambda n: progress.advance(task, n)
            )
        console.print(f"uploaded {name} {version}; build job {result['job']['id']}")
        if not wait:
            return
        job = _wait_for_job(client, result["job"], console)
        if job["status"] == "failed":
            raise ClientError(f"build failed: {job['error']}", error="BuildError")
        _print_version(client.get_version(name, version), console)


models_app.command("upload", hidden=True)(models_push)


@models_app.command("ls")
def models_ls() -> None:
    """List models."""
    with _client() as client:
        models = client.list_models()
    table = Table("name", "budget", "versions", "latest", "created")
    for m in models:
        latest = m["versions"][-1] if m["versions"] else None
        table.add_row(
            m["name"],
            f"{m['accuracy_budget']:g}",
            str(len(m["versions"])),
            f"{latest['version']} ({latest['status']})" if latest else "-",
            m["created_at"][:19],
        )
    _console().print(table)


models_app.command("list", hidden=True)(models_ls)


def _print_version(v: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{v['model']} {v['version']}[/bold]  status {v['status']}")
    if v.get("error"):
        console.print(f"error: {v['error']}")
    table = Table("variant", "runtime", "precision", "status", "accuracy", "size", "target")
    for var in v["variants"]:
        acc = var.get("accuracy")
        acc_text = (
            f"{acc['metric']} {acc['value']:.4g} (delta {acc['delta']:+.3g}, "
            f"budget {acc['budget']:g})"
            if acc
            else "-"
        )
        target = var["target"]
        target_text = ",".join(
            [target["accelerator"], *target.get("arch", ()), *target.get("cpu_flags", ())]
        )
        table.add_row(
            var["id"],
            var["runtime"],
            var["precision"],
            var["status"],
            acc_text,
            str(var["size"] or "-"),
            target_text,
        )
    console.print(table)


@models_app.command("show")
def models_show(name: str, version: Annotated[str | None, typer.Argument()] = None) -> None:
    """A model's versions, or one version's variants."""
    console = _console()
    with _client() as client:
        if version:
            _print_version(client.get_version(name, version), console)
            return
        model = client.get_model(name)
    console.print(f"[bold]{model['name']}[/bold]  budget {model['accuracy_budget']:g}")
    table = Table("version", "status", "created")
    for v in model["versions"]:
        table.add_row(v["version"], v["status"], v["created_at"][:19])
    console.print(table)


# -- devices ---------------------------------------------------------------------------------


@devices_app.command("ls")
def devices_ls() -> None:
    """List devices."""
    with _client() as client:
        devices = client.list_devices()
    table = Table("id", "name", "labels", "arch", "runs", "last seen")
    for d in devices:
        labels = ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        runs = ""
        if d.get("reported"):
            runs = " ".join(
                f"{m['name']}@{m.get('active_version') or '-'}" for m in d["reported"]["models"]
            )
        table.add_row(
            d["id"],
            d["name"],
            labels or "-",
            (d.get("profile") or {}).get("arch", "-"),
            runs or "-",
            (d.get("last_seen_at") or "-")[:19],
        )
    _console().print(table)


devices_app.command("list", hidden=True)(devices_ls)


@devices_app.command("show")
def devices_show(device_id: str) -> None:
    """A device: labels, profile summary, desired and reported state."""
    with _client() as client:
        d = client.get_device(device_id)
    console = _console()
    console.print(f"[bold]{d['id']}[/bold] {d['name']}  labels {d['labels']}")
    desired = d.get("desired") or {"models": [], "generation": 0}
    table = Table("model", "desired version", "variant", "reported", "phase")
    reported = {m["name"]: m for m in (d.get("reported") or {}).get("models", [])}
    for m in desired["models"]:
        r = reported.get(m["name"], {})
        table.add_row(
            m["name"],
            m["version"],
            m["variant_id"],
            r.get("active_version") or "-",
            r.get("phase") or "-",
        )
    console.print(table)


def _parse_labels(items: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    set_: dict[str, str] = {}
    remove: list[str] = []
    for item in items:
        if item.endswith("-") and "=" not in item:
            remove.append(item[:-1])
        elif "=" in item:
            key, value = item.split("=", 1)
            set_[key] = value
        else:
            raise ConfigError(f"label {item!r}: write key=value to set or key- to remove")
    return set_, remove


@devices_app.command("label")
def devices_label(
    device_id: str,
    labels: Annotated[list[str], typer.Argument(help="key=value to set, key- to remove")],
) -> None:
    """Set or remove a device's labels (site, board, group, ...)."""
    set_, remove = _parse_labels(labels)
    with _client() as client:
        d = client.label_device(device_id, set_=set_, remove=remove)
    _console().print(f"{d['id']} labels: {d['labels']}")


# -- deploy / tokens -------------------------------------------------------------------------


def _parse_selector(text: str) -> tuple[str | None, dict[str, str] | None]:
    if text.startswith("device="):
        return text.removeprefix("device="), None
    selector: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"selector {text!r}: write device=<id> or key=value[,key=value]")
        key, value = part.split("=", 1)
        selector[key.strip()] = value.strip()
    return None, selector


@app.command()
def deploy(
    model: str,
    version: str,
    to: Annotated[str, typer.Option("--to", help="device=<id> or key=value[,key=value]")],
) -> None:
    """Assign a model version to a device or to every device whose labels match."""
    device_id, selector = _parse_selector(to)
    with _client() as client:
        a = client.assign(model, version, device_id=device_id, selector=selector)
    _console().print(
        f"assigned {a['model']} {a['version']} to {a['device_id'] or a['selector']} "
        f"({a['devices_matched']} devices)"
    )


app.command("assign", hidden=True)(deploy)


@tokens_app.command("create")
def tokens_create(
    name: str,
    role: Annotated[str, typer.Option(help="viewer, operator or admin")] = "viewer",
) -> None:
    """Create an operator API token; it is printed once."""
    with _client() as client:
        t = client.create_token(name, role)
    _console().print(f"token {t['name']} ({t['role']}): {t['token']}")


@tuf_app.command("root")
def tuf_root() -> None:
    """Print the fleet's root.json (provision devices with it: control_plane.tuf_root_path)."""
    with _client() as client:
        data = client.tuf_root()
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (``Name: message`` and 1 on a known error)."""
    try:
        result = app(
            args=list(argv) if argv is not None else None,
            prog_name="edgectl",
            standalone_mode=False,
        )
    except ControlPlaneError as exc:
        name = exc.error if isinstance(exc, ClientError) else type(exc).__name__
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        return 1
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

"""``edgectl``: the operator's command line (typer + rich) over the control plane's HTTP API.

    edgectl serve                                   run the service (settings from EDGEFLEET_CP__*;
                                                    none set on a loopback bind: a local control
                                                    plane with generated tokens)
    edgectl login --url URL [--token TOKEN]         remember where and who (a 0600 file); without
                                                    --token: from stdin, or a hidden prompt
    edgectl models create NAME [--budget 1.0]
    edgectl models push FILE --name N --version V [--task T] [--calibration F] [--validation F]
                        [--golden F]
    edgectl models ls | show NAME [VERSION] [--json] | rm NAME VERSION   (rm: failed builds)
    edgectl models pull NAME VERSION [--variant ID] [--out DIR]   archives for offline installs
    edgectl jobs ls [--model M] [--status S] [--json] | show ID [--json]
    edgectl devices ls | show ID [--json] | label ID key=value ... key- | rm ID
    edgectl devices retry ID [MODEL]                offer again a version the device rejected
    edgectl devices approve ID [KEY ...]            requested labels select from now on
    edgectl devices rotate-credential ID [--grace 7d] | revoke-credential ID
    edgectl deploy MODEL VERSION --to SELECTOR      device=<id> or key=value[,key=value]
    edgectl tokens create NAME --role viewer|operator|admin [--expires 90d] | ls | revoke ID
    edgectl bootstrap-tokens create NAME [--label k=v] [--uses N] [--expires 24h] | ls | revoke ID
    edgectl tuf root > root.json                    the fleet's TUF root, to provision devices
    edgectl rollout create|ls|status|pause|resume|abort|rollback   (see cli/rollout.py)

One error path (``main``): every failure prints ``Name: message`` on stderr and exits non-zero
(1; usage mistakes 2; Ctrl-C 130); ``edgectl --debug ...`` adds the traceback. Read commands
take ``--json`` (the API's JSON); tables show sizes in decimal units and times with their age.
Shell completion: ``edgectl --install-completion`` (bash, zsh, fish, PowerShell).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
import time
import traceback
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

from agent._fs import file_sha256
from agent.contracts.manifest import Preprocessing
from control_plane.cli._client import ControlPlaneClient
from control_plane.cli._format import human_size, human_time, reduced_compute_text
from control_plane.cli.identity import bootstrap_tokens_app, parse_duration_s, tokens_app
from control_plane.cli.images import images_app
from control_plane.cli.rollout import rollout_app
from control_plane.errors import ClientError, ConfigError, ControlPlaneError

__all__ = ["app", "main"]

CONFIG_ENV = "EDGECTL_CONFIG"
URL_ENV, TOKEN_ENV = "EDGEFLEET_URL", "EDGEFLEET_TOKEN"
JOB_POLL_INTERVAL_S = 0.5
LOCAL_TOKENS_DIR = "local-tokens"  # under the data directory: admin, bootstrap (0600 each)
_debug = False

app = typer.Typer(
    help="Operate an edgefleet control plane.", no_args_is_help=True, pretty_exceptions_enable=False
)
models_app = typer.Typer(help="Model registry.", no_args_is_help=True)
devices_app = typer.Typer(help="Device registry.", no_args_is_help=True)
tuf_app = typer.Typer(help="Signed metadata (TUF).", no_args_is_help=True)
jobs_app = typer.Typer(help="Variant build jobs and their logs.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")
app.add_typer(devices_app, name="devices")
app.add_typer(tokens_app, name="tokens")
app.add_typer(bootstrap_tokens_app, name="bootstrap-tokens")
app.add_typer(tuf_app, name="tuf")
app.add_typer(rollout_app, name="rollout")
app.add_typer(images_app, name="images")


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="print the traceback of a failure too")
    ] = False,
) -> None:
    """Operate an edgefleet control plane."""
    global _debug  # noqa: PLW0603 - one flag for main()'s error path
    _debug = debug


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

    from agent.logs import configure_logging, get_logger
    from control_plane.api.limits import server_options
    from control_plane.app import create_app
    from control_plane.settings import Settings

    local_tokens: Path | None = None
    try:
        settings = Settings()  # type: ignore[call-arg]  # required fields come from the env
    except ValidationError as exc:
        local = _local_settings(exc, host)
        if local is None:
            problems = "; ".join(
                f"EDGEFLEET_CP__{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}"
                for e in exc.errors()
            )
            raise ConfigError(problems) from exc
        settings, local_tokens = local
    configure_logging(settings.log_level)
    bind_host, bind_port = host or settings.host, port or settings.port
    url = f"http://{_url_host(bind_host)}:{bind_port}"
    get_logger(__name__).info("control_plane_starting", url=url, page=f"{url}/ui")
    if local_tokens is not None:
        _print_local_welcome(url, local_tokens)
    uvicorn.run(
        create_app(settings),
        host=bind_host,
        port=bind_port,
        log_config=None,
        access_log=False,
        **server_options(settings),  # header bounds in the HTTP parser (docs/security.md)
    )


_TOKEN_ENVS = ("EDGEFLEET_CP__ADMIN_TOKEN", "EDGEFLEET_CP__BOOTSTRAP_TOKEN")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):  # noqa: S104 - only formats a URL
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _local_settings(exc: Exception, host: str | None) -> tuple[Any, Path] | None:
    """With neither token set and a loopback bind: settings with tokens generated (once) into
    ``<data_dir>/local-tokens/{admin,bootstrap}`` (mode 0600), and that directory; else None."""
    from pydantic import ValidationError

    from control_plane.settings import Settings

    if any(os.environ.get(name) for name in _TOKEN_ENVS):
        return None
    assert isinstance(exc, ValidationError)
    missing = {str(e["loc"][0]) for e in exc.errors() if e["type"] == "missing"}
    others = [e for e in exc.errors() if e["type"] != "missing"]
    if others or not missing <= {"admin_token", "bootstrap_token"}:
        return None
    data_dir = Path(os.environ.get("EDGEFLEET_CP__DATA_DIR") or "edgefleet-data")
    bind = host or os.environ.get("EDGEFLEET_CP__HOST") or "127.0.0.1"
    if not _is_loopback(bind):
        raise ConfigError(
            f"binding {bind} needs tokens: set EDGEFLEET_CP__ADMIN_TOKEN and "
            "EDGEFLEET_CP__BOOTSTRAP_TOKEN (or bind 127.0.0.1 for a local control plane "
            "with generated tokens)"
        )
    folder = data_dir / LOCAL_TOKENS_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = {}
    for role, prefix in (("admin", "efa_"), ("bootstrap", "efb_")):
        path = folder / role
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(prefix + secrets.token_urlsafe(32) + "\n")
        tokens[role] = path.read_text().strip()
    settings = Settings(
        admin_token=tokens["admin"],  # type: ignore[arg-type]  # pydantic makes the SecretStr
        bootstrap_token=tokens["bootstrap"],  # type: ignore[arg-type]
    )
    return settings, folder


def _print_local_welcome(url: str, folder: Path) -> None:
    admin = folder / "admin"
    console = Console(highlight=False, stderr=True)
    console.print(
        f"""
[bold]edgefleet control plane[/bold] (local: tokens generated into {folder}/, mode 0600)

    {url}/ui
    log in on the page with the admin token: cat {admin}

next, in another shell:
    edgectl login --url {url} < {admin}
    edgectl models push model.onnx --name my-model --version 1.0.0 --calibration calib.npz
    edgectl tuf root > root.json          # provision devices with it
    bootstrap token for devices: {folder / "bootstrap"}
""",
        markup=True,
        soft_wrap=True,
    )


@app.command()
def login(
    url: Annotated[str, typer.Option(help="control plane URL, e.g. http://127.0.0.1:8080")],
    token: Annotated[
        str | None,
        typer.Option(help="operator API token (default: read from stdin, or a hidden prompt)"),
    ] = None,
) -> None:
    """Check URL and token, then remember them (file mode 0600)."""
    if token is None:
        if sys.stdin is not None and not sys.stdin.isatty():
            token = sys.stdin.readline(4096).strip()
        else:
            token = str(typer.prompt("token", hide_input=True)).strip()
    if not token:
        raise ConfigError("no token: give --token, pipe it on stdin, or type it at the prompt")
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
    task: Annotated[
        str | None,
        typer.Option(
            help="what the accuracy gate measures: classification, detection, segmentation,"
            " embedding or generic (default: the ONNX metadata's task, else inferred)"
        ),
    ] = None,
    preprocess: Annotated[
        str | None,
        typer.Option(
            help="how devices turn camera frames into the first input, written into every"
            " variant's manifest: resize=640x640,layout=nchw,mean=0.485,0.456,0.406,"
            "std=0.229,0.224,0.225,color=rgb,fit=letterbox (fit: stretch, letterbox,"
            " center_crop; scale=1/255 by default)"
        ),
    ] = None,
    wait: Annotated[bool, typer.Option(help="follow the build to its end")] = True,
) -> None:
    """Upload a version and follow its variant build."""
    declared = None
    if preprocess is not None:
        try:
            declared = Preprocessing.parse(preprocess).model_dump_json()
        except ValueError as exc:
            raise ClientError(f"--preprocess: {exc}", error="InvalidInput") from None
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
        _ensure_model(client, name, console)
        with Progress(
            TextColumn("[bold]upload"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("upload", total=total)
            result = client.upload_version(
                name,
                version,
                files,
                task=task,
                preprocessing=declared,
                on_bytes=lambda n: progress.advance(bar, n),
            )
        console.print(f"uploaded {name} {version}; build job {result['job']['id']}")
        if not wait:
            return
        job = _wait_for_job(client, result["job"], console)
        if job["status"] == "failed":
            raise ClientError(f"build failed: {job['error']}", error="BuildError")
        _print_version(client.get_version(name, version), console)


models_app.command("upload", hidden=True)(models_push)


def _ensure_model(client: ControlPlaneClient, name: str, console: Console) -> None:
    """``push`` to a model that does not exist yet creates it (default accuracy budget;
    ``models create NAME --budget B`` first for another)."""
    try:
        client.get_model(name)
    except ClientError as exc:
        if exc.error != "NotFoundError":
            raise
        model = client.create_model(name, accuracy_budget=1.0, description="")
        console.print(
            f"created model {model['name']} (accuracy budget {model['accuracy_budget']:g} "
            "points; `edgectl models create` first for another)"
        )


@models_app.command("pull")
def models_pull(
    name: str,
    version: str,
    variant: Annotated[
        list[str] | None, typer.Option(help="variant id (repeatable); default: every accepted one")
    ] = None,
    out: Annotated[Path, typer.Option(file_okay=False, help="directory to write into")] = Path(),
) -> None:
    """Download a version's variant archives for an offline install
    (``edge-agent models install FILE...`` takes them as one version)."""
    console = _console()
    with _client() as client:
        v = client.get_version(name, version)
        accepted = {x["id"]: x for x in v["variants"] if x.get("artifact_path")}
        wanted = variant or list(accepted)
        missing = [w for w in wanted if w not in accepted]
        if missing:
            raise ClientError(
                f"{name} {version} has no accepted variant {', '.join(missing)}; "
                f"accepted: {', '.join(accepted) or 'none'}",
                error="NotFoundError",
            )
        if not wanted:
            raise ClientError(f"{name} {version} has no accepted variant", error="NotFoundError")
        out.mkdir(parents=True, exist_ok=True)
        total = sum(int(accepted[w]["size"] or 0) for w in wanted)
        with Progress(
            TextColumn("[bold]download"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("download", total=total)
            paths = []
            for w in wanted:
                dest = out / f"{name}-{version}-{w}.tar"
                client.download(
                    accepted[w]["artifact_path"], dest, on_bytes=lambda n: progress.advance(task, n)
                )
                if file_sha256(dest) != accepted[w]["sha256"]:
                    dest.unlink(missing_ok=True)
                    raise ClientError(
                        f"{dest.name}: sha256 differs from the registry's; not kept",
                        error="VerificationError",
                    )
                paths.append(dest)
    for path in paths:
        console.print(f"wrote {path}", highlight=False)


@models_app.command("ls")
def models_ls(as_json: JsonOption = False) -> None:
    """List models."""
    with _client() as client:
        models = client.list_models()
    if as_json:
        _print_json(models)
        return
    table = Table("name", "budget", "versions", "latest", "created")
    for m in models:
        latest = m["versions"][-1] if m["versions"] else None
        table.add_row(
            m["name"],
            f"{m['accuracy_budget']:g}",
            str(len(m["versions"])),
            f"{latest['version']} ({latest['status']})" if latest else "-",
            human_time(m["created_at"]),
        )
    _console().print(table)


models_app.command("list", hidden=True)(models_ls)


def _precision_text(build: dict[str, Any]) -> str:
    counts = build.get("precisions") or {}
    text = ", ".join(f"{p} {n}" for p, n in sorted(counts.items())) or "-"
    kept = build.get("kept_float") or []
    if kept:
        shown = ", ".join(kept[:3]) + (f" (+{len(kept) - 3})" if len(kept) > 3 else "")
        text += f"; float: {shown}"
    return text


def _print_version(v: dict[str, Any], console: Console) -> None:
    task = f"  task {v['task']}" if v.get("task") else ""
    console.print(f"[bold]{v['model']} {v['version']}[/bold]  status {v['status']}{task}")
    pre = v.get("preprocessing")
    if pre:
        resize = "x".join(str(d) for d in pre["resize"]) if pre.get("resize") else "none"
        console.print(
            f"preprocessing: resize {resize} ({pre.get('fit', 'stretch')}), {pre['layout']},"
            f" {pre.get('color', 'rgb')},"
            f" scale {pre['scale']:.6g}, mean {list(pre['mean'])}, std {list(pre['std'])}",
            markup=False,
        )
    if v.get("error"):
        console.print(f"error: {v['error']}")
    table = Table(
        "variant",
        "runtime",
        "precision",
        "status",
        "decided by (vs FP32)",
        "build-host ms",
        "weights",
        "compute ops",
        "size",
        "target",
    )
    # "kept back": operations left in float by an INT8 search, MatMuls in 8 bits by an INT4 one
    steps = Table(
        "variant", "step", "metric", "delta", "kept back", "s", title="Quantization search"
    )
    for var in v["variants"]:
        acc = var.get("accuracy")
        acc_text = (
            f"{acc['metric']} {acc['value']:.4g} (delta {acc['delta']:+.3g}, "
            f"budget {acc['budget']:g}){reduced_compute_text(acc)}"
            if acc
            else "-"
        )
        build = var.get("build") or {}
        latency = build.get("latency_ms")
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
            f"{latency:.1f}" if latency is not None else "-",
            human_size(build.get("weight_bytes")),
            _precision_text(build),
            human_size(var["size"]),
            target_text,
        )
        for step in build.get("steps") or []:
            steps.add_row(
                var["id"],
                step["action"],
                f"{step['metric']} {step['value']:.4g}",
                f"{step['delta']:+.3g}",
                str(step["kept_float"]),
                f"{step['seconds']:.1f}",
            )
    console.print(table)
    if steps.rows:
        console.print(steps)
    _print_skipped(v.get("skipped") or [], console)


def _print_skipped(skipped: list[dict[str, Any]], console: Console) -> None:
    if not skipped:
        return
    table = Table("skipped variant", "reason", title="left out by the build")
    for s in skipped:
        table.add_row(s["id"], s["reason"])
    console.print(table)


@models_app.command("show")
def models_show(
    name: str, version: Annotated[str | None, typer.Argument()] = None, as_json: JsonOption = False
) -> None:
    """A model's versions and the deltas between them, or one version's variants."""
    console = _console()
    with _client() as client:
        if version:
            v = client.get_version(name, version)
            if as_json:
                _print_json(v)
            else:
                _print_version(v, console)
            return
        model = client.get_model(name)
        deltas = client.list_deltas(name)
    if as_json:
        _print_json({**model, "deltas": deltas})
        return
    console.print(f"[bold]{model['name']}[/bold]  budget {model['accuracy_budget']:g}")
    table = Table("version", "status", "created")
    for v in model["versions"]:
        table.add_row(v["version"], v["status"], human_time(v["created_at"]))
    console.print(table)
    if deltas:
        table = Table("delta", "from", "to", "variant", "size", "of full", title="deltas")
        for d in deltas:
            whole = d.get("full_size")
            table.add_row(
                d["path"],
                f"{d['from_version']} ({d['from_variant']})",
                d["to_version"],
                d["to_variant"],
                f"{d['size']:,} B",
                f"{d['size'] / whole:.1%} of {whole:,} B" if whole else "-",
            )
        console.print(table)


@models_app.command("rm")
def models_rm(name: str, version: str) -> None:
    """Delete a version whose build failed (its number can then be uploaded again)."""
    with _client() as client:
        client.delete_version(name, version)
    _console().print(f"deleted {name} {version}")


# -- jobs ------------------------------------------------------------------------------------


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON")]


@jobs_app.command("ls")
def jobs_ls(
    model: Annotated[str | None, typer.Option(help="only this model's builds")] = None,
    status: Annotated[str | None, typer.Option(help="queued, running, succeeded or failed")] = None,
    limit: Annotated[int, typer.Option(help="newest N jobs")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List build jobs, newest first."""
    with _client() as client:
        jobs = client.list_jobs(model=model, status=status, limit=limit)
    if as_json:
        _print_json(jobs)
        return
    table = Table("id", "model", "version", "status", "progress", "message", "skipped", "created")
    for j in jobs:
        table.add_row(
            str(j["id"]),
            j["model"],
            j["version"],
            j["status"],
            f"{j['progress']:.0%}",
            (j["error"] or j["message"])[:80],
            ",".join(s["id"] for s in j["skipped"]) or "-",
            human_time(j["created_at"]),
        )
    _console().print(table)


@jobs_app.command("show")
def jobs_show(job_id: int, as_json: JsonOption = False) -> None:
    """A build job with its log lines and the variants it skipped (and why)."""
    with _client() as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
        return
    console = _console()
    console.print(
        f"[bold]job {job['id']}[/bold]  {job['model']} {job['version']}  {job['status']} "
        f"{job['progress']:.0%}  created {job['created_at'][:19]}"
        + (f"  finished {job['finished_at'][:19]}" if job["finished_at"] else "")
    )
    if job["error"]:
        console.print(f"error: {job['error']}", markup=False)
    _print_skipped(job["skipped"], console)
    for line in job["log"]:
        console.print(line, markup=False)


# -- devices ---------------------------------------------------------------------------------


@devices_app.command("ls")
def devices_ls(as_json: JsonOption = False) -> None:
    """List devices."""
    with _client() as client:
        devices = client.list_devices()
    if as_json:
        _print_json(devices)
        return
    table = Table("id", "name", "labels", "requested", "arch", "runs", "last seen")
    for d in devices:
        labels = ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items()))
        requested = ",".join(
            f"{k}={v}" for k, v in sorted((d.get("requested_labels") or {}).items())
        )
        runs = ""
        if d.get("reported"):
            runs = " ".join(
                f"{m['name']}@{m.get('active_version') or '-'}" for m in d["reported"]["models"]
            )
        table.add_row(
            d["id"],
            d["name"],
            labels or "-",
            requested or "-",
            (d.get("profile") or {}).get("arch", "-"),
            runs or "-",
            human_time(d.get("last_seen_at"), never="never"),
        )
    _console().print(table)


devices_app.command("list", hidden=True)(devices_ls)


@devices_app.command("show")
def devices_show(device_id: str, as_json: JsonOption = False) -> None:
    """A device: labels, desired and reported state, and which variant serves each model and why
    (the variants offered are those that fit its profile, best first)."""
    with _client() as client:
        d = client.get_device(device_id)
    if as_json:
        _print_json(d)
        return
    console = _console()
    console.print(f"[bold]{d['id']}[/bold] {d['name']}  labels {d['labels']}")
    desired = d.get("desired") or {"models": [], "generation": 0}
    table = Table(
        "model",
        "desired",
        "offered variants",
        "generation",
        "reported",
        "serving variant",
        "runs on",
        "phase",
    )
    reported = {m["name"]: m for m in (d.get("reported") or {}).get("models", [])}
    for m in desired["models"]:
        r = reported.get(m["name"], {})
        offered = [c["variant_id"] for c in m.get("candidates") or []] or [m["variant_id"]]
        runs_on = " / ".join(x for x in (r.get("backend"), r.get("device")) if x) or "-"
        table.add_row(
            m["name"],
            m["version"],
            ", ".join(offered),
            str(m.get("generation", 0)),
            r.get("active_version") or "-",
            r.get("variant_id") or "-",
            runs_on,
            r.get("phase") or "-",
        )
    console.print(table)
    for name, r in reported.items():
        if r.get("choice"):
            console.print(f"{name}: {r['choice']}", highlight=False)
        if r.get("last_error"):
            console.print(f"{name}: last error: {r['last_error']}", highlight=False)


@devices_app.command("rm")
def devices_rm(device_id: str) -> None:
    """Delete a device: its credential is refused at once (enroll again to come back)."""
    with _client() as client:
        client.delete_device(device_id)
    _console().print(f"deleted device {device_id}")


@devices_app.command("retry")
def devices_retry(
    device_id: str, model: Annotated[str | None, typer.Argument(help="default: every model")] = None
) -> None:
    """Offer again the version a device rejected (one model, or all it is assigned)."""
    with _client() as client:
        r = client.retry_device(device_id, model)
    entries = {m["name"]: m for m in r["desired"]["models"]}
    console = _console()
    for name in r["models"]:
        m = entries.get(name)
        detail = f" {m['version']} (generation {m['generation']})" if m else ""
        console.print(f"{device_id}: {name}{detail} offered again")


@devices_app.command("approve")
def devices_approve(
    device_id: str,
    keys: Annotated[
        list[str] | None, typer.Argument(help="label keys to approve (default: all requested)")
    ] = None,
) -> None:
    """Approve labels the device asked for at enrollment: they select assignments from now on."""
    with _client() as client:
        d = client.approve_labels(device_id, keys or None)
    _console().print(f"{d['id']} labels: {d['labels']} (still requested: {d['requested_labels']})")


@devices_app.command("rotate-credential")
def devices_rotate_credential(
    device_id: str,
    grace: Annotated[
        str, typer.Option(help="how long the device has to fetch the new one, e.g. 7d")
    ] = "7d",
) -> None:
    """Give the device a new credential: it fetches it with its current one at its next poll;
    the current one is refused once the new one is used, or after the grace period."""
    grace_s = parse_duration_s(grace, option="--grace")
    with _client() as client:
        d = client.rotate_credential(device_id, grace_s=grace_s)
    _console().print(
        f"{d['id']}: credential {d['credential']} (the old one is refused after "
        f"{(d['credential_rotate_by'] or '-')[:19].replace('T', ' ')} UTC, or once the new "
        "one is used)"
    )


@devices_app.command("revoke-credential")
def devices_revoke_credential(device_id: str) -> None:
    """Refuse the device's credential from now on (it enrolls again to come back)."""
    with _client() as client:
        d = client.revoke_credential(device_id)
    _console().print(f"{d['id']}: credential {d['credential']}")


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


# -- deploy -------------------------------------------------------------------------------


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
    except KeyboardInterrupt:
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        print("Aborted", file=sys.stderr)
        return 1
    except Exception as exc:
        if isinstance(exc, _usage_errors()):
            exc.show()  # type: ignore[attr-defined]
            return int(exc.exit_code)  # type: ignore[attr-defined]
        return _report(exc)
    return result if isinstance(result, int) else 0


def _report(exc: BaseException) -> int:
    """The one error path: ``Name: message`` on stderr (the traceback too with ``--debug``)."""
    if _debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, ClientError):
        name = exc.error
    elif isinstance(exc, ControlPlaneError):
        name = type(exc).__name__
    else:
        name = type(exc).__name__
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
    print(f"{name}: {message}", file=sys.stderr)
    if not _debug and not isinstance(exc, ControlPlaneError):
        print("(edgectl --debug ... prints the traceback)", file=sys.stderr)
    return 1


def _usage_errors() -> tuple[type[Exception], ...]:
    """Usage mistakes (unknown command or option, missing argument): click's own exception
    class, and the copy of click that newer typer releases vendor (they raise that one)."""
    kinds: list[type[Exception]] = []
    try:
        import click

        kinds.append(click.ClickException)
    except ImportError:
        pass
    try:
        from typer._click.exceptions import ClickException as VendoredClickException
    except ImportError:
        pass
    else:
        kinds.append(VendoredClickException)
    return tuple(kinds)


if __name__ == "__main__":
    sys.exit(main())

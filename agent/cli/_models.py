"""``edge-agent models list|install|activate|rollback``: the model store by hand, offline.

For a technician with a USB stick: install a bundle (directory or .tar/.tar.gz; several variant
archives of one version, as ``edgectl models pull`` writes them, install as one), or an ONNX file
straight in (the bundle, with golden outputs from ONNX Runtime, is built here), see what is
installed and active, point a model at another version (validated against its golden cases
first), or go back to the previous one. Changes take effect when the agent next starts (or
immediately if it is not running); the update journal is written so that the agent's boot does
not undo them. The store is ``agent.models.store``; this module parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from agent.config import AgentSettings
    from agent.models.probation import UpdatePhase
    from agent.models.store import ModelStore

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``models`` and its commands to ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", type=Path, default=None, help="agent state directory (default: config's)"
    )
    common.add_argument("--config", type=Path, default=None, help="agent TOML config file")

    models = sub.add_parser("models", help="the on-device model store (offline)")
    cmds = models.add_subparsers(dest="models_command", required=True)

    ls = cmds.add_parser("list", parents=[common], help="installed models and versions")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_list)

    inst = cmds.add_parser(
        "install",
        parents=[common],
        help="install a bundle (dir or .tar[.gz]), several variant archives of one version, "
        "or an ONNX file (with --name and --version)",
    )
    inst.add_argument("bundle", type=Path, nargs="+", metavar="SOURCE")
    inst.add_argument("--activate", action="store_true", help="validate and activate it too")
    onnx = inst.add_argument_group("an ONNX file straight in")
    onnx.add_argument("--name", help="model name (required for an .onnx file)")
    onnx.add_argument("--version", help="semantic version, e.g. 1.0.0 (required for .onnx)")
    onnx.add_argument(
        "--golden",
        type=Path,
        help=".npz of one golden input case (arrays named like the model's inputs); "
        "default: one synthetic case",
    )
    onnx.add_argument(
        "--preprocess",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="how the loop turns a frame into the first input: resize=HxW, layout=NCHW|NHWC, "
        "grayscale=true, scale=0.00392, mean=0.485,0.456,0.406, std=0.229,0.224,0.225 "
        "(repeatable)",
    )
    inst.set_defaults(func=_install)

    act = cmds.add_parser("activate", parents=[common], help="make VERSION the active one")
    act.add_argument("name")
    act.add_argument("version")
    act.add_argument(
        "--no-validate", action="store_true", help="skip loading it and checking golden outputs"
    )
    act.set_defaults(func=_activate)

    rb = cmds.add_parser("rollback", parents=[common], help="go back to the previous version")
    rb.add_argument("name")
    rb.set_defaults(func=_rollback)


def _store(args: argparse.Namespace) -> tuple[ModelStore, AgentSettings]:
    from agent.config import load_settings
    from agent.models.store import ModelStore

    settings = load_settings(args.config)
    state_dir: Path = args.state_dir or settings.state_dir
    return ModelStore(state_dir, keep_versions=settings.swap.keep_versions), settings


def _journal_manual(
    state_dir: Path, name: str, phase: UpdatePhase, old: str | None, new: str | None
) -> None:
    from agent.models.probation import UpdateJournal, UpdateRecord

    now = time.time()
    UpdateJournal(state_dir).save(
        UpdateRecord(
            model=name,
            phase=phase,
            from_version=old,
            to_version=new,
            reason="changed by hand (edge-agent models)",
            started_at=now,
            updated_at=now,
        )
    )


def _validate(store: ModelStore, settings: AgentSettings, name: str, version: str) -> str:
    """Load ``version`` and check its golden cases, as a swap would (measuring its variants
    when several fit); the variant id."""
    from agent.models.slots import ModelSlot

    slot = ModelSlot(
        name,
        store,
        swap_config=settings.swap,
        backend_config=settings.backends,
        latency_runs=1,
        state_dir=store.root.parent,  # the measured choice is cached for the daemon's boot
    )
    try:
        return slot.start(version).variant_id
    finally:
        slot.close()


def _list(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from agent.models.probation import UpdateJournal
    from agent.models.slots import read_serving_record

    store, _ = _store(args)
    journal = UpdateJournal(store.root.parent)
    rows: list[dict[str, Any]] = []
    for name in store.names():
        pointer = store.pointer(name)
        record = journal.load(name)
        for version in reversed(store.versions(name)):
            status = "installed"
            if pointer is not None and version == pointer.version:
                status = "active"
            elif pointer is not None and version == pointer.previous:
                status = "previous"
            manifest = store.manifest(name, version)
            installed = store.installed_at(name, version)
            update = None
            if record is not None and record.to_version == version:
                update = record.phase + (f": {record.reason}" if record.reason else "")
            serving = read_serving_record(store.root.parent / "choices", name)
            if serving is not None and serving.version != version:
                serving = None
            rows.append(
                {
                    "model": name,
                    "version": version,
                    "status": status,
                    "variants": [v.id for v in manifest.variants],
                    "size_bytes": sum(e.size for e in manifest.all_files()),
                    "installed_at": installed.isoformat() if installed else None,
                    "update": update,
                    "serving": serving.model_dump() if serving is not None else None,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    console = Console()
    if not rows:
        console.print(f"no models installed under {store.root}")
        return 0
    table = Table(title=f"models in {store.root}")
    for column in ("model", "version", "status", "variants", "serving", "size", "installed"):
        table.add_column(column)
    styles = {"active": "bold green", "previous": "yellow", "installed": ""}
    for row in rows:
        table.add_row(
            row["model"],
            row["version"],
            f"[{styles[row['status']]}]{row['status']}[/]"
            if styles[row["status"]]
            else "installed",
            ", ".join(row["variants"]),
            _serving(row["serving"]),
            _size(row["size_bytes"]),
            (row["installed_at"] or "-")[:19].replace("T", " "),
        )
    console.print(table)
    for row in rows:
        if row["update"]:
            console.print(f"{row['model']} {row['version']}: update {row['update']}")
        if row["serving"]:
            console.print(f"{row['model']} {row['version']}: {row['serving']['choice']}")
    return 0


def _install(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from agent.models.bundle import merge_bundles

    store, settings = _store(args)
    sources: list[Path] = args.bundle
    onnx = [s for s in sources if s.suffix.lower() == ".onnx"]
    with tempfile.TemporaryDirectory(prefix="edge-agent-install-") as tmp:
        if onnx:
            if len(sources) != 1:
                raise ConfigError("install one .onnx file at a time, without other sources")
            source = _bundle_from_onnx(args, onnx[0], Path(tmp) / "bundle")
        elif len(sources) > 1:
            source = Path(tmp) / "bundle"
            merge_bundles(sources, source)
        else:
            if args.name or args.version or args.golden or args.preprocess:
                raise ConfigError("--name, --version, --golden and --preprocess are for .onnx")
            source = sources[0]
        installed = store.install(source)
        shutil.rmtree(tmp, ignore_errors=True)
    what = "already installed" if installed.already_present else "installed"
    print(f"{what}: {installed.name} {installed.version} ({_size(installed.size_bytes)})")
    if args.activate:
        return _activate_version(store, settings, installed.name, installed.version, True)
    return 0


def _bundle_from_onnx(args: argparse.Namespace, model: Path, out_dir: Path) -> Path:
    """A one-variant bundle (ONNX Runtime FP32) of ``model``, golden outputs computed here."""
    import re

    from agent.contracts.manifest import NAME_RE, semver_key
    from agent.models.bundle import VariantSpec, build_bundle

    if not args.name or not args.version:
        raise ConfigError(f"{model}: an .onnx file needs --name and --version")
    if not re.match(NAME_RE, args.name):
        raise ConfigError(f"--name {args.name!r}: letters, digits, '.', '_', '-' (1-64)")
    try:
        semver_key(args.version)
    except ValueError:
        raise ConfigError(f"--version {args.version!r} is not a semantic version") from None
    if not model.is_file():
        raise ConfigError(f"no such file: {model}")
    golden: list[dict[str, Any]] | None = None
    if args.golden is not None:
        golden = _golden_cases(args.golden)
    build_bundle(
        out_dir,
        args.name,
        args.version,
        [VariantSpec(model)],
        golden_inputs=golden,
        preprocessing=_preprocessing(args.preprocess) if args.preprocess else None,
    )
    return out_dir


def _golden_cases(path: Path) -> list[dict[str, Any]]:
    """The golden input case in an ``.npz`` (checked against the model by the reference run)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read golden inputs {path}: {exc}") from exc
    if not arrays:
        raise ConfigError(f"{path} holds no arrays")
    return [arrays]


def _preprocessing(items: list[str]) -> Any:
    from pydantic import ValidationError

    from agent.contracts.manifest import Preprocessing

    fields: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ConfigError(f"--preprocess takes KEY=VALUE, got {item!r}")
        if key == "resize":
            h, _, w = value.lower().partition("x")
            fields[key] = (h, w)
        elif key in ("mean", "std"):
            fields[key] = tuple(value.split(","))
        else:
            fields[key] = value
    try:
        return Preprocessing.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"--preprocess {where}: {first['msg']}") from None


def _activate(args: argparse.Namespace) -> int:
    store, settings = _store(args)
    return _activate_version(store, settings, args.name, args.version, not args.no_validate)


def _activate_version(
    store: ModelStore, settings: AgentSettings, name: str, version: str, validate: bool
) -> int:
    if not store.has(name, version):
        raise StoreError(f"{name} {version} is not installed (see: edge-agent models list)")
    store.verify(name, version, deep=True)
    if validate:
        variant = _validate(store, settings, name, version)
        print(f"validated: {name} {version} ({variant}) matches its golden outputs")
    old = store.active(name)
    store.activate(name, version)
    _journal_manual(store.root.parent, name, "committed", old, version)
    print(f"active: {name} {version} (previous: {old or '-'})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    store, _ = _store(args)
    old = store.active(args.name)
    pointer = store.rollback(args.name)
    _journal_manual(store.root.parent, args.name, "rolled_back", pointer.version, old)
    print(f"active: {args.name} {pointer.version} (rolled back from {old})")
    return 0


def _size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f} {unit}"


def _serving(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    where = ", ".join(x for x in (record["device"], record.get("compute")) if x)
    return f"{record['variant_id']} on {record['backend']} ({where})"

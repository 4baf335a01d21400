"""``edge-agent profile``, ``doctor`` and ``bench``: what this device is, which runtimes it can
use and why not, and which backend and precision runs a model fastest within tolerance.

Detection lives in ``agent.hardware``, measuring and deciding in ``agent.backends.choice``; this
module parses arguments and prints rich tables (or JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import ConfigError, ModelLoadError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``profile``, ``doctor`` and ``bench`` to ``sub``."""
    p = sub.add_parser("profile", help="print this device's hardware profile")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--root", type=Path, default=Path("/"), help="read board files under ROOT")
    p.set_defaults(func=_profile)

    d = sub.add_parser(
        "doctor", help="which inference runtimes and loop sources are usable here, and why not"
    )
    d.add_argument("--json", action="store_true", help="print runtimes and sources as JSON")
    d.set_defaults(func=_doctor)

    b = sub.add_parser("bench", help="measure a model on every backend x precision")
    b.add_argument("model", type=Path, help="the FP32 ONNX file")
    b.add_argument("--int8", type=Path, action="append", default=[], help="an INT8 ONNX/IR file")
    b.add_argument("--ir", type=Path, action="append", default=[], help="an OpenVINO IR .xml")
    b.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="NAME=1x3x640x640",
        help="input shape for dynamic models (default: dynamic batch 1, other dims 224)",
    )
    b.add_argument(
        "--golden",
        type=Path,
        default=None,
        help="an .npz of real inputs (arrays named in:<input>); random inputs say little about "
        "accuracy",
    )
    b.add_argument("--budget-s", type=float, default=None, help="time budget (config default)")
    b.add_argument("--config", type=Path, default=None, help="agent TOML config (pins, threads)")
    b.add_argument("--json", action="store_true", help="print the decision as JSON")
    b.set_defaults(func=_bench)


def _profile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from agent.hardware import detect_profile

    root: Path = args.root
    if not root.is_dir():
        raise ConfigError(f"--root is not a directory: {root}")
    profile = detect_profile(root)
    if args.json:
        print(profile.model_dump_json(indent=2))
        return 0
    table = Table(title="hardware profile", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    board = profile.board
    table.add_row("arch", profile.arch)
    table.add_row("os", profile.os)
    table.add_row("python", profile.python)
    table.add_row("cpu", f"{profile.cpu.model or '?'} ({profile.cpu.cores} cores)")
    table.add_row("cpu flags", " ".join(profile.cpu.flags) or "-")
    board_text = f"{board.kind}" + (f": {board.model}" if board.model else "")
    if board.l4t:
        board_text += f" (L4T {board.l4t}, JetPack {board.jetpack or 'unknown'})"
    table.add_row("board", board_text)
    for gpu in profile.gpus:
        cc = f", compute capability {gpu.compute_capability}" if gpu.compute_capability else ""
        table.add_row("gpu", f"{gpu.vendor} {gpu.name}{cc}")
    table.add_row("memory", f"{profile.memory_bytes / 2**30:.1f} GiB")
    for rt in profile.runtimes:
        state = "usable" if rt.usable else f"not usable: {rt.reason}"
        table.add_row(f"runtime {rt.name}", f"{rt.version or '-'} ({state})")
    Console().print(table)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from agent._sources import source_status
    from agent.hardware import detect_runtimes

    if args.json:
        doc = {
            "runtimes": [rt.model_dump(mode="json") for rt in detect_runtimes()],
            "sources": [row._asdict() for row in source_status()],
        }
        print(json.dumps(doc, indent=2))
        return 0
    table = Table(title="inference runtimes")
    for column in ("runtime", "usable", "version", "devices / providers", "why not"):
        table.add_column(column)
    for rt in detect_runtimes():
        table.add_row(
            rt.name,
            "[green]yes[/green]" if rt.usable else "[red]no[/red]",
            rt.version or "-",
            ", ".join(rt.devices) or "-",
            rt.reason or "",
        )
    console = Console()
    console.print(table)
    console.print(_sources_table())
    return 0


def _sources_table() -> Any:
    """Each ``[loop.source]`` kind: usable here or why not (cameras, OpenCV's GStreamer)."""
    from rich.table import Table

    from agent._sources import source_status

    table = Table(title="loop sources (\\[loop.source] kind)")
    for column in ("kind", "usable", "details / why not"):
        table.add_column(column)
    for row in source_status():
        usable = "[green]yes[/green]" if row.usable else "[red]no[/red]"
        table.add_row(row.kind, usable, row.detail)
    return table


def _parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError(item)
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError as exc:
            raise ConfigError(f"--shape wants NAME=1x3x640x640, got {item!r}") from exc
    return shapes


def _golden_feeds(path: Path, names: set[str]) -> dict[str, np.ndarray[Any, Any]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            feeds = {k[3:]: npz[k] for k in npz.files if k.startswith("in:")}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read --golden {path}: {exc}") from exc
    if set(feeds) != names:
        raise ConfigError(
            f"--golden {path} holds inputs {sorted(feeds)}; the model needs "
            f"{sorted(names)} (arrays named in:<input>)"
        )
    return feeds


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from agent.backends import Artifact, LoadOptions, load_first
    from agent.backends.choice import candidates_for_files, choose
    from agent.config import load_settings
    from agent.hardware import detect_profile

    model: Path = args.model
    name = model.stem
    for path in [model, *args.int8, *args.ir]:
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}", model=path.stem)
    settings = load_settings(args.config)
    cfg = settings.backends
    if args.budget_s is not None:
        if args.budget_s <= 0:
            raise ConfigError("--budget-s must be positive")
        cfg = cfg.model_copy(update={"choice_budget_s": args.budget_s})
    options = LoadOptions(
        intra_op_threads=cfg.intra_op_threads,
        openvino_hint=cfg.openvino_hint,
        openvino_device=cfg.openvino_device,
        ort_provider_options=cfg.ort_provider_options,
        ort_disable_providers=cfg.ort_disable_providers,
    )
    # Load once up front: a corrupt file or bad opset fails here with one clear line.
    probe_session = load_first(Artifact(model, name=name), options)
    shapes = _parse_shapes(args.shape)
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for spec in probe_session.inputs:
        shape = shapes.get(spec.name) or tuple(
            (1 if i == 0 else 224) if d < 0 else d for i, d in enumerate(spec.shape)
        )
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.random(shape, dtype=np.float64).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    probe_session.close()
    unknown = set(shapes) - set(feeds)
    if unknown:
        raise ConfigError(f"--shape names unknown input(s) {sorted(unknown)}")
    if args.golden is not None:
        feeds = _golden_feeds(args.golden, set(feeds))

    profile = detect_profile()
    candidates = candidates_for_files(model, int8=args.int8, ir=args.ir, name=name)
    choice = choose(
        candidates,
        profile,
        [feeds],
        config=cfg,
        options=options,
        model=name,
        time_inaccurate=True,
    )
    if args.json:
        print(json.dumps(choice.model_dump(mode="json"), indent=2))
        return 0
    table = Table(title=f"{name}: backend x precision (budget {cfg.choice_budget_s:g} s)")
    for column in ("", "backend", "precision", "file", "device", "runs", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right" if "ms" in column or column == "runs" else "left")
    table.add_column("inf/s", justify="right")
    table.add_column("rel_l2", justify="right")
    table.add_column("status")
    not_run: dict[str, str] = {}
    for m in choice.measurements:
        if m.status == "unsupported":
            not_run.setdefault(m.backend, m.detail or "")
            continue
        mark = "[bold green]*[/bold green]" if m.candidate == choice.chosen else ""
        table.add_row(
            mark,
            m.backend,
            m.precision,
            Path(m.path).name,
            m.device or "-",
            str(m.runs),
            f"{m.p50_ms:.3f}" if m.p50_ms is not None else "-",
            f"{m.p99_ms:.3f}" if m.p99_ms is not None else "-",
            f"{m.throughput:.1f}" if m.throughput is not None else "-",
            f"{m.rel_l2:.2g}" if m.rel_l2 is not None else "-",
            m.status + (f": {m.detail}" if m.detail else ""),
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a pipe or a log: do not squeeze the table to 80 columns
    console.print(table)
    for backend, why in not_run.items():
        console.print(f"not measured: {backend} ({why})")
    console.print(f"chosen: [bold]{choice.chosen}[/bold] - {choice.reason}")
    return 0

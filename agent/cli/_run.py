"""``edge-agent run``: the inference loop on the first configured model, from the command line.

Owns turning settings (``agent.config``) into a loaded session, a source, the result sinks
(``agent.sinks``, with an MQTT connection of their own when one publishes) and an
``agent.loop.InferenceLoop``; the live latency table on a TTY (one structlog event per window
otherwise); and a clean stop on SIGINT/SIGTERM or after ``--duration``. Backend choice is left
to ``agent.backends``; bad input surfaces as ``AgentError`` for ``agent.cli.main`` to print.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from agent._sources import build_source
from agent.backends import Artifact, LoadOptions, Session, load_first
from agent.config import AgentSettings, LoopConfig, ModelConfig, load_settings
from agent.errors import ConfigError
from agent.logs import configure_logging, get_logger
from agent.loop import FrameSource, InferenceLoop, WindowStats
from agent.sinks import ResultPublisher, build_sinks

__all__ = ["backend_label", "register", "stats_table"]

log = get_logger(__name__)

_LEVELS = ("debug", "info", "warning", "error")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``run`` to ``sub``."""
    p = sub.add_parser("run", help="run the inference loop on the first configured model")
    p.add_argument("--config", type=Path, help="TOML config file (EDGE_AGENT__* env vars win)")
    p.add_argument("--model", type=Path, help="model file to run instead of the configured ones")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--rate", type=float, metavar="HZ", help="target rate (overrides loop.rate_hz); 0: no limit"
    )
    p.add_argument(
        "--shape",
        metavar="DIMS",
        help="first input's shape for the synthetic source, e.g. 1x3x640x640",
    )
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    level = min(args.log_level, settings.log_level, key=_LEVELS.index)
    configure_logging(level, json=settings.log_json)
    model = _model_config(settings, args.model)
    if args.duration is not None and not args.duration > 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    rate: float | None = settings.loop.rate_hz
    if args.rate is not None:
        if args.rate < 0:
            raise ConfigError(f"--rate must be >= 0, got {args.rate}")
        rate = args.rate or None
    shape = _parse_shape(args.shape) if args.shape else None
    assert model.path is not None
    sinks = build_sinks(settings.loop, device_id=settings.device_id, mqtt=settings.mqtt)
    sinks.check()  # a plugin that is not installed or does not import: before loading the model
    session = load_first(
        Artifact(model.path, name=model.name),
        _load_options(settings),
        order=_backend_order(settings),
    )
    try:
        source = _source(settings.loop, session, shape)
        tty = sys.stdout.isatty()
        display = _WindowDisplay(model.name, session, rate, tty=tty)
        sink = sinks.for_loop(model.name, session.outputs)
        loop = InferenceLoop(
            session,
            source,
            name=model.name,
            rate_hz=rate,
            drop_policy=settings.loop.drop_policy,
            window_s=settings.loop.window_s,
            sink=sink,
            on_window=display.update,
        )
        timer = threading.Timer(args.duration, loop.stop) if args.duration else None
        publisher = (
            ResultPublisher(settings.mqtt, sinks, device_id=settings.device_id).start()
            if sinks.mqtt_sinks
            else None
        )
        try:
            with _stop_on_signals(loop.request_stop), display:
                if timer is not None:
                    timer.daemon = True
                    timer.start()
                try:
                    final = loop.run()
                finally:
                    if timer is not None:
                        timer.cancel()
        finally:
            if publisher is not None:
                publisher.stop()
    finally:
        sinks.close()
        session.close()
    if final is not None and not tty:
        print(final.model_dump_json())
    return 0


def _model_config(settings: AgentSettings, model_path: Path | None) -> ModelConfig:
    if model_path is not None:
        name = re.sub(r"[^a-zA-Z0-9._-]", "-", model_path.stem).lstrip("._-")[:64] or "model"
        model = ModelConfig(name=name, path=model_path)
    elif settings.models:
        model = settings.models[0]
    else:
        raise ConfigError("no model to run: add a [[models]] entry to the config or pass --model")
    if model.path is None:
        raise ConfigError(f"model {model.name}: no path configured (set models.path)")
    return model


def _load_options(settings: AgentSettings) -> LoadOptions:
    b = settings.backends
    cache_dir: Path | None = settings.state_dir / "cache"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    except OSError as exc:
        log.info("cache_dir_unavailable", path=str(cache_dir), reason=str(exc))
        cache_dir = None
    return LoadOptions(
        intra_op_threads=b.intra_op_threads,
        cache_dir=cache_dir,
        openvino_hint=b.openvino_hint,
        openvino_device=b.openvino_device,
        ort_provider_options=b.ort_provider_options,
        ort_disable_providers=b.ort_disable_providers,
    )


def _backend_order(settings: AgentSettings) -> Sequence[str] | None:
    b = settings.backends
    if b.pin_backend is not None:
        return (b.pin_backend,)
    return b.order or None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError as exc:
        raise ConfigError(f"--shape must look like 1x3x640x640, got {text!r}") from exc
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"--shape dimensions must be positive, got {text!r}")
    return dims


def _source(config: LoopConfig, session: Session, shape: tuple[int, ...] | None) -> FrameSource:
    shapes = {session.inputs[0].name: shape} if shape else None
    return build_source(config.source, session.inputs, repeat=False, shapes=shapes)


def backend_label(session: Session) -> str:
    """``onnxruntime/CPU``: the backend and the device or provider running the model."""
    return f"{session.backend}/{session.device.removesuffix('ExecutionProvider')}"


def stats_table(rows: Sequence[tuple[str, str, float | None, WindowStats | None]]) -> Any:
    """A rich table, one row per (model, backend/device, target Hz, latest window)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="edge-agent inference loop (latest window)", title_justify="left", box=box.SIMPLE
    )
    for header in ("model", "backend"):
        table.add_column(header, no_wrap=True)
    for header in ("target Hz", "rate Hz", "p50 ms", "p95 ms", "p99 ms", "failed", "dropped"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    for name, backend, target, stats in rows:
        hz = "max" if target is None else f"{target:g}"
        if stats is None:
            table.add_row(name, backend, hz, *(["-"] * 7))
            continue
        table.add_row(
            name,
            backend,
            hz,
            f"{stats.throughput_hz:.1f}",
            ms(stats.latency_p50_ms),
            ms(stats.latency_p95_ms),
            ms(stats.latency_p99_ms),
            str(stats.failed),
            str(stats.dropped),
            str(stats.total_count),
        )
    return table


class _WindowDisplay:
    """A live table on a TTY; otherwise one ``loop_window`` log event per window."""

    def __init__(self, model: str, session: Session, rate: float | None, *, tty: bool) -> None:
        self._row = (model, backend_label(session), rate)
        self._tty = tty
        self._live: Any = None

    def update(self, stats: WindowStats) -> None:
        if self._live is not None:
            self._live.update(stats_table([(*self._row, stats)]), refresh=True)
        else:
            log.info("loop_window", **stats.model_dump(mode="json"))

    def __enter__(self) -> _WindowDisplay:
        if self._tty:
            from rich.live import Live

            self._live = Live(stats_table([(*self._row, None)]), auto_refresh=False)
            self._live.start(refresh=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.stop()


@contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """SIGINT and SIGTERM call ``stop`` while inside (main thread only); handlers restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        # Flags only: no logging, no locks (the signal may have interrupted their holder).
        stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)

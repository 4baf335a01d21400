"""``edge-agent daemon``: the whole agent (store, slots, update client, API, loops) until stopped.

Owns the process lifetime: settings from ``--config``, SIGTERM/SIGINT to stop cleanly, an
optional ``--duration``, and one JSON line on stdout at the end with what each inference loop
did (counts by version, failed, dropped). Composition is ``agent.daemon``'s.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from agent.config import load_settings
from agent.errors import ConfigError
from agent.logs import configure_logging

__all__ = ["register"]

_LEVELS = ("debug", "info", "warning", "error")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``daemon`` to ``sub``."""
    p = sub.add_parser(
        "daemon", help="run the agent: model slots, update client, local API and inference loops"
    )
    p.add_argument("--config", type=Path, help="TOML config file (EDGE_AGENT__* env vars win)")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.set_defaults(func=daemon_command)


def daemon_command(args: argparse.Namespace) -> int:
    from agent.daemon import Daemon

    settings = load_settings(args.config)
    level = min(args.log_level, settings.log_level, key=_LEVELS.index)
    configure_logging(level, json=settings.log_json)
    if args.duration is not None and not args.duration > 0:
        raise ConfigError(f"--duration must be positive, got {args.duration}")
    signalled: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # A plain append: taking a lock here (Event.set) could deadlock on a lock the
        # interrupted main thread holds.
        signalled.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    daemon = Daemon(settings)
    try:
        daemon.start()
        print(json.dumps({"event": "started", "device_id": settings.device_id}), flush=True)
        deadline = None if args.duration is None else time.monotonic() + args.duration
        while not signalled and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        summary = daemon.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(json.dumps({"event": "stopped", **summary}), flush=True)
    return 0

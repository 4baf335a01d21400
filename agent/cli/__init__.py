"""The ``edge-agent`` command. Each command group lives in its own module with a
``register(subparsers)`` function; ``main`` catches ``AgentError`` and prints ``Name: message``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import __version__
from agent.errors import AgentError, ConfigError
from agent.logs import configure_logging

__all__ = ["EX_CONFIG", "main"]

# sysexits.h: the unit's RestartPreventExitStatus= keeps systemd from restarting what a restart
# cannot fix (a missing or invalid configuration, an unusable state directory).
EX_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    from agent.cli import _core, _daemon, _models, _run

    parser = argparse.ArgumentParser(prog="edge-agent", description="edgefleet device agent")
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (_core, _run, _models, _daemon):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except AgentError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

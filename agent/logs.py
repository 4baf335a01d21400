"""structlog set-up shared by the agent and the control plane.

JSON lines under systemd or in a pipe, the console renderer on a TTY. Context such as
``device_id``, ``model`` and ``version`` is bound through contextvars by the callers.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog once at program start; ``json=None`` picks by whether stderr is a TTY."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if use_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )


class _StderrLogger:
    """Writes each line to whatever ``sys.stderr`` is *now*: a stream captured or replaced
    after configuration (a test, a daemonizing wrapper) is never written after it closed."""

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _StderrLoggerFactory:
    def __call__(self, *args: Any) -> _StderrLogger:
        return _StderrLogger()


def get_logger(name: str) -> Any:
    """A structlog logger named after the module."""
    return structlog.get_logger(name)

"""Placeholder command group; filled in by its subsystem."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this group's commands to ``sub``."""

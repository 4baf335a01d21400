"""Path parameters shared by routes, validated so no path trick reaches a query or the disk."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path

from agent.contracts.manifest import NAME_RE

__all__ = ["DEVICE_ID_RE", "VERSION_RE", "DeviceIdPath", "ModelNamePath", "VersionPath"]

VERSION_RE = r"^[0-9A-Za-z.+-]{5,64}$"  # the semantic-version check comes after
DEVICE_ID_RE = r"^[a-z0-9-]{1,40}$"

ModelNamePath = Annotated[str, Path(pattern=NAME_RE, description="model name")]
VersionPath = Annotated[str, Path(pattern=VERSION_RE, description="semantic version")]
DeviceIdPath = Annotated[str, Path(pattern=DEVICE_ID_RE, description="device id")]

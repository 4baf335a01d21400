"""The ROS 2 bridge over DDS, with no ROS installation: image topics and rosbag2 files as loop
sources, results and health published as ROS 2 messages.

``agent.ros2.messages`` holds the message definitions (rosbags' typestore, ``vision_msgs``
added) and their DDS types; ``agent.ros2.transport`` the Cyclone DDS participants, ROS 2 topic
naming and QoS; ``agent.ros2.source`` the ``ros2`` and ``rosbag`` loop sources;
``agent.ros2.sink`` the result and ``/diagnostics`` publisher. This module says whether the
optional dependencies (the ``ros2`` extra) are installed and load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

__all__ = ["bridge_status"]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_error() -> str | None:
    """Why the Cyclone DDS binding does not load (its C library missing), or None."""
    try:
        import cyclonedds.domain  # noqa: F401
    except Exception as exc:  # ImportError, or the binding's own error for a missing library
        return f"{type(exc).__name__}: {exc}"
    return None


def bridge_status() -> dict[str, tuple[bool, str]]:
    """``{"ros2": (usable, detail), "rosbag": (usable, detail)}`` for ``edge-agent doctor``."""
    install = "pip install 'edgefleet[ros2]'"
    rosbags = _version("rosbags") if importlib.util.find_spec("rosbags") else None
    cyclone = _version("cyclonedds") if importlib.util.find_spec("cyclonedds") else None
    if rosbags is None:
        no = f"rosbags is not installed: {install}"
        return {"ros2": (False, no), "rosbag": (False, no)}
    if cyclone is None:
        ros2 = (False, f"cyclonedds is not installed: {install}")
    elif (error := _load_error()) is not None:
        ros2 = (False, f"cyclonedds {cyclone} does not load: {error}")
    else:
        ros2 = (True, f"Cyclone DDS {cyclone} (Python binding), rosbags {rosbags}")
    return {"ros2": ros2, "rosbag": (True, f"rosbags {rosbags}")}

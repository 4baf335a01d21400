"""ROS 2 message types for the bridge: one typestore (rosbags) and the DDS types built from it.

It owns the message definitions the bridge speaks: rosbags' ROS 2 typestore (``sensor_msgs``,
``std_msgs``, ``diagnostic_msgs``, ...) with ``vision_msgs`` 4.x registered from its ``.msg``
text, and the Cyclone DDS ``IdlStruct`` classes generated from those definitions under ROS 2's
DDS type names (``sensor_msgs/msg/Image`` is ``sensor_msgs::msg::dds_::Image_``). A generated
type serializes to the same CDR bytes (XCDR1, little-endian encapsulation) that rosbags writes
into a rosbag2 and that a ROS 2 node on ``rmw_cyclonedds_cpp`` puts on the wire, so one
definition serves the live bridge and bag replay. Transport and QoS are ``agent.ros2.transport``.

The generated types describe the data to DDS (discovery, type matching); the bridge's samples
cross the binding as CDR bytes that rosbags (de)serializes (``agent.ros2.transport``).
"""

from __future__ import annotations

import threading
from typing import Any

from agent.errors import ConfigError

__all__ = ["VISION_MSGS", "dds_type", "dds_type_name", "typestore"]

# vision_msgs 4.x (ROS 2 Humble and later), the messages the result publisher uses.
VISION_MSGS = {
    "vision_msgs/msg/Point2D": "float64 x\nfloat64 y\n",
    "vision_msgs/msg/Pose2D": "vision_msgs/Point2D position\nfloat64 theta\n",
    "vision_msgs/msg/BoundingBox2D": (
        "vision_msgs/Pose2D center\nfloat64 size_x\nfloat64 size_y\n"
    ),
    "vision_msgs/msg/ObjectHypothesis": "string class_id\nfloat64 score\n",
    "vision_msgs/msg/ObjectHypothesisWithPose": (
        "vision_msgs/ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n"
    ),
    "vision_msgs/msg/Detection2D": (
        "std_msgs/Header header\nvision_msgs/ObjectHypothesisWithPose[] results\n"
        "vision_msgs/BoundingBox2D bbox\nstring id\n"
    ),
    "vision_msgs/msg/Detection2DArray": (
        "std_msgs/Header header\nvision_msgs/Detection2D[] detections\n"
    ),
    "vision_msgs/msg/Classification": (
        "std_msgs/Header header\nvision_msgs/ObjectHypothesis[] results\n"
    ),
}

_lock = threading.Lock()
_store: list[Any] = []
_dds: dict[str, type[Any]] = {}


def typestore() -> Any:
    """rosbags' ROS 2 Humble typestore with ``vision_msgs`` registered (built once)."""
    with _lock:
        if not _store:
            try:
                from rosbags.typesys import Stores, get_types_from_msg, get_typestore
            except ImportError as exc:
                raise ConfigError(
                    f"the ROS 2 bridge needs rosbags: pip install 'edgefleet[ros2]' ({exc})"
                ) from exc
            store = get_typestore(Stores.ROS2_HUMBLE)
            types: dict[str, Any] = {}
            for name, text in VISION_MSGS.items():
                types.update(get_types_from_msg(text, name))
            store.register(types)
            _store.append(store)
        return _store[0]


def dds_type_name(msgtype: str) -> str:
    """``sensor_msgs/msg/Image`` -> ``sensor_msgs::msg::dds_::Image_`` (ROS 2's DDS naming)."""
    parts = msgtype.split("/")
    if len(parts) != 3 or not all(parts):
        raise ConfigError(f"not a ROS 2 message type (pkg/msg/Name): {msgtype!r}")
    pkg, sub, name = parts
    return f"{pkg}::{sub}::dds_::{name}_"


def dds_type(msgtype: str) -> type[Any]:
    """The Cyclone DDS ``IdlStruct`` class of a ROS 2 message type (built once per type)."""
    with _lock:
        found = _dds.get(msgtype)
    if found is not None:
        return found
    store = typestore()
    if msgtype not in store.fielddefs:
        raise ConfigError(f"unknown ROS 2 message type {msgtype!r}")
    try:
        from cyclonedds.idl import make_idl_struct
        from cyclonedds.idl import types as idl_types
    except ImportError as exc:
        raise ConfigError(
            f"the ROS 2 bridge needs cyclonedds: pip install 'edgefleet[ros2]' ({exc})"
        ) from exc
    idl: Any = idl_types  # its generic aliases (sequence[T], array[T, n]) are not typed
    base = {
        "bool": bool,
        "byte": idl.uint8,
        "char": idl.uint8,
        "int8": idl.int8,
        "uint8": idl.uint8,
        "int16": idl.int16,
        "uint16": idl.uint16,
        "int32": idl.int32,
        "uint32": idl.uint32,
        "int64": idl.int64,
        "uint64": idl.uint64,
        "float32": idl.float32,
        "float64": idl.float64,
    }

    def field_type(node: tuple[Any, Any]) -> Any:
        kind, spec = node
        kind = int(kind)
        if kind == 1:  # BASE: (name, string bound)
            name, bound = spec
            if name == "string":
                return idl.bounded_str[bound] if bound else str
            if name not in base:
                raise ConfigError(f"{msgtype}: base type {name!r} has no DDS mapping")
            return base[name]
        if kind == 2:  # NAME: a nested message
            return dds_type(spec)
        inner, size = spec
        if kind == 3:  # ARRAY
            return idl.array[field_type(inner), size]
        if kind == 4:  # SEQUENCE (size: bound, 0 unbounded)
            sub = field_type(inner)
            return idl.sequence[sub, size] if size else idl.sequence[sub]
        raise ConfigError(f"{msgtype}: field kind {kind} has no DDS mapping")

    _consts, fields = store.fielddefs[msgtype]
    members = {name: field_type(node) for name, node in fields}
    cls = make_idl_struct(msgtype.rsplit("/", 1)[1], dds_type_name(msgtype), members)
    with _lock:
        return _dds.setdefault(msgtype, cls)

"""DDS transport for the ROS 2 bridge: participants, ROS 2 topic naming, QoS, CDR pass-through.

It owns how the bridge meets a ROS 2 graph on the wire: a topic ``/camera/image_raw`` is the DDS
topic ``rt/camera/image_raw``; the type is the message's DDS name (``agent.ros2.messages``); data
is XCDR1 as ``rmw_cyclonedds_cpp`` writes it; the QoS profiles are ROS 2's (``rmw_qos_profile_
sensor_data`` to read images, ``rmw_qos_profile_default`` for results). Samples cross the
binding as CDR bytes (``CdrSample``) and are (de)serialized by rosbags' generated code: the
binding's own per-field Python serializer costs ~2.7 ms to write and ~2 ms to read a 640x480 RGB
image, rosbags' ~0.03 ms and a zero-copy view. It leaves message contents to ``agent.ros2.source``
and ``agent.ros2.sink``; which network interfaces DDS uses is Cyclone's configuration
(``CYCLONEDDS_URI``), as for any ROS 2 node.
"""

from __future__ import annotations

import os
import re
import threading
from contextlib import suppress
from typing import Any

from agent.errors import ConfigError
from agent.ros2.messages import dds_type_name, typestore

__all__ = [
    "CdrSample",
    "Node",
    "Reader",
    "Writer",
    "carrier",
    "dds_topic_name",
    "default_domain_id",
    "reader_qos",
    "writer_qos",
]

# A ROS 2 topic name: /-separated tokens of [A-Za-z0-9_], no token starting with a digit.
_TOPIC = re.compile(r"^/?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")
_MAX_DOMAIN_ID = 232  # the largest id that keeps DDS's port numbers valid (ROS 2's bound too)


def default_domain_id() -> int:
    """``ROS_DOMAIN_ID`` from the environment, as a ROS 2 node reads it; 0 when unset."""
    raw = os.environ.get("ROS_DOMAIN_ID", "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) > _MAX_DOMAIN_ID:
        raise ConfigError(f"ROS_DOMAIN_ID={raw!r} is not a domain id (0-{_MAX_DOMAIN_ID})")
    return int(raw)


def dds_topic_name(topic: str) -> str:
    """``/camera/image_raw`` -> ``rt/camera/image_raw`` (ROS 2's prefix for topics)."""
    if len(topic) > 200 or not _TOPIC.match(topic) or "__" in topic:
        raise ConfigError(f"not a ROS 2 topic name: {topic!r} (e.g. /camera/image_raw)")
    return "rt/" + topic.lstrip("/")


def _import() -> Any:
    try:
        import cyclonedds
    except ImportError as exc:
        raise ConfigError(
            f"the ROS 2 bridge needs cyclonedds: pip install 'edgefleet[ros2]' ({exc})"
        ) from exc
    return cyclonedds


def reader_qos(depth: int) -> Any:
    """ROS 2's sensor-data profile: best effort (matches best-effort and reliable writers),
    keep last ``depth``, volatile; XCDR1 or XCDR2 accepted."""
    _import()
    from cyclonedds.qos import Policy, Qos

    return Qos(
        Policy.Reliability.BestEffort,
        Policy.History.KeepLast(depth),
        Policy.Durability.Volatile,
        Policy.DataRepresentation(use_cdrv0_representation=True, use_xcdrv2_representation=True),
    )


def writer_qos(depth: int, *, best_effort: bool = False, max_blocking_ms: int = 20) -> Any:
    """ROS 2's default profile: reliable, keep last ``depth``, volatile, XCDR1 (as
    ``rmw_cyclonedds_cpp`` writes); a write blocks at most ``max_blocking_ms``.
    ``best_effort``: the sensor-data profile, as camera drivers publish."""
    _import()
    from cyclonedds.qos import Policy, Qos
    from cyclonedds.util import duration

    blocking = duration(milliseconds=max_blocking_ms)
    return Qos(
        Policy.Reliability.BestEffort
        if best_effort
        else Policy.Reliability.Reliable(max_blocking_time=blocking),
        Policy.History.KeepLast(depth),
        Policy.Durability.Volatile,
        Policy.DataRepresentation(use_cdrv0_representation=True),
    )


class CdrSample:
    """One sample as CDR bytes (encapsulation header included) on its way through the binding.

    The binding serializes a sample with ``sample.serialize()`` and builds received ones with
    ``type.deserialize(data)``; ``carrier(msgtype)`` is a DDS type (the message's DDS name and
    members, so discovery and type matching see the real type) whose two methods are these,
    which pass the bytes through untouched."""

    cdr: bytes
    sample_info: Any

    def serialize(
        self, buffer: Any = None, endianness: Any = None, use_version_2: Any = None
    ) -> bytes:
        return self.cdr

    @classmethod
    def deserialize(
        cls, data: bytes, has_header: bool = True, use_version_2: bool | None = None
    ) -> CdrSample:
        sample = cls.__new__(cls)
        sample.cdr = data
        return sample


_carriers: dict[str, type[CdrSample]] = {}
_carrier_lock = threading.Lock()


def carrier(msgtype: str) -> type[CdrSample]:
    """The DDS type of ``msgtype`` whose samples travel as CDR bytes (built once per type)."""
    with _carrier_lock:
        found = _carriers.get(msgtype)
        if found is not None:
            return found
    from cyclonedds.idl import make_idl_struct

    from agent.ros2.messages import dds_type

    members = dict(dds_type(msgtype).__annotations__)
    cls: Any = make_idl_struct(msgtype.rsplit("/", 1)[1], dds_type_name(msgtype), members)
    # Set on the class, not inherited: the binding's type builder walks every base class.
    cls.serialize = CdrSample.serialize
    cls.deserialize = classmethod(CdrSample.deserialize.__func__)  # type: ignore[attr-defined]
    with _carrier_lock:
        return _carriers.setdefault(msgtype, cls)


def _wrap(cls: Any, cdr: bytes) -> Any:
    sample = cls.__new__(cls)
    sample.cdr = cdr
    return sample


class Node:
    """A DDS participant in ``domain_id`` (a ROS 2 node's share of the graph, without the node's
    own discovery topics): ``reader``/``writer`` add endpoints; ``close`` deletes it and
    everything under it. ``ConfigError`` when the domain cannot be joined (a bad
    ``CYCLONEDDS_URI``, no usable interface)."""

    def __init__(self, domain_id: int) -> None:
        if not 0 <= domain_id <= _MAX_DOMAIN_ID:
            raise ConfigError(f"DDS domain id {domain_id} is out of range 0-{_MAX_DOMAIN_ID}")
        _import()
        from cyclonedds.core import DDSException
        from cyclonedds.domain import DomainParticipant

        self.domain_id = domain_id
        self.store = typestore()
        try:
            self._participant: Any = DomainParticipant(domain_id)
        except DDSException as exc:
            raise ConfigError(
                f"cannot join DDS domain {domain_id}: {exc} (CYCLONEDDS_URI="
                f"{os.environ.get('CYCLONEDDS_URI', 'unset')})"
            ) from exc
        self._topics: dict[str, Any] = {}

    def _topic(self, topic: str, msgtype: str) -> Any:
        from cyclonedds.topic import Topic

        name = dds_topic_name(topic)
        found = self._topics.get(name)
        if found is None:
            found = self._topics[name] = Topic(self._participant, name, carrier(msgtype))
        return found

    def reader(self, topic: str, msgtype: str, *, depth: int) -> Reader:
        return Reader(self, topic, msgtype, depth)

    def writer(
        self, topic: str, msgtype: str, *, depth: int = 10, best_effort: bool = False
    ) -> Writer:
        return Writer(self, topic, msgtype, depth, best_effort=best_effort)

    def close(self) -> None:
        participant, self._participant = self._participant, None
        if participant is not None:
            with suppress(Exception):  # the binding has no public delete; this is its own
                participant.__del__()


class Reader:
    """A subscription with ROS 2's sensor-data QoS: ``wait`` blocks until a sample arrives (or
    ``wake``), ``take`` returns the waiting samples oldest first (at most ``depth``: the DDS
    history keeps only the newest ``depth``), ``decode`` turns one into a rosbags message."""

    def __init__(self, node: Node, topic: str, msgtype: str, depth: int) -> None:
        from cyclonedds.core import (
            GuardCondition,
            InstanceState,
            ReadCondition,
            SampleState,
            ViewState,
            WaitSet,
        )
        from cyclonedds.sub import DataReader

        self.topic = topic
        self.msgtype = msgtype
        self._store = node.store
        self._depth = depth
        participant = node._participant
        self._reader: Any = DataReader(
            participant, node._topic(topic, msgtype), qos=reader_qos(depth)
        )
        self._waitset = WaitSet(participant)
        self._guard = GuardCondition(participant)
        mask = SampleState.Any | ViewState.Any | InstanceState.Any
        self._waitset.attach(ReadCondition(self._reader, mask))
        self._waitset.attach(self._guard)

    def wait(self, timeout_s: float) -> None:
        self._waitset.wait(max(0, int(timeout_s * 1e9)))

    def wake(self) -> None:
        self._guard.set(True)

    def take(self) -> list[Any]:
        samples: list[Any] = self._reader.take(N=self._depth)
        return [s for s in samples if hasattr(s, "cdr")]  # not disposal notices

    def decode(self, sample: Any) -> Any:
        """A received sample as a rosbags message (arrays are views of its bytes)."""
        return self._store.deserialize_cdr(sample.cdr, self.msgtype)

    def matched(self) -> int:
        """Writers of this topic matched now."""
        return int(self._reader.get_subscription_matched_status().current_count)


class Writer:
    """A publication with ROS 2's default QoS (reliable, keep last ``depth``, XCDR1):
    ``write`` serializes a rosbags message and sends it."""

    def __init__(
        self, node: Node, topic: str, msgtype: str, depth: int, *, best_effort: bool = False
    ) -> None:
        from cyclonedds.pub import DataWriter

        self.topic = topic
        self.msgtype = msgtype
        self._store = node.store
        self._carrier = carrier(msgtype)
        self._writer: Any = DataWriter(
            node._participant,
            node._topic(topic, msgtype),
            qos=writer_qos(depth, best_effort=best_effort),
        )

    def write(self, msg: Any) -> None:
        cdr = bytes(self._store.serialize_cdr(msg, self.msgtype))
        self._writer.write(_wrap(self._carrier, cdr))

    def matched(self) -> int:
        """Readers of this topic matched now."""
        return int(self._writer.get_publication_matched_status().current_count)

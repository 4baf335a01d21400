"""A stand-in for a ROS 2 node on ``rmw_cyclonedds_cpp``, for the bridge's tests.

The DDS types are written here by hand as ROS 2's IDL generator emits them (module
``sensor_msgs::msg::dds_``, struct ``Image_``, ...) and serialized by Cyclone DDS's own Python
serializer: nothing of ``agent.ros2`` (rosbags' typestore and CDR) is used, so what the agent
reads and writes is checked against an independent encoding of the same types. Topics are
``rt/<name>``, images go out with the sensor-data QoS (best effort, keep last 5), as camera
drivers publish them.

``python -m tests.agent.ros2_node publish --domain 17 --topic /cam/image ...`` publishes digit
images (scikit-learn's, scaled up) and prints one JSON line per image: its stamp, frame id and
label. ``loopback_config`` writes the Cyclone configuration the tests use: the loopback
interface only, no multicast, the peer 127.0.0.1.
"""

# No ``from __future__ import annotations``: Cyclone DDS reads the field types at class creation.
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cyclonedds.idl import IdlStruct, types

LOOPBACK_XML = """<CycloneDDS><Domain Id="any"><General>
<Interfaces><NetworkInterface name="lo"/></Interfaces>
<AllowMulticast>false</AllowMulticast></General>
<Discovery><ParticipantIndex>auto</ParticipantIndex><MaxAutoParticipantIndex>30</MaxAutoParticipantIndex>
<Peers><Peer address="127.0.0.1"/></Peers></Discovery>
</Domain></CycloneDDS>
"""


def loopback_config(folder: Path) -> str:
    """Write the loopback-only Cyclone configuration; returns the ``CYCLONEDDS_URI`` value."""
    path = folder / "cyclonedds.xml"
    path.write_text(LOOPBACK_XML, encoding="utf-8")
    return path.as_uri()


@dataclass
class Time(IdlStruct, typename="builtin_interfaces::msg::dds_::Time_"):
    sec: types.int32
    nanosec: types.uint32


@dataclass
class Header(IdlStruct, typename="std_msgs::msg::dds_::Header_"):
    stamp: Time
    frame_id: str


@dataclass
class Image(IdlStruct, typename="sensor_msgs::msg::dds_::Image_"):
    header: Header
    height: types.uint32
    width: types.uint32
    encoding: str
    is_bigendian: types.uint8
    step: types.uint32
    data: types.sequence[types.uint8]


@dataclass
class CompressedImage(IdlStruct, typename="sensor_msgs::msg::dds_::CompressedImage_"):
    header: Header
    format: str
    data: types.sequence[types.uint8]


@dataclass
class ObjectHypothesis(IdlStruct, typename="vision_msgs::msg::dds_::ObjectHypothesis_"):
    class_id: str
    score: types.float64


@dataclass
class Classification(IdlStruct, typename="vision_msgs::msg::dds_::Classification_"):
    header: Header
    results: types.sequence[ObjectHypothesis]


@dataclass
class Point(IdlStruct, typename="geometry_msgs::msg::dds_::Point_"):
    x: types.float64
    y: types.float64
    z: types.float64


@dataclass
class Quaternion(IdlStruct, typename="geometry_msgs::msg::dds_::Quaternion_"):
    x: types.float64
    y: types.float64
    z: types.float64
    w: types.float64


@dataclass
class Pose(IdlStruct, typename="geometry_msgs::msg::dds_::Pose_"):
    position: Point
    orientation: Quaternion


@dataclass
class PoseWithCovariance(IdlStruct, typename="geometry_msgs::msg::dds_::PoseWithCovariance_"):
    pose: Pose
    covariance: types.array[types.float64, 36]


@dataclass
class ObjectHypothesisWithPose(
    IdlStruct, typename="vision_msgs::msg::dds_::ObjectHypothesisWithPose_"
):
    hypothesis: ObjectHypothesis
    pose: PoseWithCovariance


@dataclass
class Point2D(IdlStruct, typename="vision_msgs::msg::dds_::Point2D_"):
    x: types.float64
    y: types.float64


@dataclass
class Pose2D(IdlStruct, typename="vision_msgs::msg::dds_::Pose2D_"):
    position: Point2D
    theta: types.float64


@dataclass
class BoundingBox2D(IdlStruct, typename="vision_msgs::msg::dds_::BoundingBox2D_"):
    center: Pose2D
    size_x: types.float64
    size_y: types.float64


@dataclass
class Detection2D(IdlStruct, typename="vision_msgs::msg::dds_::Detection2D_"):
    header: Header
    results: types.sequence[ObjectHypothesisWithPose]
    bbox: BoundingBox2D
    id: str


@dataclass
class Detection2DArray(IdlStruct, typename="vision_msgs::msg::dds_::Detection2DArray_"):
    header: Header
    detections: types.sequence[Detection2D]


@dataclass
class KeyValue(IdlStruct, typename="diagnostic_msgs::msg::dds_::KeyValue_"):
    key: str
    value: str


@dataclass
class DiagnosticStatus(IdlStruct, typename="diagnostic_msgs::msg::dds_::DiagnosticStatus_"):
    level: types.uint8
    name: str
    message: str
    hardware_id: str
    values: types.sequence[KeyValue]


@dataclass
class DiagnosticArray(IdlStruct, typename="diagnostic_msgs::msg::dds_::DiagnosticArray_"):
    header: Header
    status: types.sequence[DiagnosticStatus]


def sensor_qos() -> Any:
    from cyclonedds.qos import Policy, Qos

    return Qos(
        Policy.Reliability.BestEffort,
        Policy.History.KeepLast(5),
        Policy.Durability.Volatile,
        Policy.DataRepresentation(use_cdrv0_representation=True),
    )


def default_qos() -> Any:
    from cyclonedds.qos import Policy, Qos
    from cyclonedds.util import duration

    return Qos(
        Policy.Reliability.Reliable(max_blocking_time=duration(milliseconds=100)),
        Policy.History.KeepLast(10),
        Policy.Durability.Volatile,
    )


def digit_image(index: int, size: int, encoding: str) -> tuple[np.ndarray[Any, Any], int]:
    """A scikit-learn digit scaled up to ``size`` x ``size`` in ``encoding``; with its label."""
    from agent.samples import digits_data

    data = digits_data()
    i = index % len(data.x_test)
    grey = (data.x_test[i, 0] * 255).astype(np.uint8)
    grey = np.kron(grey, np.ones((size // 8, size // 8), dtype=np.uint8))
    if encoding == "mono8":
        return grey, int(data.y_test[i])
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if encoding == "bgr8":
        rgb = rgb[:, :, ::-1]
    return np.ascontiguousarray(rgb), int(data.y_test[i])


def image_message(
    pixels: np.ndarray[Any, Any], encoding: str, stamp_ns: int, frame_id: str
) -> Image:
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    return Image(
        header=Header(
            stamp=Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9), frame_id=frame_id
        ),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=width * channels,
        data=list(pixels.tobytes()),
    )


def publish(args: argparse.Namespace) -> int:
    from cyclonedds.domain import DomainParticipant
    from cyclonedds.pub import DataWriter
    from cyclonedds.topic import Topic

    participant = DomainParticipant(args.domain)
    topic = Topic(participant, "rt/" + args.topic.lstrip("/"), Image)
    writer = DataWriter(participant, topic, qos=sensor_qos())
    deadline = time.monotonic() + args.match_timeout
    while writer.get_publication_matched_status().current_count < 1:
        if time.monotonic() > deadline:
            print(json.dumps({"error": "no subscriber matched"}), flush=True)
            return 1
        time.sleep(0.05)
    period = 1.0 / args.rate
    for n in range(args.count):
        encoding = args.bad_encoding if args.bad_every and n % args.bad_every == 1 else None
        pixels, label = digit_image(n, args.size, args.encoding)
        stamp = time.time_ns()
        msg = image_message(pixels, encoding or args.encoding, stamp, args.frame_id)
        writer.write(msg)
        print(
            json.dumps({"n": n, "stamp_ns": stamp, "label": label, "encoding": msg.encoding}),
            flush=True,
        )
        time.sleep(period)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ros2_node")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("publish", help="publish digit images as sensor_msgs/Image")
    p.add_argument("--domain", type=int, required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--encoding", default="rgb8", choices=["rgb8", "bgr8", "mono8"])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rate", type=float, default=20.0)
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--frame-id", default="camera_optical")
    p.add_argument("--match-timeout", type=float, default=20.0)
    p.add_argument("--bad-encoding", default="yuv422")
    p.add_argument("--bad-every", type=int, default=0, help="every Nth image (N>0) is bad")
    args = parser.parse_args(argv)
    return publish(args)


if __name__ == "__main__":
    sys.exit(main())

"""ROS 2 image sources for the inference loop: a live ``sensor_msgs/Image`` or
``CompressedImage`` topic over DDS, and the same messages replayed from a rosbag2.

It owns turning image messages into the loop's frames (HxWx3 RGB or HxW grey uint8; encodings
rgb8, bgr8, rgba8, bgra8, mono8; JPEG/PNG for compressed ones), with every size checked against
the message's own fields and a bound, and a bad message reported as that (``InputError``, which
the loop counts as a failed frame; ``rejected`` counts them here too). The live source keeps the
newest image only, as the camera grabber does (``agent._sources.StreamSource``): a receive thread
takes every sample DDS delivers and keeps the last, ``read`` hands out the newest one not yet
handed out. ``frame_ts`` is the image's ``header.stamp``. ``header`` is the last image's header
(``current_header()`` for the reading thread), which the result publisher (``agent.ros2.sink``)
copies so results line up with their image.
Transport is ``agent.ros2.transport``; pacing and statistics are the loop's.
"""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from agent.errors import ConfigError, InputError
from agent.logs import get_logger
from agent.ros2.messages import typestore

if TYPE_CHECKING:
    from agent._sources import Feeds, SourceKind

__all__ = [
    "ENCODINGS",
    "IMAGE_TYPES",
    "MAX_COMPRESSED_BYTES",
    "MAX_SIDE",
    "Ros2ImageSource",
    "RosbagSource",
    "current_header",
    "frame_of",
]

log = get_logger(__name__)

IMAGE_TYPES = {
    "Image": "sensor_msgs/msg/Image",
    "CompressedImage": "sensor_msgs/msg/CompressedImage",
}
# encoding -> (channels, the channel order that gives RGB(A) from it, or None)
ENCODINGS: dict[str, tuple[int, tuple[int, ...] | None]] = {
    "rgb8": (3, None),
    "bgr8": (3, (2, 1, 0)),
    "rgba8": (4, None),
    "bgra8": (4, (2, 1, 0, 3)),
    "mono8": (1, None),
    "8UC1": (1, None),
    "8UC3": (3, (2, 1, 0)),  # OpenCV's BGR, as cv_bridge publishes a cv::Mat
}
MAX_SIDE = 16384  # pixels, either side
MAX_COMPRESSED_BYTES = 64 * 1024 * 1024

Frame = np.ndarray[Any, Any]

# The header of the image a ROS 2 source handed out last, per thread: a loop reads and publishes
# in one thread, so its result publisher finds the header of the image the result is for.
_last = threading.local()


def current_header() -> Any:
    """The ``std_msgs/Header`` of the image this thread's ROS 2 source returned last, or None."""
    return getattr(_last, "header", None)


def _stamp_s(header: Any) -> float:
    return float(header.stamp.sec) + float(header.stamp.nanosec) * 1e-9


def frame_of(msg: Any, msgtype: str, *, topic: str) -> Frame:
    """The loop frame of an ``Image`` / ``CompressedImage`` message; ``InputError`` naming the
    topic and the problem when it cannot be one."""
    if msgtype == IMAGE_TYPES["CompressedImage"]:
        return _decompressed(msg, topic)
    encoding = str(msg.encoding)
    layout = ENCODINGS.get(encoding)
    if layout is None:
        raise InputError(
            f"image on {topic}: encoding {encoding!r} is not supported ({', '.join(ENCODINGS)})"
        )
    channels, order = layout
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise InputError(f"image on {topic}: size {width}x{height} is outside 1-{MAX_SIDE}")
    row = width * channels
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if step < row or data.size < step * (height - 1) + row:
        raise InputError(
            f"image on {topic}: {width}x{height} {encoding} needs step >= {row} and "
            f"{step * height} bytes, got step {step} and {data.size} bytes"
        )
    rows = np.lib.stride_tricks.as_strided(
        data, shape=(height, width, channels), strides=(step, channels, 1), writeable=False
    )
    if channels == 1:
        return rows[:, :, 0]
    if order is not None:
        return np.ascontiguousarray(rows[:, :, order])
    return rows


def _decompressed(msg: Any, topic: str) -> Frame:
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if data.size == 0 or data.size > MAX_COMPRESSED_BYTES:
        raise InputError(
            f"compressed image on {topic}: {data.size} bytes (1-{MAX_COMPRESSED_BYTES})"
        )
    cv2: Any = None
    with suppress(ImportError):
        import cv2
    if cv2 is not None:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(
                f"compressed image on {topic}: cannot decode format {str(msg.format)!r}"
            )
        if not (bgr.shape[0] <= MAX_SIDE and bgr.shape[1] <= MAX_SIDE):
            raise InputError(f"compressed image on {topic}: {bgr.shape[1]}x{bgr.shape[0]} too big")
        rgb: Frame = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return rgb
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            if max(img.size) > MAX_SIDE:
                raise InputError(f"compressed image on {topic}: {img.size} too big")
            return np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise InputError(
            f"compressed image on {topic}: cannot decode format {str(msg.format)!r}: {exc}"
        ) from exc


def _msgtype(message: str) -> str:
    try:
        return IMAGE_TYPES[message]
    except KeyError:
        raise ConfigError(
            f"ROS 2 image message {message!r} is not one of {', '.join(IMAGE_TYPES)}"
        ) from None


class Ros2ImageSource:
    """The newest image of a ROS 2 topic, received over DDS (ROS 2's sensor-data QoS: best
    effort, keep last ``depth``, so it matches reliable and best-effort publishers alike).

    ``read`` waits up to ``wait_s`` for an image newer than the last one it returned, else
    raises ``InputError`` saying how many publishers are matched. ``received`` counts images
    that arrived, ``superseded`` those replaced by a newer one before the loop took them.
    """

    yields: SourceKind = "frames"
    static_feeds: Feeds | None = None

    def __init__(
        self,
        topic: str,
        *,
        message: str = "Image",
        domain_id: int = 0,
        depth: int = 5,
        wait_s: float = 0.5,
    ) -> None:
        from agent.ros2.transport import dds_topic_name

        dds_topic_name(topic)  # a bad name is a configuration error now, not at open
        if not 1 <= depth <= 1000:
            raise ConfigError(f"ROS 2 QoS depth must be 1-1000, got {depth}")
        self.topic = topic
        self.msgtype = _msgtype(message)
        self.domain_id = domain_id
        self.label = f"ROS 2 topic {topic} (domain {domain_id})"
        self._depth = depth
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._node: Any = None
        self._reader: Any = None
        self._sample: Any = None
        self._seq = 0
        self._taken = 0
        self._received_at = 0.0
        self.received = 0
        self.superseded = 0
        self.rejected = 0
        self.frame_ts: float | None = None
        self.header: Any = None

    def open(self) -> None:
        from agent.ros2.transport import Node

        _last.header = None  # opened and closed in the loop's thread: no header from before
        node = Node(self.domain_id)
        try:
            self._reader = node.reader(self.topic, self.msgtype, depth=self._depth)
        except Exception:
            node.close()
            raise
        self._node = node
        self._stop.clear()
        self._thread = threading.Thread(target=self._receive, name="ros2-receive", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        reader = self._reader
        while not self._stop.is_set():
            try:
                reader.wait(0.5)
                samples = reader.take()
            except Exception as exc:  # a binding error must not end the source silently
                with suppress(Exception):
                    log.warning("ros2_receive_failed", topic=self.topic, error=str(exc))
                self._stop.wait(0.5)
                continue
            if not samples:
                continue
            now = time.time()
            with self._cond:
                self.superseded += len(samples) - 1 + (self._seq > self._taken)
                self.received += len(samples)
                self._sample = samples[-1]
                self._received_at = now
                self._seq += 1
                self._cond.notify_all()

    def read(self) -> Frame:
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while self._seq == self._taken:
                left = deadline - time.monotonic()
                if left <= 0:
                    matched = self._reader.matched() if self._reader is not None else 0
                    raise InputError(
                        f"no new image on {self.label} in {self._wait_s:g} s "
                        f"({matched} publisher(s) matched)"
                    )
                self._cond.wait(left)
            sample = self._sample
            self._taken = self._seq
            received_at = self._received_at
        try:
            msg = self._reader.decode(sample)
            frame = frame_of(msg, self.msgtype, topic=self.topic)
        except InputError:
            self.rejected += 1
            raise
        except Exception as exc:  # CDR that does not parse as the type
            self.rejected += 1
            raise InputError(f"image on {self.topic} does not decode: {exc}") from exc
        self.header = _last.header = msg.header
        stamp = _stamp_s(msg.header)
        self.frame_ts = stamp if stamp > 0 else received_at
        return frame

    def skip(self, count: int) -> None:
        pass  # the receive thread already keeps only the newest image

    def close(self) -> None:
        _last.header = None
        self._stop.set()
        if self._reader is not None:
            with suppress(Exception):
                self._reader.wake()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._node is not None:
            self._node.close()
            self._node = None
        self._reader = None


class RosbagSource:
    """The images of one topic of a rosbag2 (a directory with ``metadata.yaml``, sqlite3 or
    MCAP storage), in order, through the same decoding as the live topic.

    ``rate="recorded"`` replays at the recorded pace (gaps longer than ``max_gap_s`` are cut to
    it) with the live source's newest-image semantics: a loop slower than the bag gets the
    newest image that is due, the older ones count in ``superseded``; ``frame_ts`` is when an
    image became due. ``rate="max"`` hands out every image as fast as the loop reads. At the end
    the bag ends the run, or starts over with ``repeat``.
    """

    yields: SourceKind = "frames"
    static_feeds: Feeds | None = None

    def __init__(
        self,
        path: Path,
        topic: str,
        *,
        rate: Literal["recorded", "max"] = "recorded",
        repeat: bool = False,
        max_gap_s: float = 1.0,
    ) -> None:
        try:
            from rosbags.rosbag2 import Reader, ReaderError
        except ImportError as exc:
            raise ConfigError(
                f"the rosbag source needs rosbags: pip install 'edgefleet[ros2]' ({exc})"
            ) from exc
        if not path.exists():
            raise ConfigError(f"rosbag not found: {path}")
        try:
            with Reader(path) as probe:
                topics = {c.topic: c.msgtype for c in probe.connections}
                count = sum(c.msgcount for c in probe.connections if c.topic == topic)
        except ReaderError as exc:
            raise ConfigError(f"cannot read rosbag {path}: {exc}") from exc
        if topic not in topics:
            raise ConfigError(
                f"rosbag {path} has no topic {topic!r}; it has: {', '.join(sorted(topics))}"
            )
        if topics[topic] not in IMAGE_TYPES.values():
            raise ConfigError(
                f"rosbag topic {topic} carries {topics[topic]}, not an image "
                f"({', '.join(IMAGE_TYPES.values())})"
            )
        if count == 0:
            raise ConfigError(f"rosbag topic {topic} in {path} has no messages")
        self.path = path
        self.topic = topic
        self.msgtype = topics[topic]
        self.label = f"rosbag {path.name} {topic}"
        self._reader_cls = Reader
        self._rate = rate
        self._repeat = repeat
        self._max_gap_ns = int(max_gap_s * 1e9)
        self._store = typestore()
        self._bag: Any = None
        self._messages: Any = None
        self._pending: tuple[int, bytes] | None = None
        self._due_ns = 0  # wall ns the pending message is due (recorded rate)
        self._last_bag_ns: int | None = None
        self.superseded = 0
        self.rejected = 0
        self.replayed = 0
        self.frame_ts: float | None = None
        self.header: Any = None

    def open(self) -> None:
        _last.header = None
        self._start()

    def _start(self) -> None:
        self.close()
        bag = self._reader_cls(self.path)
        bag.open()
        self._bag = bag
        connections = [c for c in bag.connections if c.topic == self.topic]
        self._messages = bag.messages(connections=connections)
        self._pending = None
        self._last_bag_ns = None
        self._due_ns = time.time_ns()

    def _next(self) -> tuple[int, bytes] | None:
        """The next (due wall ns, CDR) of the bag, or None at its end."""
        item = next(self._messages, None)
        if item is None:
            return None
        _conn, bag_ns, raw = item
        if self._last_bag_ns is not None:
            self._due_ns += min(max(0, bag_ns - self._last_bag_ns), self._max_gap_ns)
        self._last_bag_ns = bag_ns
        return self._due_ns, raw

    def _take(self) -> tuple[int, bytes] | None:
        item = self._pending if self._pending is not None else self._next()
        self._pending = None
        if item is None and self._repeat:
            self._start()
            item = self._next()
        return item

    def read(self) -> Frame | None:
        item = self._take()
        if item is None:
            return None
        due, raw = item
        if self._rate == "recorded":
            wait_ns = due - time.time_ns()
            if wait_ns > 0:
                time.sleep(wait_ns / 1e9)
            else:  # late: move on to the newest message that is due
                while (nxt := self._next()) is not None:
                    if nxt[0] > time.time_ns():
                        self._pending = nxt
                        break
                    self.superseded += 1
                    due, raw = nxt
            self.frame_ts = due / 1e9
        self.replayed += 1
        try:
            msg = self._store.deserialize_cdr(raw, self.msgtype)
            frame = frame_of(msg, self.msgtype, topic=self.topic)
        except InputError:
            self.rejected += 1
            raise
        except Exception as exc:
            self.rejected += 1
            raise InputError(
                f"message on {self.topic} in the rosbag does not decode: {exc}"
            ) from exc
        self.header = _last.header = msg.header
        return frame

    def skip(self, count: int) -> None:
        if self._rate == "max":
            for _ in range(count):
                if self._take() is None:
                    break

    def close(self) -> None:
        _last.header = None
        if self._bag is not None:
            with suppress(Exception):
                self._bag.close()
            self._bag = None
            self._messages = None

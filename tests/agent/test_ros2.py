"""The ROS 2 bridge: images in from a ROS 2 publisher over Cyclone DDS, results and diagnostics
out, rosbag2 replay, the wire encoding against an independent one, and bad images.

Every test joins its own DDS domain with a loopback-only Cyclone configuration (``lo``, no
multicast, peer 127.0.0.1) and topic names no other run uses. The publisher runs in a separate
process (``tests.agent.ros2_node``) with hand-written DDS types and Cyclone's own serializer.
"""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the cyclonedds wheel (the ros2 extra) is not installed")
pytest.importorskip("rosbags", reason="rosbags (the ros2 extra) is not installed")

from agent.backends import Artifact, LoadOptions, Session, load_first
from agent.config import load_settings
from agent.errors import ConfigError, InputError
from agent.loop import CallbackSink, InferenceLoop
from agent.ros2.messages import dds_type_name, typestore
from agent.ros2.sink import Ros2Publisher, Ros2ResultSink, results_topic
from agent.ros2.source import Ros2ImageSource, RosbagSource, frame_of
from tests.agent import ros2_node
from tests.conftest import ROOT

IMAGE = "sensor_msgs/msg/Image"


@pytest.fixture(scope="module")
def digits_session(digits_path: Path) -> Iterator[Session]:
    session = load_first(
        Artifact(digits_path, name="digits"), LoadOptions(intra_op_threads=1), order=["onnxruntime"]
    )
    yield session
    session.close()


@pytest.fixture
def domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    """A DDS domain of this test's own, on loopback only (``CYCLONEDDS_URI`` for this process
    and the processes it starts)."""
    monkeypatch.setenv("CYCLONEDDS_URI", ros2_node.loopback_config(tmp_path))
    return random.SystemRandom().randint(1, 200)


@pytest.fixture
def token() -> str:
    return secrets.token_hex(4)


def ros_image(pixels: np.ndarray[Any, Any], encoding: str, *, step: int | None = None) -> Any:
    types = typestore().types
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    row = step or width * channels
    data = np.zeros((height, row), dtype=np.uint8)
    data[:, : width * channels] = pixels.reshape(height, -1)
    return types[IMAGE](
        header=types["std_msgs/msg/Header"](
            stamp=types["builtin_interfaces/msg/Time"](sec=1, nanosec=2), frame_id="cam"
        ),
        height=height,
        width=width,
        encoding=encoding,
        is_bigendian=0,
        step=row,
        data=data.reshape(-1),
    )


class Subscription:
    """A test-side reader with the independent types, draining into a list in a thread."""

    def __init__(self, domain: int, topic: str, data_type: Any) -> None:
        from cyclonedds.domain import DomainParticipant
        from cyclonedds.qos import Policy, Qos
        from cyclonedds.sub import DataReader
        from cyclonedds.topic import Topic

        self._participant = DomainParticipant(domain)
        dds_topic = Topic(self._participant, "rt/" + topic.lstrip("/"), data_type)
        qos = Qos(Policy.Reliability.Reliable(0), Policy.History.KeepLast(1000))
        self._reader = DataReader(self._participant, dds_topic, qos=qos)
        self.samples: list[Any] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.wait(0.02):
            taken = self._reader.take(N=1000)
            self.samples.extend(s for s in taken if s.sample_info.valid_data)

    def matched(self) -> int:
        return int(self._reader.get_subscription_matched_status().current_count)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_publisher(domain: int, topic: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.agent.ros2_node", "publish"),
            *("--domain", str(domain), "--topic", topic, *extra),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def published(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def live(
    domain: int, token: str, digits_session: Session
) -> Iterator[Callable[..., dict[str, Any]]]:
    """Runs the digits model over a ROS 2 image topic fed by the publisher process, with the
    results and diagnostics published; returns what each side saw."""
    closing: list[Any] = []

    def run(*publisher_args: str) -> dict[str, Any]:
        topic = f"/cam_{token}/image_raw"
        prefix = f"/edge_agent_{token}"
        source = Ros2ImageSource(topic, domain_id=domain, wait_s=0.3)
        publisher = Ros2Publisher(
            domain_id=domain,
            prefix=prefix,
            hardware_id="robot-7",
            version=lambda model: "1.4.0",
            diagnostics_period_s=0.25,
        )
        publisher.prepare("digits", "classification")
        sink = Ros2ResultSink(publisher, model="digits", top_k=3)
        results = Subscription(
            domain, results_topic(prefix, "digits", "classification"), ros2_node.Classification
        )
        diagnostics = Subscription(domain, "/diagnostics", ros2_node.DiagnosticArray)
        closing.extend([results, diagnostics])
        wait_for(lambda: results.matched() >= 1)
        loop = InferenceLoop(digits_session, source, name="digits", sink=sink)
        loop.start()
        proc = start_publisher(domain, topic, *publisher_args)
        try:
            sent = published(proc)
            good = sum(1 for m in sent if m["encoding"] != "yuv422")
            wait_for(lambda: len(results.samples) >= good * 0.8, timeout_s=10)
            time.sleep(0.5)  # the last diagnostics period
        finally:
            loop.stop()
            loop.join(timeout=10)
        return {
            "sent": sent,
            "results": results.samples,
            "diagnostics": diagnostics.samples,
            "loop": loop,
            "source": source,
        }

    yield run
    for sub in closing:
        sub.close()


def test_images_from_a_ros2_publisher_come_back_as_classifications(
    live: Callable[..., dict[str, Any]],
) -> None:
    seen = live("--count", "40", "--rate", "20", "--encoding", "rgb8")
    sent = {m["stamp_ns"]: m["label"] for m in seen["sent"]}
    results = seen["results"]
    assert len(results) >= 32  # best-effort images: a few may be lost or superseded
    correct = 0
    for msg in results:
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert stamp in sent  # each result carries its image's header
        assert msg.header.frame_id == "camera_optical"
        assert len(msg.results) == 3
        scores = [h.score for h in msg.results]
        assert scores == sorted(scores, reverse=True)
        correct += msg.results[0].class_id == str(sent[stamp])
    assert correct / len(results) > 0.8  # the real digits model on the published digits
    statuses = [s for d in seen["diagnostics"] for s in d.status]
    mine = [s for s in statuses if s.name == "edge_agent: digits"]
    assert mine
    values = {kv.key: kv.value for kv in mine[-1].values}
    assert values["model_version"] == "1.4.0"
    assert int(values["results_published"]) == len(results)
    assert mine[-1].hardware_id == "robot-7"
    assert any(
        s.level == 0 and float({k.key: k.value for k in s.values}["rate_hz"]) > 0 for s in mine
    )
    stats = seen["loop"].latest
    assert stats.frame_age_p50_ms is not None  # frame_ts is the image's header stamp


def test_bgr_images_and_bad_encodings_are_counted(live: Callable[..., dict[str, Any]]) -> None:
    seen = live("--count", "24", "--rate", "20", "--encoding", "bgr8", "--bad-every", "4")
    bad = sum(1 for m in seen["sent"] if m["encoding"] == "yuv422")
    assert bad == 6
    source = seen["source"]
    assert 1 <= source.rejected <= bad
    loop = seen["loop"]
    assert loop.latest.total_failed >= source.rejected
    good = {m["stamp_ns"]: m["label"] for m in seen["sent"] if m["encoding"] == "bgr8"}
    stamps = [r.header.stamp.sec * 10**9 + r.header.stamp.nanosec for r in seen["results"]]
    assert stamps
    assert all(s in good for s in stamps)
    pairs = zip(seen["results"], stamps, strict=True)
    right = sum(r.results[0].class_id == str(good[s]) for r, s in pairs)
    assert right / len(stamps) > 0.8


def test_the_agents_cdr_is_what_the_dds_binding_writes() -> None:
    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    ours = bytes(typestore().serialize_cdr(ros_image(pixels, "rgb8"), IMAGE))
    theirs = ros2_node.image_message(pixels, "rgb8", 1_000_000_002, "cam").serialize()
    assert ours == theirs
    assert ours[:2] == b"\x00\x01"  # XCDR1 little-endian, as rmw_cyclonedds_cpp writes
    assert dds_type_name(IMAGE) == "sensor_msgs::msg::dds_::Image_"


def test_encodings_give_the_same_rgb_frame() -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    want = frame_of(ros_image(rgb, "rgb8"), IMAGE, topic="/t")
    assert np.array_equal(want, rgb)
    assert np.array_equal(frame_of(ros_image(rgb[:, :, ::-1], "bgr8"), IMAGE, topic="/t"), rgb)
    padded = frame_of(ros_image(rgb, "rgb8", step=32), IMAGE, topic="/t")  # row padding
    assert np.array_equal(padded, rgb)
    grey = rgb[:, :, 0]
    assert np.array_equal(frame_of(ros_image(grey, "mono8"), IMAGE, topic="/t"), grey)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"encoding": "yuv422"}, "encoding 'yuv422' is not supported"),
        ({"step": 3}, "needs step >= 21"),
        ({"height": 50}, "needs step >= 21 and 1050 bytes, got step 21 and 105 bytes"),
        ({"width": 0}, "size 0x5 is outside"),
    ],
)
def test_a_bad_image_is_an_input_error_naming_the_problem(
    change: dict[str, Any], match: str
) -> None:
    msg = ros_image(np.zeros((5, 7, 3), dtype=np.uint8), "rgb8")
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(InputError, match=match):
        frame_of(msg, IMAGE, topic="/cam")


def write_bag(path: Path, frames: list[np.ndarray[Any, Any]], *, period_ns: int) -> None:
    from rosbags.rosbag2 import Writer

    store = typestore()
    with Writer(path, version=8) as bag:
        images = bag.add_connection("/camera/image_raw", IMAGE, typestore=store)
        other = bag.add_connection("/rosout_like", "std_msgs/msg/String", typestore=store)
        for i, pixels in enumerate(frames):
            msg = ros_image(pixels, "rgb8")
            msg.header.stamp.sec = 100 + i
            t = 1_000_000_000_000 + i * period_ns
            bag.write(images, t, bytes(store.serialize_cdr(msg, IMAGE)))
            text = store.types["std_msgs/msg/String"](data=f"tick {i}")
            bag.write(other, t + 1, bytes(store.serialize_cdr(text, "std_msgs/msg/String")))


def digit_frames(count: int) -> tuple[list[np.ndarray[Any, Any]], list[int]]:
    frames, labels = [], []
    for i in range(count):
        pixels, label = ros2_node.digit_image(i, 16, "rgb8")
        frames.append(pixels)
        labels.append(label)
    return frames, labels


def test_a_rosbag_replays_through_edge_agent_run(digits_path: Path, tmp_path: Path) -> None:
    frames, labels = digit_frames(12)
    bag = tmp_path / "bag"
    write_bag(bag, frames, period_ns=50_000_000)
    sink = tmp_path / "results.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[loop]\nwindow_s = 0.5\nsink_path = "{sink}"\n\n'
        f'[loop.source]\nkind = "rosbag"\npath = "{bag}"\ntopic = "/camera/image_raw"\n'
        'rate = "max"\n'
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
            "--model",
            str(digits_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["total_count"] == 12
    assert stats["total_failed"] == 0
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert len(lines) == 12
    argmax = [next(iter(line["outputs"].values()))["argmax"] for line in lines]
    assert sum(a == y for a, y in zip(argmax, labels, strict=True)) >= 10


def test_a_rosbag_at_the_recorded_rate_stamps_frames_and_keeps_the_newest(
    digits_session: Session, tmp_path: Path
) -> None:
    frames, _ = digit_frames(10)
    bag = tmp_path / "bag"
    write_bag(bag, frames, period_ns=20_000_000)
    source = RosbagSource(bag, "/camera/image_raw", rate="recorded")
    headers: list[int] = []

    def slow_sink(seq: int, ts: float, latency_ns: int, outputs: Any) -> None:
        headers.append(int(source.header.stamp.sec))
        time.sleep(0.05)  # slower than the bag's 20 ms period

    loop = InferenceLoop(digits_session, source, name="digits", sink=CallbackSink(slow_sink))
    stats = loop.run()
    assert stats is not None
    assert headers[0] == 100
    assert headers == sorted(headers)
    assert len(headers) < 10  # images that were overtaken were skipped, not queued
    assert source.superseded == 10 - len(headers)
    assert stats.frame_age_p50_ms is not None


def test_rosbag_and_topic_configuration_errors(tmp_path: Path) -> None:
    frames, _ = digit_frames(2)
    bag = tmp_path / "bag"
    write_bag(bag, frames, period_ns=10)
    with pytest.raises(ConfigError, match=r"has no topic '/nope'; it has: /camera/image_raw"):
        RosbagSource(bag, "/nope")
    with pytest.raises(ConfigError, match="carries std_msgs/msg/String, not an image"):
        RosbagSource(bag, "/rosout_like")
    with pytest.raises(ConfigError, match="rosbag not found"):
        RosbagSource(tmp_path / "missing", "/camera/image_raw")
    with pytest.raises(ConfigError, match="not a ROS 2 topic name"):
        Ros2ImageSource("/bad topic")
    toml = tmp_path / "a.toml"
    toml.write_text('[loop.source]\nkind = "ros2"\ntopic = "2cam"\n')
    with pytest.raises(ConfigError, match=r"loop\.source\.ros2\.topic"):
        load_settings(toml)
    toml.write_text('[loop.source]\nkind = "ros2"\ntopic = "/cam"\ndomain_id = 233\n')
    with pytest.raises(ConfigError, match="domain_id"):
        load_settings(toml)


def test_doctor_lists_the_ros2_kinds() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    rows = {row["kind"]: row for row in json.loads(proc.stdout)["sources"]}
    assert rows["ros2"]["usable"] is True
    assert "Cyclone DDS" in rows["ros2"]["detail"]
    assert rows["rosbag"]["usable"] is True


def test_compressed_images_decode_to_rgb_and_bad_ones_are_named() -> None:
    import io

    from PIL import Image

    rgb = np.random.default_rng(2).integers(0, 255, (6, 9, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    types = typestore().types
    header = types["std_msgs/msg/Header"](
        stamp=types["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="cam"
    )
    compressed = "sensor_msgs/msg/CompressedImage"
    msg = types[compressed](
        header=header, format="png", data=np.frombuffer(png.getvalue(), dtype=np.uint8)
    )
    assert np.array_equal(frame_of(msg, compressed, topic="/c"), rgb)  # lossless: exact
    msg.data = np.frombuffer(b"not an image", dtype=np.uint8)
    with pytest.raises(InputError, match="compressed image on /c: cannot decode format 'png'"):
        frame_of(msg, compressed, topic="/c")
    msg.data = np.zeros(0, dtype=np.uint8)
    with pytest.raises(InputError, match="0 bytes"):
        frame_of(msg, compressed, topic="/c")

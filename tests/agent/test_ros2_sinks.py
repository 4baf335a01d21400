"""``[[loop.sinks]] kind = "ros2"`` end to end: ``edge-agent run`` reads a ROS 2 image topic
(or a rosbag2), postprocesses, and publishes ``vision_msgs`` results and ``/diagnostics`` that
a subscriber with independently written DDS types decodes.

Each test has its own DDS domain, loopback only (``tests.agent.ros2_node.loopback_config``).
"""

from __future__ import annotations

import json
import random
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the cyclonedds wheel (the ros2 extra) is not installed")
pytest.importorskip("rosbags", reason="rosbags (the ros2 extra) is not installed")

from agent.config import (
    LoopConfig,
    MqttConfig,
    Ros2SinkConfig,
)
from agent.contracts.results import (
    Box,
    Classification,
    ClassScore,
    Detection,
    OutputDigest,
    RawOutputs,
)
from agent.ros2.messages import typestore
from agent.ros2.sink import results_topic
from agent.samples import text_page
from agent.sinks import LoopResult, build_sinks
from tests.agent import ros2_node
from tests.agent.test_ros2 import Subscription, published, start_publisher, wait_for
from tests.conftest import ROOT


@pytest.fixture
def domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("CYCLONEDDS_URI", ros2_node.loopback_config(tmp_path))
    return random.SystemRandom().randint(1, 200)


@pytest.fixture
def token() -> str:
    return secrets.token_hex(4)


LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def run_agent(config: Path, model: Path, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "agent.cli", "run", "--config", str(config)),
            *("--model", str(model), "--duration", str(seconds)),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_edge_agent_run_classifies_a_ros2_topic_and_publishes_labels(
    digits_path: Path, tmp_path: Path, domain: int, token: str
) -> None:
    topic, prefix = f"/cam_{token}/image", f"/agent_{token}"
    config = tmp_path / "agent.toml"
    config.write_text(
        "[loop]\nrate_hz = 100.0\nwindow_s = 1.0\n\n"
        f'[loop.source]\nkind = "ros2"\ntopic = "{topic}"\ndomain_id = {domain}\n\n'
        f'[loop.postprocess]\nkind = "topk"\nk = 2\nlabels = {json.dumps(LABELS)}\n\n'
        f'[[loop.sinks]]\nkind = "ros2"\ndomain_id = {domain}\ntopic_prefix = "{prefix}"\n'
        "diagnostics_period_s = 0.5\n"
    )
    results = Subscription(
        domain, results_topic(prefix, digits_path.stem, "classification"), ros2_node.Classification
    )
    diagnostics = Subscription(domain, "/diagnostics", ros2_node.DiagnosticArray)
    agent = run_agent(config, digits_path, 25.0)
    try:
        sent = published(start_publisher(domain, topic, "--count", "60", "--rate", "15"))
        wait_for(lambda: len(results.samples) >= 30, timeout_s=15)
        wait_for(lambda: any(d.status for d in diagnostics.samples), timeout_s=5)
    finally:
        agent.terminate()
        out, err = agent.communicate(timeout=30)
        results.close()
        diagnostics.close()
    assert agent.returncode == 0, err  # SIGTERM: a clean stop
    assert json.loads(out.strip().splitlines()[-1])["total_count"] >= len(results.samples)
    labels = {m["stamp_ns"]: LABELS[m["label"]] for m in sent}
    right = 0
    for msg in results.samples:
        stamp = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        assert stamp in labels  # the image's header, copied
        assert [h.class_id in LABELS for h in msg.results] == [True, True]
        assert 0.0 <= msg.results[1].score <= msg.results[0].score <= 1.0  # probabilities
        right += msg.results[0].class_id == labels[stamp]
    assert right / len(results.samples) > 0.8
    status = next(s for d in reversed(diagnostics.samples) for s in d.status)
    assert status.name == f"edge_agent: {digits_path.stem}"
    assert {kv.key for kv in status.values} >= {"rate_hz", "latency_p50_ms", "model_version"}
    assert status.hardware_id  # the device id


def write_page_bag(path: Path, count: int) -> None:
    from rosbags.rosbag2 import Writer

    store = typestore()
    types = store.types
    page = np.transpose(text_page(1, seed=5, size=320)[0], (1, 2, 0))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    rgb = np.clip((page * std + mean) * 255, 0, 255).astype(np.uint8)
    with Writer(path, version=8) as bag:
        conn = bag.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=store)
        for i in range(count):
            msg = types["sensor_msgs/msg/Image"](
                header=types["std_msgs/msg/Header"](
                    stamp=types["builtin_interfaces/msg/Time"](sec=500 + i, nanosec=0),
                    frame_id="page_cam",
                ),
                height=320,
                width=320,
                encoding="rgb8",
                is_bigendian=0,
                step=960,
                data=rgb.reshape(-1),
            )
            raw = bytes(store.serialize_cdr(msg, "sensor_msgs/msg/Image"))
            bag.write(conn, 10**12 + i * 200_000_000, raw)


def test_a_rosbag_of_pages_comes_out_as_detection2d_arrays(
    ppocr_path: Path, tmp_path: Path, domain: int, token: str
) -> None:
    bag = tmp_path / "pages"
    write_page_bag(bag, 12)
    prefix = f"/agent_{token}"
    config = tmp_path / "agent.toml"
    config.write_text(
        "[loop]\nrate_hz = 30.0\nwindow_s = 1.0\n\n"
        f'[loop.source]\nkind = "rosbag"\npath = "{bag}"\ntopic = "/camera/image_raw"\n'
        "repeat = true\n\n"
        '[loop.postprocess]\nkind = "db_boxes"\n\n'
        f'[[loop.sinks]]\nkind = "ros2"\ndomain_id = {domain}\ntopic_prefix = "{prefix}"\n'
    )
    detections = Subscription(
        domain, results_topic(prefix, ppocr_path.stem, "detections"), ros2_node.Detection2DArray
    )
    agent = run_agent(config, ppocr_path, 40.0)
    try:
        wait_for(lambda: len(detections.samples) >= 3, timeout_s=35)
    finally:
        agent.terminate()
        agent.communicate(timeout=30)
        detections.close()
    for msg in detections.samples:
        assert msg.header.frame_id == "page_cam"
        assert 500 <= msg.header.stamp.sec < 512
        assert msg.detections  # the page's word-like strokes are found
        for det in msg.detections:
            assert det.results[0].hypothesis.class_id == "text"
            assert 0.0 < det.results[0].hypothesis.score <= 1.0
            assert det.bbox.size_x > 0
            assert det.bbox.size_y > 0
            assert 0 <= det.bbox.center.position.x <= 320
            assert det.results[0].pose.pose.orientation.w == 1.0


def test_the_ros2_sink_maps_results_and_counts_what_it_cannot(domain: int, token: str) -> None:
    prefix = f"/agent_{token}"
    config = LoopConfig(sinks=(Ros2SinkConfig(kind="ros2", domain_id=domain, topic_prefix=prefix),))
    sinks = build_sinks(config, device_id="dev-1", mqtt=MqttConfig(), version=lambda m: "2.0.0")
    sink = sinks.sinks[0]
    classes = Subscription(
        domain, results_topic(prefix, "m.v2", "classification"), ros2_node.Classification
    )
    boxes = Subscription(
        domain, results_topic(prefix, "m.v2", "detections"), ros2_node.Detection2DArray
    )
    try:
        top = Classification(output="y", classes=[ClassScore(index=3, score=0.9)])
        sink.publish(LoopResult("m.v2", 1, 1_700_000_000.25, 2.0, top))  # creates the writers
        found = Detection(
            output="map",
            width=64,
            height=64,
            boxes=[Box(x0=2, y0=4, x1=12, y1=8, score=0.7, class_id=1, label=None)],
        )
        sink.publish(LoopResult("m.v2", 2, 1_700_000_000.5, 2.0, found))
        wait_for(lambda: classes.matched() >= 1 and boxes.matched() >= 1)
        sink.publish(LoopResult("m.v2", 3, 1_700_000_001.0, 2.0, top))
        sink.publish(LoopResult("m.v2", 4, 1_700_000_001.5, 2.0, found))
        # the first two may or may not arrive (sent before the match): wait for the later two
        wait_for(
            lambda: (
                any(m.header.stamp.sec == 1_700_000_001 for m in classes.samples)
                and any(m.header.stamp.sec == 1_700_000_001 for m in boxes.samples)
            )
        )
        raw = RawOutputs(outputs={"y": OutputDigest(shape=[1, 10], argmax=3, max=0.9)})
        sink.publish(LoopResult("m.v2", 5, 1_700_000_002.0, 2.0, raw))
        assert sink.unmapped == 1  # no standard message for it: counted, not sent
    finally:
        sinks.close()
        classes.close()
        boxes.close()
    cls = next(m for m in classes.samples if m.header.stamp.sec == 1_700_000_001)
    assert cls.header.stamp.nanosec == 0
    assert [(h.class_id, h.score) for h in cls.results] == [("3", 0.9)]
    later = next(m for m in boxes.samples if m.header.stamp.sec == 1_700_000_001)
    assert later.header.stamp.nanosec == 500_000_000
    det = later.detections[0]
    assert (det.bbox.center.position.x, det.bbox.center.position.y) == (7.0, 6.0)
    assert (det.bbox.size_x, det.bbox.size_y) == (10.0, 4.0)
    assert det.results[0].hypothesis.class_id == "1"
    assert det.id == "0"


def test_the_daemon_replays_a_rosbag_and_reports_its_version_on_diagnostics(
    digits_path: Path, tmp_path: Path, state_dir: Path, domain: int, token: str
) -> None:
    from tests.agent.test_daemon_systemd import _install
    from tests.agent.test_ros2 import digit_frames, write_bag

    _install(
        state_dir, tmp_path, "digits", digits_path, {"input": np.zeros((1, 1, 8, 8), np.float32)}
    )
    frames, labels = digit_frames(10)
    bag = tmp_path / "bag"
    write_bag(bag, frames, period_ns=50_000_000)  # 20 Hz; the daemon repeats it
    prefix = f"/robot_{token}"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "robot-{token}"\nstate_dir = "{state_dir}"\n'
        '[[models]]\nname = "digits"\n[api]\nenabled = false\n[swap]\nwarmup_runs = 1\n'
        "[loop]\nrate_hz = 40.0\nwindow_s = 1.0\n\n"
        f'[loop.source]\nkind = "rosbag"\npath = "{bag}"\ntopic = "/camera/image_raw"\n\n'
        f'[loop.postprocess]\nkind = "topk"\nk = 1\nlabels = {json.dumps(LABELS)}\n\n'
        f'[[loop.sinks]]\nkind = "ros2"\ndomain_id = {domain}\ntopic_prefix = "{prefix}"\n'
        "diagnostics_period_s = 0.5\n"
    )
    results = Subscription(
        domain, results_topic(prefix, "digits", "classification"), ros2_node.Classification
    )
    diagnostics = Subscription(domain, "/diagnostics", ros2_node.DiagnosticArray)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: len(results.samples) >= 15, timeout_s=60)
        wait_for(lambda: any(d.status for d in diagnostics.samples), timeout_s=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        results.close()
        diagnostics.close()
    assert proc.returncode == 0, err[-3000:]
    right = 0
    for msg in results.samples:
        index = msg.header.stamp.sec - 100  # write_bag stamps image i with 100 + i seconds
        assert msg.header.frame_id == "cam"
        right += msg.results[0].class_id == LABELS[labels[index]]
    assert right >= len(results.samples) - 2
    status = next(s for d in reversed(diagnostics.samples) for s in d.status)
    values = {kv.key: kv.value for kv in status.values}
    assert values["model_version"] == "1.0.0"  # the version the daemon serves
    assert status.hardware_id == f"robot-{token}"

"""ROS 2 bridge latency: image-in to result-out over DDS against the loop's own latency for the
same model, side by side in one run.

The real PP-OCR detector runs on 640x480 RGB frames (its dynamic H/W at 480x640):

- bridge: an agent process runs ``InferenceLoop`` over ``[loop.source] kind = "ros2"``
  (``agent.ros2.source.Ros2ImageSource``) and publishes each result (``vision_msgs/
  Classification``, top-1 of the probability map, through ``agent.ros2.sink``); this process
  publishes ``sensor_msgs/Image`` (rgb8, 640x480, best effort, as a camera driver does) and
  subscribes to the results. One image at a time: the next goes out when the previous result
  came back (so no image waits behind another). Latency = result received - ``header.stamp``
  (set when the image was published; the result carries the image's header);
- the loop's own latency (preprocessing + inference, as ``WindowStats`` reports it) for each of
  those images, recorded in the agent process: the same images at the same moments, so load
  from other processes on the machine hits both sides of the ratio alike;
- for reference, the same loop over an in-process source in this process, afterwards.

Printed: p50/p99 of each, the bridge / loop ratio (goal <= 1.1 at p50) and the bridge's
overhead in ms (median per image).
DDS stays on loopback (Cyclone configuration: ``lo`` only, no multicast, peer 127.0.0.1).

Run: .venv/bin/python bench/bench_ros2.py   (EDGEFLEET_BENCH_QUICK=1 for a short run)
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.backends import Artifact, LoadOptions, load_first
from agent.logs import configure_logging
from agent.loop import CallbackSink, CallbackSource, InferenceLoop
from agent.samples import ppocr_detector, text_page
from tests.agent.ros2_node import loopback_config

QUICK = os.environ.get("EDGEFLEET_BENCH_QUICK") == "1"
IMAGES = 15 if QUICK else 40
WARMUP = 3
WIDTH, HEIGHT = 640, 480
ROOT = Path(__file__).resolve().parent.parent


def frame() -> np.ndarray[Any, Any]:
    page = np.transpose(text_page(1, seed=3, size=WIDTH)[0], (1, 2, 0))  # normalised HWC
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    rgb = np.clip((page[:HEIGHT] * std + mean) * 255, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb)


def session() -> Any:
    return load_first(
        Artifact(ppocr_detector(), name="ppocr"), LoadOptions(), order=["onnxruntime"]
    )


def loop_alone(count: int) -> list[float]:
    """The loop's own latency (ms) per frame over an in-process source."""
    image = frame()
    left = [count + WARMUP]
    latencies: list[float] = []

    def produce() -> Any:
        left[0] -= 1
        return image if left[0] >= 0 else None

    def note(seq: int, ts: float, latency_ns: int, outputs: Any) -> None:
        latencies.append(latency_ns / 1e6)

    model = session()
    try:
        InferenceLoop(model, CallbackSource(produce), name="ppocr", sink=CallbackSink(note)).run()
    finally:
        model.close()
    return latencies[WARMUP:]


def agent(args: argparse.Namespace) -> int:
    """The agent side: the loop over the ROS 2 topic, results published."""
    from agent.ros2.sink import Ros2Publisher, Ros2ResultSink
    from agent.ros2.source import Ros2ImageSource, current_header

    configure_logging("error", json=False)
    model = session()
    source = Ros2ImageSource(args.topic, domain_id=args.domain, wait_s=0.5)
    publisher = Ros2Publisher(domain_id=args.domain, prefix=args.prefix)
    publisher.prepare("ppocr", "classification")
    publish = Ros2ResultSink(publisher, model="ppocr", top_k=1)
    own: list[str] = []

    def sink(seq: int, ts: float, latency_ns: int, outputs: Any) -> None:
        publish(seq, ts, latency_ns, outputs)
        stamp = current_header().stamp
        own.append(f"{stamp.sec * 10**9 + stamp.nanosec} {latency_ns / 1e6:.4f}")

    loop = InferenceLoop(model, source, name="ppocr", sink=CallbackSink(sink), window_s=3600)
    signal.signal(signal.SIGTERM, lambda signum, frame: loop.request_stop())
    timer = threading.Timer(args.seconds, loop.stop)
    timer.daemon = True
    timer.start()
    try:
        loop.run()
    finally:
        publish.close()
        model.close()
        Path(args.latencies).write_text("\n".join(own) + "\n")
    return 0


def bridge(count: int, folder: Path) -> tuple[list[float], list[float]]:
    """Image-in to result-out (ms) per image through an agent process, and that process's own
    loop latency (ms) for the same images."""
    from agent.ros2.messages import typestore
    from agent.ros2.sink import CLASSIFICATION, results_topic
    from agent.ros2.transport import Node

    token = os.urandom(4).hex()
    domain = random.SystemRandom().randint(1, 200)
    topic, prefix = f"/bench_{token}/image_raw", f"/bench_{token}"
    seconds = 60.0 + count * 3
    proc = subprocess.Popen(
        [
            *(sys.executable, __file__, "--agent", "--domain", str(domain), "--topic", topic),
            *("--prefix", prefix, "--seconds", str(seconds)),
            *("--latencies", str(folder / "latencies.txt")),
        ],
        cwd=ROOT,
    )
    types = typestore().types
    image = frame()
    node = Node(domain)
    try:
        writer = node.writer(topic, "sensor_msgs/msg/Image", depth=5, best_effort=True)
        reader = node.reader(
            results_topic(prefix, "ppocr", "classification"), CLASSIFICATION, depth=10
        )
        deadline = time.monotonic() + 120
        while writer.matched() < 1 or reader.matched() < 1:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(
                    f"the agent process did not join DDS domain {domain} (exit code "
                    f"{proc.poll()}, matched: images {writer.matched()}, results "
                    f"{reader.matched()})"
                )
            time.sleep(0.1)
        latencies: dict[int, float] = {}
        for n in range(count + WARMUP):
            stamp = time.time_ns()
            msg = types["sensor_msgs/msg/Image"](
                header=types["std_msgs/msg/Header"](
                    stamp=types["builtin_interfaces/msg/Time"](
                        sec=stamp // 10**9, nanosec=stamp % 10**9
                    ),
                    frame_id="camera",
                ),
                height=HEIGHT,
                width=WIDTH,
                encoding="rgb8",
                is_bigendian=0,
                step=WIDTH * 3,
                data=image.reshape(-1),
            )
            writer.write(msg)
            got = None
            wait_until = time.monotonic() + 30
            while got is None and time.monotonic() < wait_until:
                reader.wait(0.5)
                for sample in reader.take():
                    result = reader.decode(sample)
                    s = result.header.stamp
                    if s.sec * 10**9 + s.nanosec == stamp:
                        got = time.time_ns()
            if got is None:
                print(f"image {n}: no result in 30 s (lost on the way); skipped")
                continue
            if n >= WARMUP:
                latencies[stamp] = (got - stamp) / 1e6
    finally:
        node.close()
        proc.terminate()
        proc.wait(timeout=30)
    own = {}
    for line in (folder / "latencies.txt").read_text().splitlines():
        stamp_text, ms = line.split()
        own[int(stamp_text)] = float(ms)
    pairs = [(latencies[s], own[s]) for s in latencies if s in own]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agent", action="store_true")
    parser.add_argument("--domain", type=int, default=0)
    parser.add_argument("--topic", default="")
    parser.add_argument("--prefix", default="")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--latencies", default="")
    args = parser.parse_args()
    if args.agent:
        return agent(args)
    configure_logging("error", json=False)
    folder = Path(tempfile.mkdtemp(prefix="bench-ros2-"))
    os.environ["CYCLONEDDS_URI"] = loopback_config(folder)
    print(f"PP-OCR detector, {WIDTH}x{HEIGHT} rgb8 frames, {IMAGES} images each way")
    over, own = bridge(IMAGES, folder)
    alone = loop_alone(IMAGES)
    rows = [
        ("loop alone, in-process source (reference)", alone),
        ("loop's own latency, same images as the bridge", own),
        ("ROS 2 image in -> result out", over),
    ]
    print("| path | n | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    for name, values in rows:
        print(f"| {name} | {len(values)} | {pct(values, 50):.1f} | {pct(values, 99):.1f} |")
    per_image = float(np.median(np.asarray(over) / np.asarray(own)))
    ratio50 = pct(over, 50) / pct(own, 50)
    ratio99 = pct(over, 99) / pct(own, 99)
    verdict = "met" if ratio50 <= 1.1 else "missed"
    print(
        f"bridge / loop's own: p50 {ratio50:.3f}, p99 {ratio99:.3f}, median per image "
        f"{per_image:.3f} (goal p50 <= 1.1: {verdict}); bridge overhead p50 "
        f"{float(np.median(np.asarray(over) - np.asarray(own))):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

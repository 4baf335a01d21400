"""Postprocessing and result sinks: what they add to each frame, measured side by side in one run.

The digits CNN over an in-memory 8x8 frame (the loop's frame path: preprocessing, inference),
unthrottled, ``FRAMES`` frames per round, variants interleaved in rounds (order rotated every
round) on one session:

    none          no sink (the baseline)
    raw+jsonl     the older ``loop.sink_path`` form: raw digest to a JSON lines file
    topk+jsonl    top-5 with softmax and labels to a JSON lines file
    topk+jsonl+mqtt-away   the same, plus an MQTT sink whose broker is unreachable (the queue
                  fills and drops its oldest)
    topk+jsonl+mqtt-live   the same, plus an MQTT sink drained into the real Mosquitto on
                  127.0.0.1:1883 by ``ResultPublisher`` (max_rate_hz raised so nothing is capped)

Prints per-frame time (median over rounds) and its ratio to ``none``, and the loop's own
``postprocess_ms`` (mean time in postprocessing + sinks per frame).

Run: .venv/bin/python bench/bench_sinks.py   (EDGEFLEET_BENCH_QUICK=1 for a short run)
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends import Artifact, LoadOptions, load_first
from agent.config import LoopConfig, MqttConfig
from agent.logs import configure_logging
from agent.loop import CallbackSource, InferenceLoop
from agent.samples import digits_cnn
from agent.sinks import ResultPublisher, ResultSinks, build_sinks

QUICK = os.environ.get("EDGEFLEET_BENCH_QUICK") == "1"
FRAMES = 2000 if QUICK else 10000
ROUNDS = 3 if QUICK else 5
LABELS = [f"digit-{i}" for i in range(10)]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _variants(out: Path) -> dict[str, tuple[dict[str, Any], MqttConfig]]:
    topk = {"kind": "topk", "k": 5, "labels": LABELS}
    mqtt = {"kind": "mqtt", "max_rate_hz": 10_000, "queue_size": 256}
    away = MqttConfig(host="127.0.0.1", port=_closed_port())
    live = MqttConfig(host="127.0.0.1", port=1883)
    return {
        "none": ({}, live),
        "raw+jsonl": ({"sink_path": out / "raw.jsonl"}, live),
        "topk+jsonl": (
            {"postprocess": topk, "sinks": [{"kind": "jsonl", "path": out / "topk.jsonl"}]},
            live,
        ),
        "topk+jsonl+mqtt-away": (
            {
                "postprocess": topk,
                "sinks": [{"kind": "jsonl", "path": out / "away.jsonl"}, mqtt],
            },
            away,
        ),
        "topk+jsonl+mqtt-live": (
            {
                "postprocess": topk,
                "sinks": [{"kind": "jsonl", "path": out / "live.jsonl"}, mqtt],
            },
            live,
        ),
    }


def _round(session: Any, frame: Any, loop_fields: dict[str, Any], mqtt: MqttConfig) -> tuple:
    sinks: ResultSinks = build_sinks(LoopConfig(**loop_fields), device_id="bench", mqtt=mqtt)
    publisher = (
        ResultPublisher(mqtt, sinks, device_id="bench").start() if sinks.mqtt_sinks else None
    )
    if publisher is not None and mqtt.port == 1883:
        time.sleep(0.3)  # connected before timing
    loop = InferenceLoop(
        session,
        CallbackSource(lambda: frame),
        name="digits",
        rate_hz=None,
        max_frames=FRAMES,
        window_s=3600.0,
        sink=sinks.for_loop("digits", session.outputs),
    )
    t0 = time.perf_counter()
    final = loop.run()
    elapsed = time.perf_counter() - t0
    if publisher is not None:
        publisher.stop()
    sinks.close()
    assert final is not None
    assert final.total_count == FRAMES
    counters = [s.counters for s in sinks.mqtt_sinks]
    return elapsed / FRAMES * 1e6, final.postprocess_ms, counters


def main() -> None:
    configure_logging("error", json=True)
    cache = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache")) / "edgefleet-bench"
    cache.mkdir(parents=True, exist_ok=True)
    session = load_first(
        Artifact(digits_cnn(cache), name="digits"),
        LoadOptions(intra_op_threads=1),
        order=["onnxruntime"],
    )
    frame = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        variants = _variants(Path(tmp))
        names = list(variants)
        per_frame: dict[str, list[float]] = {n: [] for n in names}
        post: dict[str, list[float]] = {n: [] for n in names}
        last_counters: dict[str, Any] = {}
        for r in range(ROUNDS):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                for path in Path(tmp).glob("*.jsonl"):
                    path.unlink()
                us, pp_ms, counters = _round(session, frame, *variants[name])
                per_frame[name].append(us)
                post[name].append(pp_ms or 0.0)
                last_counters[name] = counters
    session.close()
    base = statistics.median(per_frame["none"])
    print(f"digits CNN, {FRAMES} frames x {ROUNDS} rounds, unthrottled, medians over rounds")
    print(f"{'variant':24} {'us/frame':>9} {'ratio':>6} {'post+sink us':>13}  mqtt")
    for name in names:
        us = statistics.median(per_frame[name])
        pp = statistics.median(post[name]) * 1e3
        mq = ""
        for c in last_counters[name]:
            mq = f"sent {c.sent} dropped {c.dropped} (queue {c.dropped_full})"
        print(f"{name:24} {us:9.1f} {us / base:6.2f} {pp:13.1f}  {mq}")


if __name__ == "__main__":
    main()

"""Telemetry figures, measured side by side in one run.

1. Broker outage: a private Mosquitto is stopped while the agent produces 10 minutes of 1 Hz
   telemetry (simulated clock: 600 windows, one event every 20 s), then restarted. Variants: the
   default spool bound (16 MiB, everything fits) and a small one (64 KiB, oldest telemetry
   dropped). Events lost must be 0 in both; telemetry delivered/produced is bounded by the spool.
2. Rollout decision: 1,000 simulated devices at 1 Hz telemetry, waves 1/10/50/100 %, installs
   finishing 20-120 s after assignment. Time from a regression's first telemetry to the abort
   (simulated seconds and controller ticks), per kind of regression, and the cost of one
   ``advance()`` at 1,000 and 10,000 devices.

Run: .venv/bin/python bench/bench_telemetry.py   (needs the mosquitto binary; ~1 minute)
"""

from __future__ import annotations

import getpass
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import MqttConfig
from agent.contracts.events import UpdateEvent
from agent.contracts.telemetry import ModelTelemetry
from agent.logs import configure_logging
from agent.telemetry import SystemMetricsCollector, TelemetryClient
from control_plane.rollouts import (
    Abort,
    Complete,
    DeviceStatus,
    FleetSnapshot,
    RolloutController,
    RolloutRules,
    RolloutSpec,
    RolloutState,
    Wave,
)

OUTAGE_S = 600  # simulated seconds of outage at 1 Hz
EVENT_EVERY_S = 20


# -- 1. broker outage ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        self.conf.write_text(
            f"user {getpass.getuser()}\nlistener {self.port} 127.0.0.1\n"
            "allow_anonymous true\npersistence false\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class Counter:
    def __init__(self, port: int, topic: str) -> None:
        self.events: list[int] = []
        self.telemetry = 0
        self.ready = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"bench-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.ready.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.endswith("/events"):
            self.events.append(json.loads(msg.payload)["seq"])
        elif msg.topic.endswith("/telemetry"):
            self.telemetry += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def outage_run(bound: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir)
        broker.start()
        device = f"bench-{uuid.uuid4().hex[:8]}"
        sim = [datetime(2025, 1, 1, tzinfo=timezone.utc)]
        gate = threading.Event()
        models = [
            ModelTelemetry(
                name=f"model-{i}",
                version="1.4.2",
                variant_id="onnx-int8",
                backend="onnxruntime",
                window_s=1.0,
                count=30,
                failed=0,
                dropped=0,
                throughput_per_s=30.0,
                latency_p50_ms=21.5,
                latency_p95_ms=27.0,
                latency_p99_ms=31.2,
            )
            for i in range(3)
        ]
        client = TelemetryClient(
            MqttConfig(
                host="127.0.0.1", port=broker.port, spool_max_bytes=bound, telemetry_interval_s=3600
            ),
            device_id=device,
            state_dir=workdir / "state",
            model_stats=lambda: models,
            system_metrics=SystemMetricsCollector(use_nvml=False).collect,
            clock=lambda: sim[0],
            reconnect_min_s=0.05,
            reconnect_wait=lambda _: gate.wait(),
        )
        client.start()
        client.wait_connected(10)
        broker.stop()
        while client.connected:
            time.sleep(0.01)
        produced_t = produced_e = 0
        t0 = time.perf_counter()
        for second in range(OUTAGE_S):
            sim[0] += timedelta(seconds=1)
            client.submit_telemetry()
            produced_t += 1
            if second % EVENT_EVERY_S == 0:
                produced_e += 1
                client.publish_event(
                    UpdateEvent(
                        device_id=device,
                        seq=produced_e,
                        ts=sim[0],
                        model="model-0",
                        step="download_started",
                        version="1.4.3",
                    )
                )
        spool_s = time.perf_counter() - t0
        spool_bytes = client.spool.bytes
        broker.start()
        counter = Counter(broker.port, f"edgefleet/v1/{device}/#")
        t1 = time.perf_counter()
        gate.set()
        deadline = time.monotonic() + 60
        while len(client.spool) and time.monotonic() < deadline:
            time.sleep(0.01)
        drain_s = time.perf_counter() - t1
        time.sleep(0.2)  # let the last messages reach the subscriber
        dropped = client.spool.counters().telemetry_dropped
        client.stop()
        counter.close()
        broker.stop()
        lost = produced_e - len(set(counter.events))
        return {
            "bound": bound,
            "produced_t": produced_t,
            "delivered_t": counter.telemetry,
            "dropped_t": dropped,
            "spool_peak": spool_bytes,
            "events": produced_e,
            "lost_e": lost,
            "in_order": counter.events == sorted(counter.events),
            "spool_ms": spool_s * 1000 / (produced_t + produced_e),
            "drain_s": drain_s,
        }


# -- 2. rollout decision ---------------------------------------------------------------------


def rollout_run(scenario: str, n: int, rng_seed: int = 7, tick_s: float = 1.0) -> dict[str, Any]:
    rng = random.Random(rng_seed)
    spec = RolloutSpec(
        id="bench-" + "".join(c if c.isalnum() else "-" for c in scenario),
        model="det",
        version="2.0.0",
        waves=(
            Wave(percent=1, soak_s=600),
            Wave(percent=10, soak_s=600),
            Wave(percent=50, soak_s=600),
            Wave(percent=100, soak_s=600),
        ),
        rules=RolloutRules(min_devices_reporting=3, min_reporting_share=0.5),
    )
    ctrl = RolloutController()
    state = RolloutState.new(spec)
    base_p99 = {f"d{i}": rng.uniform(15, 40) for i in range(n)}
    install_at: dict[str, float] = {}
    fails = (
        {f"d{i}" for i in range(n) if rng.random() < 0.3}
        if scenario == "failed installs"
        else set()
    )
    first_bad: float | None = None
    advance_ms: list[float] = []
    now = 0.0
    while now < 4 * 3600:
        devices = []
        for i in range(n):
            dev = f"d{i}"
            ready = install_at.get(dev)
            if ready is not None and now >= ready:
                if dev in fails:
                    devices.append(
                        DeviceStatus.model_construct(
                            device_id=dev,
                            labels={},
                            online=True,
                            version="1.0.0",
                            update="failed",
                            p99_ms=base_p99[dev],
                            inferences=30,
                            failed=0,
                            reported_at=now,
                        )
                    )
                    first_bad = now if first_bad is None else first_bad
                    continue
                p99 = base_p99[dev] * (1.5 if scenario == "p99 +50%" else rng.uniform(0.95, 1.05))
                errors = 2 if scenario == "errors 6%" else 0
                if scenario in ("p99 +50%", "errors 6%"):
                    first_bad = now if first_bad is None else first_bad
                devices.append(
                    DeviceStatus.model_construct(
                        device_id=dev,
                        labels={},
                        online=True,
                        version="2.0.0",
                        update="committed",
                        p99_ms=p99,
                        inferences=30,
                        failed=errors,
                        reported_at=now,
                    )
                )
            else:
                devices.append(
                    DeviceStatus.model_construct(
                        device_id=dev,
                        labels={},
                        online=True,
                        version="1.0.0",
                        update="none",
                        p99_ms=base_p99[dev],
                        inferences=30,
                        failed=0,
                        reported_at=now,
                    )
                )
        snap = FleetSnapshot.model_construct(devices=tuple(devices))
        t0 = time.perf_counter()
        state, actions = ctrl.advance(state, snap, now)
        advance_ms.append((time.perf_counter() - t0) * 1000)
        for action in actions:
            if action.kind == "assign":
                for dev in action.devices:
                    install_at[dev] = now + rng.uniform(20, 120)
        if any(isinstance(a, Abort | Complete) for a in actions):
            break
        now += tick_s
    decided = now - first_bad if first_bad is not None and state.status == "aborted" else None
    return {
        "scenario": scenario,
        "status": state.status,
        "reason": state.reason or "",
        "decision_s": decided,
        "at_s": now,
        "touched": len(state.assigned),
        "advance_ms": statistics.median(advance_ms),
    }


def advance_cost(n: int) -> float:
    spec = RolloutSpec(
        id="cost",
        model="det",
        version="2.0.0",
        waves=(Wave(percent=1, soak_s=600), Wave(percent=10, soak_s=600), Wave(percent=100)),
    )
    ctrl = RolloutController()
    devices = [
        DeviceStatus(device_id=f"d{i}", version="1.0.0", p99_ms=20.0, inferences=30, reported_at=0)
        for i in range(n)
    ]
    state, _ = ctrl.advance(RolloutState.new(spec), FleetSnapshot(devices=tuple(devices)), 0.0)
    taken = state.assigned_ids()
    devices = [
        d.model_copy(update={"version": "2.0.0", "update": "committed", "reported_at": 5.0})
        if d.device_id in taken
        else d
        for d in devices
    ]
    state, _ = ctrl.advance(state, FleetSnapshot(devices=tuple(devices)), 601.0)  # now wave 2
    taken = state.assigned_ids()
    snap = FleetSnapshot(
        devices=tuple(
            d.model_copy(update={"version": "2.0.0", "update": "committed", "reported_at": 610.0})
            if d.device_id in taken
            else d
            for d in devices
        )
    )
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        ctrl.advance(state, snap, 620.0)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    configure_logging("error")
    print("== broker down 10 min (simulated 1 Hz), 2 rounds, variants interleaved")
    rows: dict[int, list[dict[str, Any]]] = {16 * 1024 * 1024: [], 64 * 1024: []}
    for _ in range(2):
        for bound, results in rows.items():
            results.append(outage_run(bound))
    print(
        f"{'spool bound':>12} {'telemetry produced':>19} {'delivered':>9} {'dropped':>7} "
        f"{'deliv/prod':>10} {'spool peak B':>12} {'events':>6} {'lost':>4} {'order':>5} "
        f"{'enqueue ms':>10} {'drain s':>7}"
    )
    for bound, results in rows.items():
        for r in results:
            print(
                f"{bound:>12} {r['produced_t']:>19} {r['delivered_t']:>9} {r['dropped_t']:>7} "
                f"{r['delivered_t'] / r['produced_t']:>10.3f} {r['spool_peak']:>12} "
                f"{r['events']:>6} {r['lost_e']:>4} {r['in_order']!s:>5} "
                f"{r['spool_ms']:>10.3f} {r['drain_s']:>7.2f}"
            )
    big = statistics.mean(r["delivered_t"] / r["produced_t"] for r in rows[16 * 1024 * 1024])
    small = statistics.mean(r["delivered_t"] / r["produced_t"] for r in rows[64 * 1024])
    print(f"delivered/produced ratio, 64 KiB vs 16 MiB bound: {small / big:.3f}")

    print("\n== rollout decision, 1,000 devices, 1 Hz telemetry, waves 1/10/50/100 %, 2 rounds")
    scenarios = ["p99 +50%", "errors 6%", "failed installs", "healthy"]
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in scenarios}
    for round_ in range(2):
        for s in scenarios:
            tick = 10.0 if s == "healthy" else 1.0  # healthy runs for hours: coarser ticks
            out[s].append(rollout_run(s, 1000, rng_seed=7 + round_, tick_s=tick))
    print(
        f"{'scenario':>16} {'status':>9} {'first bad -> abort s':>20} {'ended at s':>10} "
        f"{'touched':>7} {'advance ms':>10}  reason"
    )
    for s, results in out.items():
        for r in results:
            dec = "-" if r["decision_s"] is None else f"{r['decision_s']:.0f}"
            print(
                f"{s:>16} {r['status']:>9} {dec:>20} {r['at_s']:>10.0f} {r['touched']:>7} "
                f"{r['advance_ms']:>10.3f}  {r['reason']}"
            )

    print("\n== advance() cost by fleet size (wave 2 of 4, all reporting, median ms), interleaved")
    cost: dict[int, list[float]] = {1000: [], 10000: []}
    for _ in range(5):
        for n, ms in cost.items():
            ms.append(advance_cost(n))
    for n, ms in cost.items():
        print(f"{n:>6} devices: {statistics.median(ms):.3f} ms")
    print(
        "ratio 10,000 / 1,000 devices: "
        f"{statistics.median(cost[10000]) / statistics.median(cost[1000]):.2f}"
    )


if __name__ == "__main__":
    main()

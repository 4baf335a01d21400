"""Ingestion and rollout-decision figures through the real Mosquitto, measured in one run.

1. Ingestion: N simulated devices publish 1 Hz telemetry (realistic payloads: one model, system
   metrics) through Mosquitto at 127.0.0.1:1883 from two publisher processes into the ingester
   (this process), writing to PostgreSQL and to SQLite, interleaved per offered rate. Figures:
   stored messages/s over the measured window, backlog at the start and end of it (no growth =
   sustained), messages the broker dropped, CPU seconds per wall second of this process.
2. Rollout decision end to end: 1,000 simulated devices (one process, one MQTT client), enrolled
   in the database, on version 1.0.0 at p99 10 ms. A rollout of 1.1.0 (waves 1/10/50/100 %,
   default rules) runs in the service's runner thread; a device that gets ``check-update``
   installs 1-3 s later and then reports p99 30 ms. Figure: time from the first regressed
   telemetry to the abort, and what was rolled back. (The pure controller alone is measured by
   bench/bench_telemetry.py.)

Run: .venv/bin/python bench/bench_ingest.py   (Mosquitto and PostgreSQL on loopback; ~2 minutes)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.contracts.events import UpdateEvent
from agent.contracts.telemetry import (
    GpuMetrics,
    ModelTelemetry,
    SystemMetrics,
    TelemetryPayload,
    parse_command,
)
from agent.logs import configure_logging
from control_plane.db import make_engine, make_sessionmaker, upgrade_database
from control_plane.db.models import Assignment, Device, Model, ModelVersion, VariantRow
from control_plane.ingest import IngestOptions, MqttLink, TelemetryIngester
from control_plane.rollouts import store
from control_plane.rollouts.service import RolloutService

HOST, PORT = "127.0.0.1", 1883
PG_DSN = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
RATES = (5000, 10000)  # devices at 1 Hz = offered messages/s
WARMUP_S, MEASURE_S = 2.0, 10.0
PUBLISHERS = 2
DECISION_DEVICES = 1000


# -- payloads and publishers (child processes) -----------------------------------------------


def _template(
    device_id: str, model_version: str = "1.0.0", p99: float = 10.0
) -> tuple[str, str, str]:
    """A realistic telemetry payload split around its seq and ts, for cheap rendering."""
    payload = TelemetryPayload(
        device_id=device_id,
        seq=987654321,
        ts=datetime(2000, 1, 1, tzinfo=timezone.utc),
        models=(
            ModelTelemetry(
                name="detector",
                version=model_version,
                variant_id="onnx-int8",
                backend="onnxruntime",
                window_s=1.0,
                count=30,
                failed=0,
                dropped=1,
                throughput_per_s=30.0,
                latency_p50_ms=p99 * 0.5,
                latency_p95_ms=p99 * 0.8,
                latency_p99_ms=p99,
            ),
        ),
        system=SystemMetrics(
            cpu_percent=37.5,
            memory_used_bytes=2_100_000_000,
            memory_total_bytes=8_000_000_000,
            cpu_temperature_c=51.2,
            temperatures_c={"cpu-thermal": 51.2, "gpu-thermal": 48.9},
            gpus=(GpuMetrics(name="orin", utilization_percent=41.0, temperature_c=48.9),),
        ),
    ).model_dump_json()
    head, rest = payload.split("987654321", 1)
    mid, tail = rest.split("2000-01-01T00:00:00Z", 1)
    return head, mid, tail


def _client(name: str) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{name}-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.connect(HOST, PORT, keepalive=60)
    client.loop_start()
    return client


def publish_fleet(prefix: str, device_ids: list[str], seconds: float, sent: Any) -> None:
    """Each device publishes once per second, spread evenly over the second, at QoS 0."""
    client = _client("bench-pub")
    templates = [(f"{prefix}/{d}/telemetry", *_template(d)) for d in device_ids]
    n = len(templates)
    slices = 20
    start = time.time()
    count = 0
    second = 0
    while time.time() - start < seconds:
        for k in range(slices):
            ts = datetime.now(timezone.utc).isoformat()
            for topic, head, mid, tail in templates[k * n // slices : (k + 1) * n // slices]:
                client.publish(topic, f"{head}{second}{mid}{ts}{tail}", qos=0)
                count += 1
            wait = start + second + (k + 1) / slices - time.time()
            if wait > 0:
                time.sleep(wait)
        second += 1
    with sent.get_lock():
        sent.value += count
    client.disconnect()
    client.loop_stop()


# -- 1. ingestion --------------------------------------------------------------------------------


def fresh_postgres() -> tuple[str, str]:
    name = f"edgefleet_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, f"{PG_DSN.rsplit('/', 1)[0]}/{name}"


def drop_postgres(name: str) -> None:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class IngestFigure:
    db: str
    offered: int
    published_per_s: float
    received_per_s: float
    processed_per_s: float
    stored_all: bool
    backlog_start: int
    backlog_end: int
    backlog_max: int
    broker_dropped: int
    cpu_per_s: float
    sustained: bool


def run_ingest(db: str, url: str, rate: int) -> IngestFigure:
    engine = make_engine(url)
    prefix = f"bench-{uuid.uuid4().hex[:8]}/v1"
    link = MqttLink(
        HOST,
        PORT,
        client_id=f"bench-cp-{uuid.uuid4().hex[:8]}",
        topic_prefix=prefix,
        session_expiry_s=0,
    )
    ingester = TelemetryIngester(link, engine, options=IngestOptions())
    ingester.start()
    assert ingester.wait_subscribed(10)
    devices = [f"sim-{i:05d}" for i in range(rate)]
    sent = mp.Value("q", 0)
    total_s = WARMUP_S + MEASURE_S + 1.0
    procs = [
        mp.Process(target=publish_fleet, args=(prefix, devices[i::PUBLISHERS], total_s, sent))
        for i in range(PUBLISHERS)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 30
    while ingester.counters().received < rate and time.monotonic() < deadline:
        time.sleep(0.05)  # the publishers are up (spawned processes start slowly on a busy box)
    time.sleep(WARMUP_S)
    c0, t0, cpu0 = ingester.counters(), time.monotonic(), time.process_time()
    backlog_max = c0.backlog
    while time.monotonic() - t0 < MEASURE_S:
        time.sleep(0.25)
        backlog_max = max(backlog_max, ingester.counters().backlog)
    c1, t1, cpu1 = ingester.counters(), time.monotonic(), time.process_time()
    for p in procs:
        p.join(60)
    last = -1
    while ingester.counters().received != last:  # the broker may still be draining its queue
        last = ingester.counters().received
        time.sleep(1.0)
    ingester.sync(60)
    final = ingester.counters()
    ingester.stop()
    engine.dispose()
    elapsed = t1 - t0

    def processed(c: Any) -> int:
        return int(c.received - c.backlog - c.dropped_overload)

    processed_per_s = (processed(c1) - processed(c0)) / elapsed
    received_per_s = (c1.received - c0.received) / elapsed
    return IngestFigure(
        db=db,
        offered=rate,
        published_per_s=sent.value / total_s,
        received_per_s=received_per_s,
        processed_per_s=processed_per_s,
        stored_all=final.stored == final.received,
        backlog_start=c0.backlog,
        backlog_end=c1.backlog,
        backlog_max=backlog_max,
        broker_dropped=max(0, sent.value - final.received),
        cpu_per_s=(cpu1 - cpu0) / elapsed,
        # Sustained: keeps up with what arrives, the broker dropped nothing, and the backlog did
        # not grow by more than half a second of traffic over the window.
        sustained=processed_per_s >= 0.97 * received_per_s
        and sent.value == final.received
        and c1.backlog - c0.backlog < rate / 2,
    )


# -- 2. rollout decision end to end ----------------------------------------------------------------


def simulate_fleet(
    prefix: str, device_ids: list[str], seconds: float, first_regressed: Any
) -> None:
    """1 Hz telemetry per device; ``check-update`` installs 1.1.0 (p99 x3) after 1-3 s;
    ``rollback`` goes back to 1.0.0. Records when the first regressed window went out."""
    rng = random.Random(7)
    version = dict.fromkeys(device_ids, "1.0.0")
    install_at: dict[str, float] = {}
    old = {d: _template(d, "1.0.0", 10.0) for d in device_ids}
    new = {d: _template(d, "1.1.0", 30.0) for d in device_ids}
    client = _client("bench-fleet")
    seq = 0

    def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        device_id = message.topic.split("/")[-2]
        command = parse_command(bytes(message.payload))
        if command.command == "check-update":
            install_at[device_id] = time.time() + rng.uniform(1.0, 3.0)
        else:
            version[device_id] = "1.0.0"
            install_at.pop(device_id, None)

    client.on_message = on_message
    client.subscribe(f"{prefix}/+/cmd", qos=1)
    start = time.time()
    n = len(device_ids)
    second = 0
    while time.time() - start < seconds:
        for k in range(10):
            now = time.time()
            for device_id, due in list(install_at.items()):
                if due <= now:
                    del install_at[device_id]
                    version[device_id] = "1.1.0"
                    seq += 1
                    event = UpdateEvent(
                        device_id=device_id,
                        seq=seq,
                        ts=datetime.now(timezone.utc),
                        model="detector",
                        version="1.1.0",
                        from_version="1.0.0",
                        step="committed",
                    )
                    client.publish(f"{prefix}/{device_id}/events", event.model_dump_json(), qos=1)
            ts = datetime.now(timezone.utc).isoformat()
            for device_id in device_ids[k * n // 10 : (k + 1) * n // 10]:
                head, mid, tail = (new if version[device_id] == "1.1.0" else old)[device_id]
                if version[device_id] == "1.1.0" and first_regressed.value == 0:
                    first_regressed.value = time.time()
                client.publish(
                    f"{prefix}/{device_id}/telemetry", f"{head}{second}{mid}{ts}{tail}", qos=0
                )
            wait = start + second + (k + 1) / 10 - time.time()
            if wait > 0:
                time.sleep(wait)
        second += 1
    client.disconnect()
    client.loop_stop()


def seed_fleet(sessions: Any, device_ids: list[str]) -> None:
    now = datetime.now(timezone.utc)
    profile = {
        "arch": "x86_64",
        "os": "linux",
        "python": "3.11",
        "cpu": {"cores": 2},
        "memory_bytes": 1 << 33,
    }
    with sessions() as s, s.begin():
        model = Model(name="detector", description="", accuracy_budget=1.0, created_at=now)
        s.add(model)
        s.flush()
        for v in ("1.0.0", "1.1.0"):
            version = ModelVersion(
                model_id=model.id,
                version=v,
                status="ready",
                source_sha256="0" * 64,
                source_size=1,
                manifest=None,
                created_at=now,
                created_by="bench",
            )
            s.add(version)
            s.flush()
            s.add(
                VariantRow(
                    version_id=version.id,
                    variant_id="onnx-fp32",
                    runtime="onnxruntime",
                    format="onnx",
                    precision="fp32",
                    status="accepted",
                    spec={},
                    archive_sha256="a" * 64,
                    archive_size=1,
                )
            )
            if v == "1.0.0":
                s.add(
                    Assignment(
                        model_id=model.id,
                        version_id=version.id,
                        device_id=None,
                        selector={"site": "bench"},
                        created_at=now,
                        created_by="bench",
                    )
                )
        for i, device_id in enumerate(device_ids):
            s.add(
                Device(
                    id=device_id,
                    name=f"robot-{i}",
                    token_hash=uuid.uuid4().hex * 2,
                    labels={"site": "bench"},
                    profile=profile,
                    enrolled_at=now,
                )
            )


@dataclass
class DecisionFigure:
    db: str
    decision_s: float
    reason: str
    assigned: int
    rolled_back: int
    commands: int


def run_decision(db: str, url: str) -> DecisionFigure:
    engine = make_engine(url)
    upgrade_database(engine)
    sessions = make_sessionmaker(engine)
    prefix = f"bench-{uuid.uuid4().hex[:8]}/v1"
    device_ids = [f"dev-{i:05d}" for i in range(DECISION_DEVICES)]
    seed_fleet(sessions, device_ids)
    link = MqttLink(
        HOST,
        PORT,
        client_id=f"bench-cp-{uuid.uuid4().hex[:8]}",
        topic_prefix=prefix,
        session_expiry_s=0,
    )
    ingester = TelemetryIngester(link, engine)
    ingester.start()
    assert ingester.wait_subscribed(10)
    service = RolloutService(sessions, commands=ingester, interval_s=1.0)
    first_regressed = mp.Value("d", 0.0)
    fleet = mp.Process(target=simulate_fleet, args=(prefix, device_ids, 90.0, first_regressed))
    fleet.start()
    deadline = time.time() + 60
    while ingester.counters().received < 3 * DECISION_DEVICES and time.time() < deadline:
        time.sleep(0.1)  # baselines: every device has reported 1.0.0 a few times
    ingester.sync(30)
    service.create(
        model="detector",
        version="1.1.0",
        selector={"site": "bench"},
        waves=[{"percent": p, "soak_s": 600} for p in (1, 10, 50, 100)],
        rules={},
        actor="bench",
        rollout_id="bench-rollout",
    )
    service.start()
    aborted_at = None
    deadline = time.time() + 80
    while time.time() < deadline:
        with sessions() as s:
            _, state = store.load(s, "bench-rollout")
        if state.status == "aborted":
            aborted_at = time.time()
            break
        time.sleep(0.05)
    service.stop()
    fleet.terminate()
    fleet.join(10)
    counters = ingester.counters()
    ingester.stop()
    engine.dispose()
    if aborted_at is None:
        raise RuntimeError(f"{db}: no abort within 80 s: {state.status} {state.health}")
    return DecisionFigure(
        db=db,
        decision_s=aborted_at - first_regressed.value,
        reason=state.reason or "",
        assigned=len(state.assigned),
        rolled_back=len(state.rolled_back),
        commands=counters.commands_sent,
    )


def main() -> None:
    configure_logging("warning")
    pg_name, pg_url = fresh_postgres()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    sqlite_url = f"sqlite:///{tmp / 'cp.db'}"
    try:
        for url in (pg_url, sqlite_url):
            engine = make_engine(url)
            upgrade_database(engine)
            engine.dispose()
        figures: list[IngestFigure] = []
        for rate in RATES:  # interleaved: each rate on both databases back to back
            for db, url in (("postgresql", pg_url), ("sqlite", sqlite_url)):
                figures.append(run_ingest(db, url, rate))
                print(f"  measured {db} at {rate}/s", file=sys.stderr)
        print(
            f"\n1. Ingestion: N devices at 1 Hz via Mosquitto ({os.cpu_count()} CPUs, "
            f"{PUBLISHERS} publisher processes, {MEASURE_S:.0f} s measured)"
        )
        print(
            f"{'db':<11}{'offered/s':>10}{'published/s':>12}{'received/s':>11}{'processed/s':>12}"
            f"{'backlog start->end':>19}{'max':>7}{'broker drop':>12}{'cpu s/s':>8}"
            f"{'all stored':>11}  sustained"
        )
        for f in figures:
            print(
                f"{f.db:<11}{f.offered:>10}{f.published_per_s:>12.0f}{f.received_per_s:>11.0f}"
                f"{f.processed_per_s:>12.0f}{f'{f.backlog_start}->{f.backlog_end}':>19}"
                f"{f.backlog_max:>7}{f.broker_dropped:>12}{f.cpu_per_s:>8.2f}"
                f"{'yes' if f.stored_all else 'no':>11}  {'yes' if f.sustained else 'NO'}"
            )
        for rate in RATES:
            pg = next(f for f in figures if f.db == "postgresql" and f.offered == rate)
            lite = next(f for f in figures if f.db == "sqlite" and f.offered == rate)
            print(
                f"ratio sqlite/postgresql processed/s at {rate}/s: "
                f"{lite.processed_per_s / pg.processed_per_s:.2f}"
            )

        decisions: list[DecisionFigure] = []
        pg2_name, pg2_url = fresh_postgres()
        try:
            decisions.append(run_decision("postgresql", pg2_url))
            decisions.append(run_decision("sqlite", f"sqlite:///{tmp / 'decision.db'}"))
        finally:
            drop_postgres(pg2_name)
        print(
            f"\n2. Rollout decision end to end: {DECISION_DEVICES} devices at 1 Hz, waves "
            "1/10/50/100 %, p99 x3 on the new version, runner every 1 s"
        )
        print(
            f"{'db':<11}{'first regressed telemetry -> abort':>36}{'assigned':>10}"
            f"{'rolled back':>13}{'commands':>10}  reason"
        )
        for d in decisions:
            print(
                f"{d.db:<11}{d.decision_s:>34.1f} s{d.assigned:>10}{d.rolled_back:>13}"
                f"{d.commands:>10}  {d.reason}"
            )
    finally:
        drop_postgres(pg_name)


if __name__ == "__main__":
    mp.set_start_method("spawn")
    main()

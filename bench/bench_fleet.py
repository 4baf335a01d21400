"""Simulated fleet against 1 and 2 `edgectl serve` replicas behind HAProxy, side by side.

Each run: a fresh PostgreSQL database, N replicas (`edgectl serve`, one shared data directory,
MQTT 5 shared subscription group for telemetry), HAProxy in front (health checks on /readyz).
N simulated devices then

1. enroll through the balancer (32 at a time): devices/s and p99 latency;
2. poll their desired state with ETag every --interval seconds (+-20 % jitter) for --duration
   seconds: polls/s, p99 latency, errors;
3. publish telemetry (QoS 0, one window per message) at --rate messages/s for --duration
   seconds: offered (publisher), received / stored / dropped (the replicas' counters) and
   unaccounted = offered - received (lost before any ingester saw it: the broker's queue).

Last, ``RolloutController.advance()`` is timed on a 10,000-device snapshot (pure, no I/O).
Prerequisites: PostgreSQL on 127.0.0.1:5432, Mosquitto on 127.0.0.1:1883, haproxy (make services).

    .venv/bin/python bench/bench_fleet.py                       # 1,000 devices, 20 s phases
    .venv/bin/python bench/bench_fleet.py --devices 10000 --rate 10000 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.contracts.profile import CpuInfo, HardwareProfile, RuntimeInfo
from control_plane.rollouts import (
    DeviceStatus,
    FleetSnapshot,
    RolloutController,
    RolloutRules,
    RolloutSpec,
    RolloutState,
    Wave,
)

PG = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN = "bench-admin-token-0123456789abcdef"
BOOTSTRAP = "bench-bootstrap-token-0123456789abcdef"
PROFILE = HardwareProfile(
    arch="x86_64",
    os="linux",
    python="3.11",
    cpu=CpuInfo(cores=2, flags=("avx2",)),
    memory_bytes=8 * 1024**3,
    runtimes=(RuntimeInfo(name="onnxruntime", version="1.20.1"),),
).model_dump(mode="json")
HAPROXY = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
    retry-on conn-failure empty-response 503
frontend api
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 check
{servers}
"""
_METRIC = re.compile(r"^edgefleet_cp_ingest_(\w+)_total (\S+)$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not come up")


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


class Stack:
    """A fresh database, `replicas` x `edgectl serve`, HAProxy in front."""

    def __init__(self, replicas: int, work: Path) -> None:
        self.replicas, self.work = replicas, work
        self.db = f"edgefleet_bench_{uuid.uuid4().hex[:8]}"
        self.group = f"bench{uuid.uuid4().hex[:6]}"
        self.prefix = f"benchfleet-{uuid.uuid4().hex[:6]}/v1"
        self.ports = [free_port() for _ in range(replicas)]
        self.lb_port = free_port()
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Stack:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        url = PG.rsplit("/", 1)[0] + "/" + self.db
        edgectl = str(Path(sys.executable).with_name("edgectl"))
        for i, port in enumerate(self.ports):
            env = {
                **os.environ,
                "EDGEFLEET_CP__DATA_DIR": str(self.work / "data"),
                "EDGEFLEET_CP__DATABASE_URL": url,
                "EDGEFLEET_CP__ADMIN_TOKEN": ADMIN,
                "EDGEFLEET_CP__BOOTSTRAP_TOKEN": BOOTSTRAP,
                "EDGEFLEET_CP__PORT": str(port),
                "EDGEFLEET_CP__LOG_LEVEL": "warning",
                "EDGEFLEET_CP__REPLICA_ID": f"bench-{i}",
                "EDGEFLEET_CP__MQTT_HOST": "127.0.0.1",
                "EDGEFLEET_CP__MQTT_CLIENT_ID": f"{self.group}-{i}",
                "EDGEFLEET_CP__MQTT_TOPIC_PREFIX": self.prefix,
                "EDGEFLEET_CP__MQTT_SHARED_GROUP": self.group,
                "EDGEFLEET_CP__MQTT_SESSION_EXPIRY_S": "0",
            }
            self.processes.append(subprocess.Popen([edgectl, "serve"], env=env))
            wait_http(f"http://127.0.0.1:{port}/readyz")  # one at a time: first one migrates
        servers = "\n".join(f"    server r{i} 127.0.0.1:{p}" for i, p in enumerate(self.ports))
        cfg = self.work / f"haproxy-{self.replicas}.cfg"
        cfg.write_text(HAPROXY.format(port=self.lb_port, servers=servers))
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.processes.append(subprocess.Popen([haproxy, "-db", "-f", str(cfg)]))
        wait_http(f"{self.url}/readyz")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def ingest_counters(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for port in self.ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for name, value in _METRIC.findall(text):
                total[name] = total.get(name, 0.0) + float(value)
        return total

    def __exit__(self, *exc: object) -> None:
        for p in reversed(self.processes):
            p.terminate()
        for p in self.processes:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


async def enroll_all(
    url: str, n: int, concurrency: int = 32
) -> tuple[list[Any], list[float], float]:
    latencies: list[float] = []
    devices: list[Any] = [None] * n
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {
                    "bootstrap_token": BOOTSTRAP,
                    "name": f"sim-{i}",
                    "profile": PROFILE,
                    "labels": {"site": "bench", "group": str(i % 4)},
                }
                t0 = time.perf_counter()
                r = await client.post("/v1/devices/enroll", json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                out = r.json()
                devices[i] = (out["device_id"], f"Bearer {out['credential']}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return devices, latencies, time.perf_counter() - t0


async def poll_all(
    url: str, devices: list[Any], interval: float, duration: float
) -> tuple[int, int, list[float], float]:
    latencies: list[float] = []
    errors = [0]
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    end = time.monotonic() + duration
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def device(device_id: str, auth: str) -> None:
            etag: str | None = None
            await asyncio.sleep(random.uniform(0, interval))
            while time.monotonic() < end:
                headers = {"Authorization": auth}
                if etag:
                    headers["If-None-Match"] = etag
                t0 = time.perf_counter()
                try:
                    r = await client.get(f"/v1/devices/{device_id}/desired-state", headers=headers)
                except httpx.HTTPError:
                    errors[0] += 1
                else:
                    latencies.append(time.perf_counter() - t0)
                    if r.status_code == 200:
                        etag = r.headers.get("ETag")
                    elif r.status_code != 304:
                        errors[0] += 1
                await asyncio.sleep(interval * random.uniform(0.8, 1.2))

        t0 = time.perf_counter()
        await asyncio.gather(*(device(d, a) for d, a in devices))
        elapsed = time.perf_counter() - t0
    return len(latencies), errors[0], latencies, elapsed


def publish_telemetry(prefix: str, device_ids: list[str], rate: float, duration: float) -> int:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    template = (
        '{"schema_version":1,"device_id":"%s","seq":%d,"ts":"%s","models":[{"name":"det",'
        '"version":"1.0.0","backend":"onnxruntime","window_s":1.0,"count":30,"failed":0,'
        '"dropped":0,"throughput_per_s":30.0,"latency_p50_ms":5.0,"latency_p95_ms":8.0,'
        '"latency_p99_ms":9.0}]}'
    )
    offered, seq = 0, 0
    start = time.perf_counter()
    batch = max(1, int(rate / 100))  # publish in 10 ms slices
    while (elapsed := time.perf_counter() - start) < duration:
        due = int(elapsed * rate)
        if offered >= due:
            time.sleep(0.002)
            continue
        ts = datetime.now(timezone.utc).isoformat()
        for _ in range(min(batch, due - offered)):
            dev = device_ids[offered % len(device_ids)]
            if offered % len(device_ids) == 0:
                seq += 1
            client.publish(f"{prefix}/{dev}/telemetry", template % (dev, seq, ts), qos=0)
            offered += 1
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    return offered


def advance_ms(n: int) -> float:
    spec = RolloutSpec(
        id="bench-advance",
        model="det",
        version="2.0.0",
        waves=(
            Wave(percent=1, soak_s=300),
            Wave(percent=10, soak_s=300),
            Wave(percent=100, soak_s=0),
        ),
        rules=RolloutRules(min_devices_reporting=3, min_reporting_share=0.5),
    )
    ctrl = RolloutController()
    state = RolloutState.new(spec)
    now, timings = 0.0, []
    assigned: set[str] = set()
    for _ in range(30):
        devices = tuple(
            DeviceStatus.model_construct(
                device_id=f"d{i}",
                labels={},
                online=True,
                version="2.0.0" if f"d{i}" in assigned else "1.0.0",
                update="committed" if f"d{i}" in assigned else "none",
                p99_ms=20.0,
                inferences=30,
                failed=0,
                reported_at=now,
            )
            for i in range(n)
        )
        snap = FleetSnapshot.model_construct(devices=devices)
        if state.status in ("completed", "aborted"):
            break
        t0 = time.perf_counter()
        state, actions = ctrl.advance(state, snap, now)
        timings.append((time.perf_counter() - t0) * 1000)
        for action in actions:
            assigned.update(getattr(action, "devices", ()))
        now += 30
    return statistics.median(timings)


def run(replicas: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with Stack(replicas, work / f"r{replicas}") as stack:
        devices, enroll_lat, enroll_s = asyncio.run(enroll_all(stack.url, args.devices))
        polls, poll_errors, poll_lat, poll_s = asyncio.run(
            poll_all(stack.url, devices, args.interval, args.duration)
        )
        before = stack.ingest_counters()
        offered = publish_telemetry(stack.prefix, [d for d, _ in devices], args.rate, args.duration)
        deadline = time.monotonic() + 60
        while True:  # until every received message is stored or counted, or a minute passes
            after = stack.ingest_counters()
            got = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            settled = got.get("stored", 0) + sum(
                got.get(k, 0) for k in got if k.startswith("dropped_") or k == "duplicates"
            )
            if settled >= got.get("received", 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    dropped = sum(v for k, v in got.items() if k.startswith("dropped_"))
    return {
        "enroll/s": args.devices / enroll_s,
        "enroll p99 ms": p99(enroll_lat) * 1000,
        "polls/s": polls / poll_s,
        "poll p99 ms": p99(poll_lat) * 1000,
        "poll errors": poll_errors,
        "telemetry offered": offered,
        "received": got.get("received", 0),
        "stored": got.get("stored", 0),
        "dropped (counted)": dropped,
        "unaccounted": offered - got.get("received", 0),
        "stored/s": got.get("stored", 0) / args.duration,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--devices", type=int, default=1000, help="simulated devices (10000: a site)"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between polls")
    parser.add_argument("--rate", type=float, default=2000.0, help="telemetry messages/s offered")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        results = {n: run(n, args, Path(tmp)) for n in (1, 2)}
    print(
        f"\n{args.devices} devices, polls every {args.interval:g} s, telemetry {args.rate:g}/s "
        f"for {args.duration:g} s, this machine: {os.cpu_count()} CPUs (shared by all)"
    )
    print(f"{'':22}{'1 replica':>14}{'2 replicas':>14}{'2/1':>8}")
    for key in results[1]:
        one, two = results[1][key], results[2][key]
        ratio = f"{two / one:.2f}" if isinstance(one, float) and one else ""
        fmt = (lambda v: f"{v:,.1f}") if isinstance(one, float) else (lambda v: f"{v:,}")
        print(f"{key:22}{fmt(one):>14}{fmt(two):>14}{ratio:>8}")
    print(f"\nRolloutController.advance() at 10,000 devices: {advance_ms(10_000):.1f} ms (median)")


if __name__ == "__main__":
    main()

"""Simulated fleet against 1 and 2 `edgectl serve` replicas behind HAProxy, side by side.

Each run: a fresh PostgreSQL database, N replicas (`edgectl serve`, one shared data directory,
MQTT 5 shared subscription group for telemetry), HAProxy in front (health checks on /readyz),
a bootstrap token binding ``site=bench``. Simulated devices then

1. enroll through the balancer. With wrk (the default when it is on PATH): --repeats runs of
   --enroll-s seconds flat out on 32 connections, and as many paced to offer --enroll-rate
   devices/s (128 connections with +-20 % jittered pauses): devices/s and p99 of each, medians
   over the runs. With ``--client httpx``: --devices enrollments 32 at a time;
2. poll their desired state with If-None-Match (every answer a 304). With wrk: after a warm-up
   in which every device polls every replica, the offered rate steps up (500/s to 10,000/s,
   --step-s seconds a step, 200 connections, +-20 % jitter between a connection's polls, so a
   device polls every devices/rate seconds) until p99 reaches 50 ms, a request fails or the
   replicas fall 10 % behind the offer (a failed step is tried once more); the figure is the
   highest rate that passed, median over --repeats searches. With ``--client httpx``: every
   --interval seconds (+-20 %) for --duration seconds: polls/s, p99, errors;
3. publish telemetry (QoS 0, one window per message) at --rate messages/s for --duration
   seconds: offered (publisher), received / stored / dropped (the replicas' counters), shed by
   the broker (its ``$SYS/broker/publish/messages/dropped``, which the replicas export as
   ``edgefleet_cp_broker_dropped_messages``) and unaccounted = offered - received - shed;
4. (2 replicas; ``--no-rollout`` skips it) roll digits 1.0.0 out to exactly --devices devices
   in waves of 1/2/5/10/100 % (soak 0, every device must report): each wave's devices publish
   telemetry on the new version and a ``committed`` event over MQTT (QoS 1); measured is the
   time from the broker's acknowledgement of a wave's last report to the next wave's
   assignment in a device's desired state read through the balancer. Before the last wave the
   replica holding the rollout runner's lease is killed (SIGKILL) just before the reports go
   out: fail-over is the time from the kill to the last wave's assignment, made by the other
   replica.

wrk runs on CPU 0 (``taskset -c 0``); the replicas, HAProxy, PostgreSQL and Mosquitto are left
to the kernel on every CPU, and on a shared machine other users' work is on them too: the
output says so and prints the load average. Last, ``RolloutController.advance()`` is timed on
a 10,000-device snapshot (pure, no I/O). Prerequisites: PostgreSQL on 127.0.0.1:5432,
Mosquitto on 127.0.0.1:1883, haproxy and wrk (``make services``).

    .venv/bin/python bench/bench_fleet.py                       # 1,000 devices
    .venv/bin/python bench/bench_fleet.py --devices 10000 --rate 2000 --duration 10
    .venv/bin/python bench/bench_fleet.py --client httpx --devices 300 --duration 8
    .venv/bin/python bench/bench_fleet.py --only-rollout --devices 10000 --rate 0
    .venv/bin/python bench/bench_fleet.py --only-telemetry --devices 10000 --rate 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
import numpy as np
import paho.mqtt.client as mqtt
import psycopg
from bench_poll import WRK_SCRIPT as POLL_SCRIPT  # the If-None-Match poll script, paced here
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
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
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
LOAD_CPU = 0  # wrk runs on this CPU (taskset); the replicas, HAProxy and PostgreSQL go anywhere
LOAD_PIN = (
    ["taskset", "-c", str(LOAD_CPU)]
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset")
    else []
)
_LEADER = re.compile(r"^edgefleet_cp_rollout_leader (\S+)$", re.M)
_METRIC = re.compile(r"^edgefleet_cp_ingest_(\w+)_total (\S+)$", re.M)
_BROKER_DROPPED = re.compile(r"^edgefleet_cp_broker_dropped_messages (\S+)$", re.M)


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


# wrk enrollment: each request enrolls one device with a unique name; every 201 answer's device
# id and credential go to this thread's file (args: out prefix, profile JSON file, token, and
# optionally a mean pause in ms between a connection's requests, +-20 %, to offer a fixed rate).
WRK_ENROLL = r"""
local created = 0
function setup(thread)
  thread:set("thread_index", created)
  created = created + 1
end
function init(args)
  out = io.open(args[1] .. "." .. thread_index, "w")
  out:setvbuf("line")
  local f = io.open(args[2]); profile = f:read("*a"); f:close()
  token, sent, refused = args[3], 0, 0
  local mean_delay = tonumber(args[4] or "0")
  if mean_delay > 0 then
    math.randomseed(thread_index + 1)
    function delay() return math.floor(mean_delay * (0.8 + 0.4 * math.random())) end
  end
end
function request()
  sent = sent + 1
  local body = string.format(
    '{"bootstrap_token":"%s","name":"sim-%d-%d","profile":%s,"labels":{"site":"bench"}}',
    token, thread_index, sent, profile)
  return wrk.format("POST", "/v1/devices/enroll", {["Content-Type"] = "application/json"}, body)
end
function response(status, headers, body)
  if status == 201 then
    out:write(body:match('"device_id":"([^"]+)"'), "\t", body:match('"credential":"([^"]+)"'), "\n")
  else
    refused = refused + 1
  end
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "edgefleet-wrk requests=%d duration_us=%d p50=%d p99=%d max=%d status=%d connect=%d " ..
    "read=%d write=%d timeout=%d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, e.status, e.connect, e.read,
    e.write, e.timeout))
end
"""


def wrk_figures(command: list[str]) -> dict[str, float]:
    """Run wrk (pinned by the caller's command) and parse the line the script's done() prints."""
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((x for x in run.stdout.splitlines() if x.startswith("edgefleet-")), None)
    if run.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({run.returncode}): {run.stdout}{run.stderr}")
    figures = {k: float(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    figures["seconds"] = figures["duration_us"] / 1e6
    figures["errors"] = sum(
        figures.get(k, 0) for k in ("status", "not_304", "connect", "read", "write", "timeout")
    )
    return figures


def wrk_enroll(
    url: str,
    token: str,
    seconds: float,
    work: Path,
    connections: int = 32,
    rate: float | None = None,
) -> dict[str, Any]:
    """Enroll for ``seconds`` through the balancer with wrk, as fast as ``connections`` go or
    paced to offer ``rate`` devices/s: devices/s, p99, the devices. Paced: each connection
    pauses between requests; a 2 s run first measures the answers' own time, which the pause
    then leaves out, so what is offered is ``rate`` (its devices are kept, its figures not)."""
    script, profile = work / "enroll.lua", work / "profile.json"
    script.write_text(WRK_ENROLL)
    profile.write_text(json.dumps(PROFILE, separators=(",", ":")))
    devices: list[Any] = []

    def one(duration: float, pause_ms: float) -> dict[str, float]:
        out = work / f"enrolled-{uuid.uuid4().hex[:6]}"
        command = [
            *LOAD_PIN,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            str(out),
            str(profile),
            token,
            f"{pause_ms:.3f}",
        ]
        figures = wrk_figures(command)
        got = 0
        for part in work.glob(out.name + ".*"):
            for line in part.read_text().splitlines():
                device_id, credential = line.split("\t")
                devices.append((device_id, f"Bearer {credential}"))
                got += 1
        figures["rate"] = got / figures["seconds"]
        return figures

    if rate:
        pause_ms = connections / rate * 1000
        trial = one(2, pause_ms)
        answer_ms = max(0.0, connections / max(trial["rate"], 1.0) * 1000 - pause_ms)
        figures = one(seconds, max(1.0, pause_ms - answer_ms))
    else:
        figures = one(seconds, 0)
    return {
        "rate": figures["rate"],
        "p99_ms": figures["p99"] / 1e3,
        "errors": figures["errors"],
        "devices": devices,
    }


async def first_polls(url: str, devices: list[Any], path: Path) -> None:
    """Each device's desired state once (not timed): its ETag, for the 304 polls that follow."""
    sem = asyncio.Semaphore(32)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def one(device_id: str, auth: str) -> str:
            async with sem:
                poll = f"/v1/devices/{device_id}/desired-state"
                r = await client.get(poll, headers={"Authorization": auth})
                r.raise_for_status()
                return f"{poll}\t{auth}\t{r.headers['ETag']}\n"

        lines = await asyncio.gather(*(one(d, a) for d, a in devices))
    path.write_text("".join(lines))


def wrk_poll_step(
    url: str, polls: Path, work: Path, rate: float, seconds: float, connections: int
) -> dict[str, float]:
    """Paced If-None-Match polls: each of ``connections`` waits ``connections / rate`` s
    (+-20 %) between its polls, so wrk offers about ``rate`` polls/s."""
    script = work / "poll.lua"
    script.write_text(POLL_SCRIPT)
    mean_delay_ms = connections / rate * 1000
    command = [
        *LOAD_PIN,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        str(polls),
        "1",
        f"{mean_delay_ms:.3f}",
    ]
    figures = wrk_figures(command)
    return {
        "offered": rate,
        "rate": figures["requests"] / figures["seconds"],
        "p99_ms": figures["p99"] / 1e3,
        "errors": figures["errors"],
    }


POLL_RATES = (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 7000, 8000, 10000)


def poll_search(
    url: str, polls: Path, work: Path, step_s: float, connections: int = 200
) -> tuple[dict[str, float] | None, list[dict[str, float]]]:
    """Step the offered poll rate up until p99 reaches 50 ms, an error appears, or the server
    falls 10 % behind what is offered (twice in a row); the last step that passed, and every
    step."""
    best, steps = None, []
    for rate in POLL_RATES:
        for _attempt in range(2):  # a step that fails is tried once more (a shared machine)
            step = wrk_poll_step(url, polls, work, rate, step_s, connections)
            steps.append(step)
            ok = step["p99_ms"] < 50 and step["errors"] == 0 and step["rate"] >= 0.9 * rate
            if ok:
                break
        print(
            f"    offered {rate:>6,}/s: {step['rate']:8,.0f}/s p99 {step['p99_ms']:6.1f} ms "
            f"errors {step['errors']:.0f} {'ok' if ok else 'stop'}",
            flush=True,
        )
        if not ok:
            break
        best = step
    return best, steps


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
        # the devices' site label comes with their bootstrap token, so a rollout selects them
        r = httpx.post(
            f"{self.url}/v1/bootstrap-tokens",
            json={"name": "bench", "labels": {"site": "bench"}, "max_uses": 100_000},
            headers=ADMIN_HEADERS,
            timeout=30,
        )
        r.raise_for_status()
        self.bootstrap = str(r.json()["token"])
        return self

    @property
    def db_url(self) -> str:
        return PG.rsplit("/", 1)[0] + "/" + self.db

    def leader(self) -> int | None:
        """The index of the replica holding the rollout runner's lease, if one does."""
        for i, (port, process) in enumerate(zip(self.ports, self.processes, strict=False)):
            if process.poll() is not None:
                continue
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                continue
            match = _LEADER.search(text)
            if match is not None and float(match.group(1)) == 1.0:
                return i
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}"

    def ingest_counters(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for port in self.ports:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            for name, value in _METRIC.findall(text):
                total[name] = total.get(name, 0.0) + float(value)
            for value in _BROKER_DROPPED.findall(text):  # the broker's count, not a replica's
                total["broker_dropped"] = max(total.get("broker_dropped", 0.0), float(value))
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
    url: str, n: int, token: str = BOOTSTRAP, concurrency: int = 32
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
                    "bootstrap_token": token,
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


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run(replicas: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    stack_work = work / f"r{replicas}"
    stack_work.mkdir(parents=True)
    out: dict[str, Any] = {}
    with Stack(replicas, stack_work) as stack:
        print(f"{replicas} replica(s):", flush=True)
        if args.only_rollout or args.only_telemetry:  # enrolled untimed, then one phase
            devices, _, _ = asyncio.run(enroll_all(stack.url, args.devices, stack.bootstrap))
            if args.only_telemetry:
                out.update(telemetry(stack, [d for d, _ in devices], args))
            else:
                out.update(rollout(stack, devices, stack_work))
            return out
        if args.client == "wrk":
            devices: list[Any] = []
            rates, p99s, paced_rates, paced_p99s, errors = [], [], [], [], 0.0
            for _ in range(args.repeats):
                enrolled = wrk_enroll(stack.url, stack.bootstrap, args.enroll_s, stack_work)
                paced = wrk_enroll(
                    stack.url,
                    stack.bootstrap,
                    args.enroll_s,
                    stack_work,
                    connections=128,
                    rate=args.enroll_rate,
                )
                for run_ in (enrolled, paced):
                    devices += run_["devices"]
                    errors += run_["errors"]
                rates.append(enrolled["rate"])
                p99s.append(enrolled["p99_ms"])
                paced_rates.append(paced["rate"])
                paced_p99s.append(paced["p99_ms"])
                print(
                    f"  enroll: {enrolled['rate']:6.0f}/s p99 {enrolled['p99_ms']:.0f} ms "
                    f"(32 connections, flat out); offered {args.enroll_rate:g}/s: "
                    f"{paced['rate']:6.0f}/s p99 {paced['p99_ms']:.0f} ms",
                    flush=True,
                )
            out["enroll/s flat out"] = median(rates)
            out["  p99 ms (flat out)"] = median(p99s)
            out[f"enroll/s ({args.enroll_rate:g} offered)"] = median(paced_rates)
            out["  p99 ms (paced)"] = median(paced_p99s)
            out["enroll errors"] = int(errors)
            if len(devices) < args.devices:  # the rest, untimed, for the poll phase
                more, _, _ = asyncio.run(
                    enroll_all(stack.url, args.devices - len(devices), stack.bootstrap)
                )
                devices += more
            devices = devices[: args.devices]
            polls_file = stack_work / "polls.tsv"
            asyncio.run(first_polls(stack.url, devices, polls_file))
            # every device polls every replica a few times first: credential and desired-state
            # caches warm, as on a fleet that has been polling for a while
            warm_s = min(30.0, 4 * replicas * len(devices) / 2000 + 2)
            wrk_poll_step(stack.url, polls_file, stack_work, 2000, warm_s, 200)
            best_rates, best_p99s = [], []
            for _ in range(args.repeats):
                best, _steps = poll_search(stack.url, polls_file, stack_work, args.step_s)
                best_rates.append(best["rate"] if best else 0.0)
                best_p99s.append(best["p99_ms"] if best else float("nan"))
            out["polls/s at p99<50ms"] = median(best_rates)
            out["  poll p99 ms there"] = median(best_p99s)
        else:
            devices, enroll_lat, enroll_s = asyncio.run(
                enroll_all(stack.url, args.devices, stack.bootstrap)
            )
            polls, poll_errors, poll_lat, poll_s = asyncio.run(
                poll_all(stack.url, devices, args.interval, args.duration)
            )
            out["enroll/s"] = args.devices / enroll_s
            out["enroll p99 ms"] = p99(enroll_lat) * 1000
            out["polls/s"] = polls / poll_s
            out["poll p99 ms"] = p99(poll_lat) * 1000
            out["poll errors"] = poll_errors
        if args.rate > 0:
            out.update(telemetry(stack, [d for d, _ in devices], args))
        if replicas == 2 and args.rollout:
            out.update(rollout(stack, devices, stack_work))
    return out


def telemetry(stack: Stack, device_ids: list[str], args: argparse.Namespace) -> dict[str, Any]:
    before = stack.ingest_counters()
    offered = publish_telemetry(stack.prefix, device_ids, args.rate, args.duration)
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
    # What the broker shed, it says in $SYS every sys_interval (10 s by default)
    deadline = time.monotonic() + 25
    while got.get("received", 0) + got.get("broker_dropped", 0) < offered:
        if time.monotonic() > deadline:
            break
        time.sleep(1.0)
        after = stack.ingest_counters()
        got["broker_dropped"] = after.get("broker_dropped", 0) - before.get("broker_dropped", 0)
    dropped = sum(v for k, v in got.items() if k.startswith("dropped_"))
    shed = got.get("broker_dropped", 0)
    return {
        "telemetry offered": offered,
        "received": got.get("received", 0),
        "stored": got.get("stored", 0),
        "dropped (counted)": dropped,
        "shed by the broker ($SYS)": shed,
        "unaccounted": offered - got.get("received", 0) - shed,
        "stored/s": got.get("stored", 0) / args.duration,
    }


ROLLOUT_WAVES = (1, 2, 5, 10, 100)  # percent; soak 0: a wave is promoted once all report
EVERYWHERE_WAIT_S = 10.0  # how long to wait for every replica to answer a new wave


def push_digits(url: str, work: Path) -> None:
    """The digits CNN as digits 1.0.0, built and signed (what a rollout needs)."""
    from agent.samples import digits_cnn, digits_data

    calibration = work / "cal.npz"
    np.savez(calibration, input=digits_data().x_train[:64])
    with httpx.Client(base_url=url, timeout=300, headers=ADMIN_HEADERS) as admin:
        admin.post("/v1/models", json={"name": "digits"}).raise_for_status()
        files = {"onnx": digits_cnn().read_bytes(), "calibration": calibration.read_bytes()}
        r = admin.post(
            "/v1/models/digits/versions",
            data={"version": "1.0.0"},
            files={k: (k, v) for k, v in files.items()},
        )
        r.raise_for_status()
        job_id = r.json()["job"]["id"]
        deadline = time.monotonic() + 600
        while (job := admin.get(f"/v1/jobs/{job_id}").json())["status"] not in (
            "succeeded",
            "failed",
        ):
            if time.monotonic() > deadline:
                raise SystemExit("the digits build did not finish in 10 minutes")
            time.sleep(0.5)
        if job["status"] != "succeeded":
            raise SystemExit(f"the digits build failed: {job['error']}")


def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.01) -> float:
    """Poll ``predicate`` until it holds; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)
    return time.monotonic()


def rollout(stack: Stack, devices: list[Any], work: Path) -> dict[str, Any]:
    """digits 1.0.0 to every device in waves; the simulated devices of each wave report over
    MQTT (telemetry on the new version, then a ``committed`` event); measured: from the last
    report of a wave to the next wave's assignment in a device's desired state (through the
    balancer), and, before the last wave, from ``kill -9`` of the runner's holder to the next
    wave's assignment made by the other replica."""
    keep = [d for d, _ in devices]
    with psycopg.connect(stack.db_url, autocommit=True) as db:
        # the rollout is at exactly --devices devices: the extra ones enrolled go
        db.execute("DELETE FROM devices WHERE NOT (id = ANY(%s))", (keep,))
    push_digits(stack.url, work)
    auth = dict(devices)
    body = {
        "model": "digits",
        "version": "1.0.0",
        "selector": {"site": "bench"},
        "waves": [{"percent": p, "soak_s": 0} for p in ROLLOUT_WAVES],
        "rules": {"min_devices_reporting": 1, "min_reporting_share": 1.0},
    }
    r = httpx.post(f"{stack.url}/v1/rollouts", json=body, headers=ADMIN_HEADERS, timeout=60)
    r.raise_for_status()
    rid = r.json()["id"]
    tag = f"rollout:{rid}"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-wave-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", 1883)
    client.loop_start()
    db = psycopg.connect(stack.db_url, autocommit=True)
    http = httpx.Client(base_url=stack.url, timeout=10)

    def assigned() -> set[str]:
        rows = db.execute("SELECT device_id FROM assignments WHERE created_by = %s", (tag,))
        return {row[0] for row in rows}

    def visible(device_id: str, base: str = "") -> bool:
        r = http.get(
            base + f"/v1/devices/{device_id}/desired-state",
            headers={"Authorization": auth[device_id]},
        )
        return r.status_code == 200 and any(
            m["name"] == "digits" and m["version"] == "1.0.0" for m in r.json()["models"]
        )

    # Mosquitto deals shared-subscription messages out in turn, not by device, and each
    # ingester writes the device's latest row from what it saw itself: a device whose event went
    # to one ingester and its telemetry to the other shows either, never both, and its wave never
    # completes (docs/control-plane.md, "Scale-out figures"). Each report goes out once per
    # replica, as a device publishing every few seconds would reach each ingester; the event's
    # copies are one event (unique on device, seq and time).
    copies = len(stack.ports)

    def report(wave: set[str], seq: int) -> float:
        ts = datetime.now(timezone.utc).isoformat()
        infos = []
        for device_id in sorted(wave):  # health on the new version first, then the event
            telemetry_body = {
                "schema_version": 1,
                "device_id": device_id,
                "seq": seq,
                "ts": ts,
                "models": [
                    {
                        "name": "digits",
                        "version": "1.0.0",
                        "window_s": 1.0,
                        "count": 30,
                        "failed": 0,
                        "dropped": 0,
                        "throughput_per_s": 30.0,
                        "latency_p50_ms": 5.0,
                        "latency_p95_ms": 8.0,
                        "latency_p99_ms": 9.0,
                    }
                ],
            }
            topic = f"{stack.prefix}/{device_id}/telemetry"
            for _ in range(copies):
                infos.append(client.publish(topic, json.dumps(telemetry_body), qos=1))
        for device_id in sorted(wave):
            event = {
                "schema_version": 1,
                "device_id": device_id,
                "seq": seq,
                "ts": ts,
                "model": "digits",
                "version": "1.0.0",
                "step": "committed",
            }
            for _ in range(copies):
                topic = f"{stack.prefix}/{device_id}/events"
                infos.append(client.publish(topic, json.dumps(event), qos=1))
        for info in infos:
            info.wait_for_publish(60)
        return time.monotonic()  # the broker has the wave's last report

    e2e, everywhere_s, failover_s, waves_seen, stale = [], [], float("nan"), [], 0
    try:
        done: set[str] = set()
        current: set[str] = set()
        wait_for(lambda: bool(assigned()), 120, "the first wave", step=0.05)
        for index in range(len(ROLLOUT_WAVES) - 1):
            current = assigned()
            waves_seen.append(len(current))
            killed_at = None
            if index == len(ROLLOUT_WAVES) - 2:  # before the last promotion: kill the runner
                leader = stack.leader()
                if leader is None:
                    raise SystemExit("no replica holds the rollout runner's lease")
                killed_at = time.monotonic()
                stack.processes[leader].kill()  # SIGKILL: no clean hand-over
                stack.processes[leader].wait()
            last_report = report(current - done, seq=index + 1)
            done |= current
            try:
                grew = wait_for(lambda c=current: len(assigned()) > len(c), 120, "the next wave")
            except SystemExit:
                view = httpx.get(f"{stack.url}/v1/rollouts/{rid}", headers=ADMIN_HEADERS)
                print(f"  the rollout as it stands: {view.text[:3000]}", flush=True)
                raise
            newcomer = sorted(assigned() - current)[0]
            seen = wait_for(lambda d=newcomer: visible(d), 60, "the assignment in a desired state")
            live = [
                f"http://127.0.0.1:{port}"
                for port, process in zip(stack.ports, stack.processes, strict=False)
                if process.poll() is None
            ]
            try:  # a device may poll any replica: when does every one answer the new wave?
                everywhere = wait_for(
                    lambda d=newcomer, bases=live: all(visible(d, b) for b in bases),
                    EVERYWHERE_WAIT_S,
                    "the assignment on every replica",
                )
                everywhere_s.append(everywhere - last_report)
            except SystemExit:
                stale += 1
            if killed_at is None:
                e2e.append(seen - last_report)
            else:
                failover_s = seen - killed_at
            print(
                f"  wave {index + 1} ({len(current):,} devices) reported -> wave {index + 2} "
                f"assigned {grew - last_report:.3f} s, in a desired state "
                f"{seen - last_report:.3f} s"
                + (
                    f" (runner killed {last_report - killed_at:.3f} s before the reports)"
                    if killed_at
                    else ""
                ),
                flush=True,
            )
        waves_seen.append(len(assigned()))
    finally:
        client.disconnect()
        client.loop_stop()
        db.close()
        http.close()
    return {
        "wave sizes": "/".join(f"{n:,}" for n in waves_seen),
        "report->next wave s": median(e2e),
        "  worst of waves s": max(e2e) if e2e else float("nan"),
        "fail-over s": failover_s,
        "on every replica s": median(everywhere_s),
        f"  waves stale >{EVERYWHERE_WAIT_S:g} s": stale,
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--devices", type=int, default=1000, help="simulated devices (10000: a site)"
    )
    parser.add_argument(
        "--client",
        choices=("wrk", "httpx"),
        default="wrk" if shutil.which("wrk") else "httpx",
        help="load generator for enrollment and polls (default: wrk when on PATH)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="wrk: runs of each phase")
    parser.add_argument("--enroll-s", type=float, default=5.0, help="wrk: seconds per enrollment")
    parser.add_argument(
        "--enroll-rate", type=float, default=500.0, help="wrk: devices/s offered (paced run)"
    )
    parser.add_argument("--step-s", type=float, default=8.0, help="wrk: seconds per poll step")
    parser.add_argument("--interval", type=float, default=10.0, help="httpx: s between polls")
    parser.add_argument("--rate", type=float, default=2000.0, help="telemetry msg/s (0: none)")
    parser.add_argument(
        "--no-rollout",
        dest="rollout",
        action="store_false",
        help="skip the rollout and fail-over phase (2 replicas only)",
    )
    parser.add_argument(
        "--only-rollout",
        action="store_true",
        help="2 replicas, the rollout and fail-over phase only (devices enrolled untimed)",
    )
    parser.add_argument(
        "--only-telemetry",
        action="store_true",
        help="1 and 2 replicas, the telemetry phase only (devices enrolled untimed)",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        results = {n: run(n, args, Path(tmp)) for n in ((2,) if args.only_rollout else (1, 2))}
    pinned = f"wrk pinned to CPU {LOAD_CPU} (taskset -c {LOAD_CPU})" if LOAD_PIN else "unpinned"
    how = (
        f"wrk: {args.repeats} runs per phase (medians), enrollment {args.enroll_s:g} s x 32 "
        f"connections, polls stepped up {args.step_s:g} s a step on 200 connections with "
        f"+-20 % jitter, {pinned}"
        if args.client == "wrk"
        else f"httpx, polls every {args.interval:g} s"
    )
    print(
        f"\n{args.devices} devices; {how}; telemetry {args.rate:g}/s for {args.duration:g} s; "
        f"this machine: {os.cpu_count()} CPUs shared by the load generator, the replicas, "
        f"HAProxy, PostgreSQL and other users (1-min load {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after)"
    )
    print(f"{'':24}{'1 replica':>14}{'2 replicas':>14}{'2/1':>8}")
    for key in results[2]:
        one, two = results.get(1, {}).get(key, ""), results[2][key]
        ratio = f"{two / one:.2f}" if isinstance(one, float) and one else ""
        print(f"{key:24}{_cell(one):>14}{_cell(two):>14}{ratio:>8}")
    print(f"\nRolloutController.advance() at 10,000 devices: {advance_ms(10_000):.1f} ms (median)")


if __name__ == "__main__":
    main()

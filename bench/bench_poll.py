"""Idle desired-state poll answered with 304: latency under 500 concurrent device polls.

Starts two real control planes (``python -m control_plane.cli serve``: uvicorn with httptools
and uvloop, no access log, one process each) on loopback, one on SQLite and one on PostgreSQL
(127.0.0.1:5432, a scratch database), uploads the digits CNN, enrolls 500 devices through the
API, assigns the version by label (so every desired state names a real variant), lets every
device fetch its state once to learn its ETag, then measures If-None-Match polls that the
server answers with 304, the two databases interleaved round by round.

The default load generator is ``wrk`` (C, event loop, a Lua script), so the figure measures the
server rather than the client: 500 keep-alive connections, each request carrying one enrolled
device's credential and ETag (each wrk thread cycles through its share of the devices; wrk's
Lua cannot tie a request to one connection). On a machine with two or more cores wrk is pinned
to CPU 0 and the server under test (all its threads) to CPU 1 with ``taskset`` so the two never
compete; ``--no-pin`` leaves scheduling to the kernel. Prints p50/p90/p99/p99.9/max latency and
requests/s per round and the median over rounds, with the PostgreSQL/SQLite ratios.

Prerequisite for the default client: ``wrk`` on PATH (Debian/Ubuntu: ``apt-get install -y wrk``)
and ``taskset`` (util-linux). Without wrk the bench says so and exits 2; ``--client httpx``
runs the older pure-Python load (rounds of 500 simultaneous polls, one httpx client per device,
pinned to CPU 0), whose own cost on the same machine dominates the figure.

    .venv/bin/python bench/bench_poll.py [--devices 500] [--duration 20] [--rounds 2]
    .venv/bin/python bench/bench_poll.py --client httpx [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.contracts.profile import CpuInfo, HardwareProfile, RuntimeInfo  # noqa: E402
from agent.samples import digits_cnn, digits_data  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-" + uuid.uuid4().hex
BOOTSTRAP_TOKEN = "bench-bootstrap-token-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PG_DSN = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
CLIENT_CPU, SERVER_CPU = 0, 1
Poll = tuple[str, dict[str, str]]  # path, headers (credential and If-None-Match)

# wrk script: each thread takes every n-th device and cycles through them; every response that
# is not a 304 is counted; done() prints the figures on one parseable line (microseconds).
# Arguments: the polls file, wrk's thread count, and optionally a mean pause between polls (ms).
WRK_SCRIPT = r"""
local threads, created = {}, 0

function setup(thread)
  thread:set("thread_index", created)
  created = created + 1
  table.insert(threads, thread)
end

function init(args)
  local n_threads = tonumber(args[2])
  polls, next_poll, not_304 = {}, 1, 0
  -- optional pacing (bench_fleet.py): a mean pause in ms between a connection's polls, +-20 %
  local mean_delay = tonumber(args[3] or "0")
  if mean_delay > 0 then
    math.randomseed(thread_index + 1)
    function delay() return math.floor(mean_delay * (0.8 + 0.4 * math.random())) end
  end
  local i = 0
  for line in io.lines(args[1]) do
    if i % n_threads == thread_index then
      local path, auth, etag = line:match("^([^\t]+)\t([^\t]+)\t([^\t]+)$")
      table.insert(polls, wrk.format("GET", path,
        {["Host"] = wrk.headers["Host"], ["Authorization"] = auth, ["If-None-Match"] = etag}))
    end
    i = i + 1
  end
end

function request()
  local r = polls[next_poll]
  next_poll = next_poll % #polls + 1
  return r
end

function response(status, headers, body)
  if status ~= 304 then not_304 = not_304 + 1 end
end

function done(summary, latency, requests)
  local bad = 0
  for _, t in ipairs(threads) do bad = bad + t:get("not_304") end
  local e = summary.errors
  io.write(string.format(
    "edgefleet-poll requests=%d duration_us=%d p50=%d p90=%d p99=%d p999=%d max=%d " ..
    "not_304=%d connect=%d read=%d write=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max,
    bad, e.connect, e.read, e.write, e.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_pin() -> bool:
    return (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None


class Server:
    def __init__(self, label: str, database_url: str, data_dir: Path) -> None:
        self.label = label
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "EDGEFLEET_CP__DATA_DIR": str(data_dir),
            "EDGEFLEET_CP__DATABASE_URL": database_url,
            "EDGEFLEET_CP__ADMIN_TOKEN": ADMIN_TOKEN,
            "EDGEFLEET_CP__BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN,
            "EDGEFLEET_CP__LOG_LEVEL": "warning",
        }
        self.log = (data_dir / "server.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "control_plane.cli", "serve", "--port", str(self.port)],
            env=env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{label} server did not start; see {data_dir / 'server.log'}")
            time.sleep(0.2)

    def pin(self, cpu: int) -> None:
        """Every thread of the server (event loop, thread pool, workers) onto one CPU."""
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(self.proc.pid)],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def profile() -> dict[str, object]:
    return HardwareProfile(
        arch="x86_64",
        os="linux",
        python="3.11",
        cpu=CpuInfo(cores=2, flags=("avx512_vnni",)),
        memory_bytes=4 << 30,
        runtimes=(
            RuntimeInfo(name="onnxruntime", version="1.20.1"),
            RuntimeInfo(name="openvino", version="2026.4.0"),
        ),
    ).model_dump(mode="json")


async def prepare(server: Server, devices: int, work: Path) -> list[Poll]:
    """Model + version + devices + assignment; returns (path, headers with If-None-Match)."""
    digits = digits_data()
    np.savez(work / "cal.npz", input=digits.x_train[:64])
    async with httpx.AsyncClient(base_url=server.url, timeout=300, headers=ADMIN) as admin:
        (await admin.post("/v1/models", json={"name": "digits"})).raise_for_status()
        files = {"onnx": digits_cnn().read_bytes(), "calibration": (work / "cal.npz").read_bytes()}
        r = await admin.post(
            "/v1/models/digits/versions",
            data={"version": "1.0.0"},
            files={k: (k, v) for k, v in files.items()},
        )
        r.raise_for_status()
        job_id = r.json()["job"]["id"]
        while (job := (await admin.get(f"/v1/jobs/{job_id}")).json())["status"] not in (
            "succeeded",
            "failed",
        ):
            await asyncio.sleep(0.5)
        if job["status"] != "succeeded":
            raise RuntimeError(f"build failed: {job['error']}")
        sem = asyncio.Semaphore(20)
        # the label that selects the assignment comes with the bootstrap token
        r = await admin.post(
            "/v1/bootstrap-tokens",
            json={"name": "bench", "labels": {"site": "bench"}, "max_uses": devices},
        )
        r.raise_for_status()
        bench_token = r.json()["token"]

        async def enroll(i: int) -> tuple[str, str]:
            async with sem:
                r = await admin.post(
                    "/v1/devices/enroll",
                    json={
                        "bootstrap_token": bench_token,
                        "name": f"robot-{i}",
                        "profile": profile(),
                    },
                )
                r.raise_for_status()
                return r.json()["device_id"], r.json()["credential"]

        enrolled = await asyncio.gather(*(enroll(i) for i in range(devices)))
        r = await admin.post(
            "/v1/assignments",
            json={"model": "digits", "version": "1.0.0", "selector": {"site": "bench"}},
        )
        r.raise_for_status()

        async def first_poll(device_id: str, credential: str) -> Poll:
            async with sem:
                path = f"/v1/devices/{device_id}/desired-state"
                headers = {"Authorization": f"Bearer {credential}"}
                r = await admin.get(path, headers=headers)
                r.raise_for_status()
                assert r.json()["models"], "the assignment should reach every device"
                return path, {**headers, "If-None-Match": r.headers["ETag"]}

        return await asyncio.gather(*(first_poll(d, c) for d, c in enrolled))


# -- wrk ------------------------------------------------------------------------------------


def wrk_round(
    server: Server,
    polls_file: Path,
    script: Path,
    args: argparse.Namespace,
    *,
    duration_s: int,
    pin: bool,
) -> dict[str, float]:
    """One wrk run against one server; the figures printed by the script's done()."""
    command = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.devices}",
        f"-d{duration_s}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(script),
        server.url,
        "--",
        str(polls_file),
        str(args.threads),
    ]
    if pin:
        command = ["taskset", "-c", str(CLIENT_CPU), *command]
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    line = next((x for x in run.stdout.splitlines() if x.startswith("edgefleet-poll ")), None)
    if run.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({run.returncode}): {run.stdout}{run.stderr}")
    figures = {k: float(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    errors = sum(figures[k] for k in ("not_304", "connect", "read", "write", "timeout"))
    if errors:
        raise RuntimeError(f"{server.label}: {errors:.0f} polls were not answered 304: {line}")
    seconds = figures["duration_us"] / 1e6
    return {
        "requests": figures["requests"],
        "p50": figures["p50"] / 1e3,
        "p90": figures["p90"] / 1e3,
        "p99": figures["p99"] / 1e3,
        "p999": figures["p999"] / 1e3,
        "max": figures["max"] / 1e3,
        "rps": figures["requests"] / seconds,
    }


def measure_wrk(
    servers: Sequence[Server], polls: dict[str, list[Poll]], work: Path, args: argparse.Namespace
) -> list[tuple[str, dict[str, float]]]:
    script = work / "poll.lua"
    script.write_text(WRK_SCRIPT)
    files = {}
    for server in servers:
        files[server.label] = work / f"{server.label}-polls.tsv"
        files[server.label].write_text(
            "".join(
                f"{path}\t{headers['Authorization']}\t{headers['If-None-Match']}\n"
                for path, headers in polls[server.label]
            )
        )
    pin = args.pin and can_pin()
    if pin:
        for server in servers:
            server.pin(SERVER_CPU)
    example = (
        (f"taskset -c {CLIENT_CPU} " if pin else "")
        + f"wrk -t{args.threads} -c{args.devices} -d{args.duration}s --timeout 30s --latency "
        + f"-s poll.lua URL -- POLLS.tsv {args.threads}"
    )
    print(f"load: {example}", flush=True)
    if pin:
        print(f"server: uvicorn process pinned with taskset -a -p -c {SERVER_CPU} PID", flush=True)
    rows = []
    for server in servers:  # warm-up: opens the connections, fills every cache
        wrk_round(server, files[server.label], script, args, duration_s=2, pin=pin)
    for round_no in range(1, args.rounds + 1):
        for server in servers:  # interleaved, round by round
            figures = wrk_round(
                server, files[server.label], script, args, duration_s=args.duration, pin=pin
            )
            rows.append((server.label, figures))
            print(
                f"  round {round_no} {server.label:<11} p99 {figures['p99']:7.1f} ms  "
                f"{figures['rps']:7.0f} req/s",
                flush=True,
            )
    return rows


# -- httpx (no wrk) ---------------------------------------------------------------------------


async def poll_round(
    clients: list[httpx.AsyncClient], polls: list[Poll]
) -> tuple[list[float], float]:
    """Every device polls once, all at the same time, each on its own keep-alive connection."""

    async def one(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> float:
        start = time.perf_counter()
        r = await client.get(path, headers=headers)
        elapsed = time.perf_counter() - start
        if r.status_code != 304:
            raise RuntimeError(f"expected 304, got {r.status_code}: {r.text[:200]}")
        return elapsed

    start = time.perf_counter()
    latencies = await asyncio.gather(
        *(one(c, p, h) for c, (p, h) in zip(clients, polls, strict=True))
    )
    return list(latencies), time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure_httpx(
    servers: Sequence[Server], polls: dict[str, list[Poll]], args: argparse.Namespace
) -> list[tuple[str, dict[str, float]]]:
    pin = args.pin and can_pin()
    if pin:
        for server in servers:
            server.pin(SERVER_CPU)
        os.sched_setaffinity(0, {CLIENT_CPU})
        print(f"load: this process (httpx) on CPU {CLIENT_CPU}, servers on CPU {SERVER_CPU}")
    # one client (one connection) per device, as on a real fleet
    clients = {
        s.label: [httpx.AsyncClient(base_url=s.url, timeout=120) for _ in polls[s.label]]
        for s in servers
    }
    rows = []
    try:
        for label, device_clients in clients.items():  # warm-up: open the connections
            await poll_round(device_clients, polls[label])
        for _ in range(args.rounds):
            for label, device_clients in clients.items():  # interleaved, round by round
                lat, wall = await poll_round(device_clients, polls[label])
                rows.append(
                    (
                        label,
                        {
                            "requests": float(len(lat)),
                            "p50": pct(lat, 0.5) * 1e3,
                            "p90": pct(lat, 0.9) * 1e3,
                            "p99": pct(lat, 0.99) * 1e3,
                            "p999": pct(lat, 0.999) * 1e3,
                            "max": max(lat) * 1e3,
                            "rps": len(lat) / wall,
                        },
                    )
                )
    finally:
        for device_clients in clients.values():
            for client in device_clients:
                await client.aclose()
    return rows


def cache_outcomes(server: Server) -> str:
    """The server's own count of desired-state reads by result and cache (fast path = hit)."""
    text = httpx.get(f"{server.url}/metrics", headers=ADMIN, timeout=30).text
    found = re.findall(
        r'^edgefleet_cp_desired_state_polls_total\{cache="(\w+)",result="(\w+)"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return ", ".join(f"{result}/{cache} {float(n):.0f}" for cache, result, n in found)


# -- main -------------------------------------------------------------------------------------

COLUMNS = ("p50", "p90", "p99", "p999", "max", "rps")


def report(
    rows: list[tuple[str, dict[str, float]]],
    labels: Sequence[str],
    args: argparse.Namespace,
    load: tuple[float, float],
) -> None:
    pinned = args.pin and can_pin()
    how = (
        f"wrk -t{args.threads} -c{args.devices} -d{args.duration}s x {args.rounds} rounds"
        if args.client == "wrk"
        else f"httpx, {args.rounds} rounds of {args.devices} simultaneous polls"
    )
    where = (
        f"client on CPU {CLIENT_CPU}, server on CPU {SERVER_CPU} (taskset)"
        if pinned
        else f"client and server share {os.cpu_count()} CPUs"
    )
    print()
    print(f"Idle desired-state poll (304), {args.devices} concurrent devices; {how}; {where}")
    print(
        f"latency in ms; median over rounds; 1-min load average {load[0]:.1f} before, "
        f"{load[1]:.1f} after (other work on the machine shares both CPUs)"
    )
    print(
        f"{'database':<12} {'polls':>9} {'p50':>8} {'p90':>8} {'p99':>8} {'p99.9':>8} "
        f"{'max':>8} {'req/s':>8}"
    )
    stats = {}
    for label in labels:
        mine = [figures for lab, figures in rows if lab == label]
        stats[label] = {c: statistics.median(f[c] for f in mine) for c in COLUMNS}
        total = sum(f["requests"] for f in mine)
        print(f"{label:<12} {total:>9.0f} " + " ".join(f"{stats[label][c]:>8.1f}" for c in COLUMNS))
    if {"sqlite", "postgresql"} <= set(stats):
        s, p = stats["sqlite"], stats["postgresql"]
        print(f"{'pg/sqlite':<12} {'':>9} " + " ".join(f"{p[c] / s[c]:>8.2f}" for c in COLUMNS))


async def main_async(args: argparse.Namespace) -> None:
    labels = [x.strip() for x in args.databases.split(",") if x.strip()]
    pg_name = f"edgefleet_bench_{uuid.uuid4().hex[:10]}"
    if "postgresql" in labels:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{pg_name}"')
    pg_url = PG_DSN.rsplit("/", 1)[0] + f"/{pg_name}"
    servers: list[Server] = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
            root = Path(tmp)
            urls = {"sqlite": f"sqlite:///{root / 'sqlite' / 'cp.db'}", "postgresql": pg_url}
            for label in labels:
                (root / label).mkdir()
                servers.append(Server(label, urls[label], root / label))
            polls = {}
            for server in servers:
                t = time.perf_counter()
                polls[server.label] = await prepare(server, args.devices, root / server.label)
                print(
                    f"{server.label}: {args.devices} devices enrolled and polled once "
                    f"in {time.perf_counter() - t:.1f} s",
                    flush=True,
                )
            load_before = os.getloadavg()[0]
            if args.client == "wrk":
                rows = measure_wrk(servers, polls, root, args)
            else:
                rows = await measure_httpx(servers, polls, args)
            for server in servers:
                print(f"{server.label}: {cache_outcomes(server)}")
            load = (load_before, os.getloadavg()[0])
    finally:
        for server in servers:
            server.stop()
        if "postgresql" in labels:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
    report(rows, labels, args, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500, help="devices = concurrent connections")
    parser.add_argument("--client", choices=("wrk", "httpx"), default="wrk")
    parser.add_argument("--duration", type=int, default=20, help="seconds per wrk round")
    parser.add_argument("--rounds", type=int, default=None, help="default: 2 (wrk), 6 (httpx)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument(
        "--no-pin", dest="pin", action="store_false", help="do not pin client and server to CPUs"
    )
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 2 if args.client == "wrk" else 6
    if args.client == "wrk" and shutil.which("wrk") is None:
        print(
            "bench_poll: wrk not found on PATH; install it (Debian/Ubuntu: apt-get install -y wrk)"
            " or run with --client httpx (slower Python load generator on the same cores)",
            file=sys.stderr,
        )
        sys.exit(2)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

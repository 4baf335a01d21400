"""Idle desired-state poll answered with 304: latency under 500 concurrent device polls.

Starts two real control planes (``python -m control_plane.cli serve``, uvicorn, one process
each) on loopback, one on SQLite and one on PostgreSQL (127.0.0.1:5432, a scratch database),
uploads the digits CNN, enrolls 500 devices, assigns the version by label, lets every device
fetch its state once, then measures rounds of 500 concurrent If-None-Match polls, the two
databases interleaved round by round. Prints p50/p99/max latency and polls/s side by side and
the PostgreSQL/SQLite ratios.

    .venv/bin/python bench/bench_poll.py [--devices 500] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


async def prepare(server: Server, devices: int, work: Path) -> list[tuple[str, dict[str, str]]]:
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

        async def enroll(i: int) -> tuple[str, str]:
            async with sem:
                r = await admin.post(
                    "/v1/devices/enroll",
                    json={
                        "bootstrap_token": BOOTSTRAP_TOKEN,
                        "name": f"robot-{i}",
                        "profile": profile(),
                        "labels": {"site": "bench"},
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

        async def first_poll(device_id: str, credential: str) -> tuple[str, dict[str, str]]:
            async with sem:
                path = f"/v1/devices/{device_id}/desired-state"
                headers = {"Authorization": f"Bearer {credential}"}
                r = await admin.get(path, headers=headers)
                r.raise_for_status()
                assert r.json()["models"], "the assignment should reach every device"
                return path, {**headers, "If-None-Match": r.headers["ETag"]}

        return await asyncio.gather(*(first_poll(d, c) for d, c in enrolled))


async def poll_round(
    clients: list[httpx.AsyncClient], polls: list[tuple[str, dict[str, str]]]
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


async def main_async(args: argparse.Namespace) -> None:
    pg_name = f"edgefleet_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{pg_name}"')
    pg_url = PG_DSN.rsplit("/", 1)[0] + f"/{pg_name}"
    servers: list[Server] = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
            root = Path(tmp)
            for label, url in (
                ("sqlite", f"sqlite:///{root / 'sqlite' / 'cp.db'}"),
                ("postgresql", pg_url),
            ):
                (root / label).mkdir()
                servers.append(Server(label, url, root / label))
            polls = {}
            for server in servers:
                t = time.perf_counter()
                polls[server.label] = await prepare(server, args.devices, root / server.label)
                print(
                    f"{server.label}: {args.devices} devices enrolled and polled once "
                    f"in {time.perf_counter() - t:.1f} s",
                    flush=True,
                )
            latencies: dict[str, list[float]] = {s.label: [] for s in servers}
            rates: dict[str, list[float]] = {s.label: [] for s in servers}
            # one client (one connection) per device, as on a real fleet
            clients = {
                s.label: [httpx.AsyncClient(base_url=s.url, timeout=120) for _ in polls[s.label]]
                for s in servers
            }
            try:
                for label, device_clients in clients.items():  # warm-up: open the connections
                    await poll_round(device_clients, polls[label])
                for _ in range(args.rounds):
                    for label, device_clients in clients.items():  # interleaved, round by round
                        lat, wall = await poll_round(device_clients, polls[label])
                        latencies[label] += lat
                        rates[label].append(len(lat) / wall)
            finally:
                for device_clients in clients.values():
                    for client in device_clients:
                        await client.aclose()
    finally:
        for server in servers:
            server.stop()
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')

    print()
    print(
        f"Idle desired-state poll (304), {args.devices} concurrent devices, {args.rounds} "
        f"rounds interleaved, {os.cpu_count()} CPU cores shared by client and server"
    )
    print(f"{'database':<12} {'polls':>7} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9} {'polls/s':>9}")
    stats = {}
    for label, lat in latencies.items():
        stats[label] = (
            pct(lat, 0.5) * 1e3,
            pct(lat, 0.99) * 1e3,
            max(lat) * 1e3,
            statistics.median(rates[label]),
        )
        p50, p99, worst, rate = stats[label]
        print(f"{label:<12} {len(lat):>7} {p50:>9.1f} {p99:>9.1f} {worst:>9.1f} {rate:>9.0f}")
    s, p = stats["sqlite"], stats["postgresql"]
    print(
        f"{'pg/sqlite':<12} {'':>7} {p[0] / s[0]:>9.2f} {p[1] / s[1]:>9.2f} "
        f"{p[2] / s[2]:>9.2f} {p[3] / s[3]:>9.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=6)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()

"""The fleet page (``/ui``) with 1,000 devices and 50 rollouts in the database: server time and
page weight.

Starts a real control plane (uvicorn on a loopback port, SQLite in a scratch directory), uploads
the digits CNN (a real build), writes 1,000 enrolled devices with labels, a profile and a
reported state, creates 50 rollouts over the HTTP API (each to its own group of 20 devices,
each aborted before the next so the model is free again), then fetches each page ``--repeat``
times with an operator token and prints, side by side: median and p95 time to the last byte
(loopback: that is server time plus a local copy) and the page's bytes, against the goal
(< 300 ms, < 500 KB). ``/ui`` shows 50 devices a page; ``?per_page=1000`` all of them on one
page, as the page did before it had pagination.

    .venv/bin/python bench/bench_fleet_page.py [--devices 1000] [--rollouts 50] [--repeat 15]
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.samples import digits_cnn, digits_data  # noqa: E402
from control_plane.app import create_app  # noqa: E402
from control_plane.db.models import Device  # noqa: E402
from control_plane.settings import Settings  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-" + uuid.uuid4().hex
BOOTSTRAP_TOKEN = "bench-bootstrap-token-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GROUP = 20  # devices per rollout
GOAL_MS, GOAL_KB = 300, 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def control_plane(data_dir: Path) -> Iterator[tuple[str, object]]:
    settings = Settings(
        data_dir=data_dir,
        bootstrap_token=BOOTSTRAP_TOKEN,
        admin_token=ADMIN_TOKEN,
        log_level="warning",
    )
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the control plane did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app.state.ctx
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _push_digits(client: httpx.Client, work: Path) -> None:
    import numpy as np

    data = digits_data()
    calib = work / "calib.npz"
    np.savez(calib, input=data.x_train[:64])
    assert client.post("/v1/models", json={"name": "digits"}, headers=ADMIN).status_code == 201
    r = client.post(
        "/v1/models/digits/versions",
        data={"version": "1.0.0"},
        files={
            "onnx": ("digits.onnx", digits_cnn().read_bytes()),
            "calibration": ("calib.npz", calib.read_bytes()),
        },
        headers=ADMIN,
    )
    r.raise_for_status()
    job = r.json()["job"]["id"]
    while client.get(f"/v1/jobs/{job}", headers=ADMIN).json()["status"] not in (
        "succeeded",
        "failed",
    ):
        time.sleep(0.2)


def _devices(ctx: object, count: int) -> None:
    now = datetime.now(timezone.utc)
    profile = {
        "arch": "x86_64",
        "os": "linux",
        "python": "3.11",
        "cpu": {"cores": 4, "flags": ["avx2"]},
        "memory_bytes": 8 * 1024**3,
        "runtimes": [{"name": "onnxruntime", "version": "1.20.1"}],
    }
    with ctx.sessions() as session:  # type: ignore[attr-defined]
        for i in range(count):
            session.add(
                Device(
                    id=f"dev-{i:05d}",
                    name=f"robot-{i:05d}",
                    token_hash=hashlib.sha256(f"t{i}".encode()).hexdigest(),
                    labels={"site": "lab" if i % 2 else "plant", "group": f"g{i // GROUP}"},
                    profile=profile,
                    reported={
                        "device_id": f"dev-{i:05d}",
                        "agent_version": "0.1.0",
                        "models": [
                            {
                                "name": "digits",
                                "active_version": "1.0.0",
                                "variant_id": "onnx-fp32",
                                "backend": "onnxruntime",
                                "phase": "committed",
                            }
                        ],
                    },
                    enrolled_at=now,
                    last_seen_at=now,
                    reported_at=now,
                )
            )
        session.commit()


def _rollouts(client: httpx.Client, count: int) -> None:
    for i in range(count):
        body = {
            "id": f"bench-{i:03d}",
            "model": "digits",
            "version": "1.0.0",
            "selector": {"group": f"g{i}"},
            "waves": [{"percent": 50.0, "soak_s": 600.0}, {"percent": 100.0, "soak_s": 0.0}],
        }
        r = client.post("/v1/rollouts", json=body, headers=ADMIN)
        r.raise_for_status()
        path = f"/v1/rollouts/bench-{i:03d}/abort"
        r = client.post(path, json={"reason": "bench"}, headers=ADMIN)
        r.raise_for_status()


def _measure(client: httpx.Client, path: str, repeat: int) -> tuple[float, float, int]:
    times, size = [], 0
    client.get(path, headers=ADMIN).raise_for_status()  # warm
    for _ in range(repeat):
        start = time.perf_counter()
        r = client.get(path, headers=ADMIN)
        times.append((time.perf_counter() - start) * 1000)
        r.raise_for_status()
        size = len(r.content)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))], size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rollouts", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--page", action="append", default=None, help="paths to fetch (default: the fleet pages)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with (
            control_plane(work / "data") as (url, ctx),
            httpx.Client(base_url=url, timeout=120) as client,
        ):
            t0 = time.perf_counter()
            _push_digits(client, work)
            _devices(ctx, args.devices)
            _rollouts(client, args.rollouts)
            print(
                f"setup: {args.devices} devices, {args.rollouts} rollouts "
                f"in {time.perf_counter() - t0:.1f} s"
            )
            pages = args.page or [
                "/ui",
                "/ui?per_page=1000",
                "/ui?label=site%3Dlab&state=online&page=3",
                "/ui/devices/dev-00001",
                "/ui/rollouts",
                "/ui/rollouts/bench-000",
                "/ui/models",
            ]
            goal = f"goal <{GOAL_MS} ms <{GOAL_KB} KB"
            print(f"{'page':44} {'median ms':>10} {'p95 ms':>8} {'KB':>8}  {goal}")
            for path in pages:
                median, p95, size = _measure(client, path, args.repeat)
                ok = "yes" if median < GOAL_MS and size / 1000 < GOAL_KB else "no"
                print(f"{path:44} {median:10.1f} {p95:8.1f} {size / 1000:8.1f}  {ok}")


if __name__ == "__main__":
    main()

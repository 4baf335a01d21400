"""What the operator sees, and how late: last_seen staleness and reported-state visibility.

Starts a real control plane (uvicorn on a loopback port, SQLite in a scratch directory) twice,
side by side in one run: once with polls not refreshing ``last_seen_at`` (the old behaviour,
``last_seen_write_s=None``) and once with the default coalesced refresh. In each:

1. **last_seen staleness**: one enrolled device polls its desired state every ``--poll`` seconds
   (2 s) with ``If-None-Match``, so the service answers 304 on its fast path; an operator reads
   ``GET /v1/devices/{id}`` every 0.25 s and records ``read time - last_seen_at``. Printed:
   median, p95 and max over ``--duration`` seconds.
2. **reported state -> operator view**: the device PUTs a reported state with a new phase and
   version; the operator polls ``GET /v1/devices/{id}`` and the ``/ui`` page until each shows
   it. Printed: median and max over ``--changes`` changes, from the start of the PUT.

    .venv/bin/python bench/bench_presence.py [--duration 30] [--poll 2] [--changes 20]
"""

from __future__ import annotations

import argparse
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

from agent.contracts.profile import CpuInfo, HardwareProfile, RuntimeInfo  # noqa: E402
from control_plane.app import create_app  # noqa: E402
from control_plane.settings import Settings  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-" + uuid.uuid4().hex
BOOTSTRAP_TOKEN = "bench-bootstrap-token-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
OPERATOR_READ_S = 0.25  # seconds between the operator's reads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def control_plane(data_dir: Path, last_seen_write_s: float | None) -> Iterator[str]:
    settings = Settings(
        data_dir=data_dir,
        bootstrap_token=BOOTSTRAP_TOKEN,
        admin_token=ADMIN_TOKEN,
        last_seen_write_s=last_seen_write_s,
        log_level="warning",
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the control plane did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _enroll(client: httpx.Client) -> tuple[str, dict[str, str]]:
    profile = HardwareProfile(
        arch="x86_64",
        os="linux",
        python="3.11",
        cpu=CpuInfo(cores=2, flags=("avx2",)),
        memory_bytes=8 * 1024**3,
        runtimes=(RuntimeInfo(name="onnxruntime", version="1.20.1"),),
    )
    body = {
        "bootstrap_token": BOOTSTRAP_TOKEN,
        "name": "bench-robot",
        "profile": profile.model_dump(mode="json"),
        "labels": {},
    }
    r = client.post("/v1/devices/enroll", json=body)
    r.raise_for_status()
    out = r.json()
    return out["device_id"], {"Authorization": f"Bearer {out['credential']}"}


def staleness(base_url: str, duration_s: float, poll_s: float) -> list[float]:
    """Seconds between each operator read and the ``last_seen_at`` it shows."""
    with httpx.Client(base_url=base_url, timeout=30) as client:
        device_id, auth = _enroll(client)
        path = f"/v1/devices/{device_id}/desired-state"
        etag = client.get(path, headers=auth).headers["etag"]
        stop = threading.Event()

        def device() -> None:
            with httpx.Client(base_url=base_url, timeout=30) as own:
                while not stop.is_set():
                    r = own.get(path, headers={**auth, "If-None-Match": etag})
                    if r.status_code != 304:
                        raise RuntimeError(f"poll answered {r.status_code}")
                    stop.wait(poll_s)

        poller = threading.Thread(target=device, daemon=True)
        poller.start()
        samples: list[float] = []
        end = time.monotonic() + duration_s
        while time.monotonic() < end:
            seen = client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()["last_seen_at"]
            now = datetime.now(timezone.utc)
            samples.append((now - datetime.fromisoformat(seen)).total_seconds())
            time.sleep(OPERATOR_READ_S)
        stop.set()
        poller.join(timeout=10)
        return samples


def visibility(base_url: str, changes: int) -> tuple[list[float], list[float]]:
    """Seconds from the start of a reported-state PUT until the API, and the page, show it."""
    api: list[float] = []
    page: list[float] = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        device_id, auth = _enroll(client)
        for i in range(changes):
            version = f"1.0.{i}"
            body = {
                "device_id": device_id,
                "agent_version": "0.1.0",
                "models": [{"name": "digits", "active_version": version, "phase": "committed"}],
                "updated_at": datetime.now(timezone.utc).isoformat(),
            }
            start = time.perf_counter()
            r = client.put(f"/v1/devices/{device_id}/reported-state", json=body, headers=auth)
            r.raise_for_status()
            api_seen = page_seen = None
            while api_seen is None or page_seen is None:
                if api_seen is None:
                    d = client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()
                    if d["reported"]["models"][0]["active_version"] == version:
                        api_seen = time.perf_counter() - start
                if (
                    page_seen is None
                    and f"<b>digits</b> {version} " in client.get("/ui", headers=ADMIN).text
                ):
                    page_seen = time.perf_counter() - start
            api.append(api_seen)
            page.append(page_seen)
    return api, page


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per staleness run")
    parser.add_argument("--poll", type=float, default=2.0, help="device poll interval, seconds")
    parser.add_argument("--changes", type=int, default=20, help="reported-state changes")
    args = parser.parse_args()
    default_write_s = Settings.model_fields["last_seen_write_s"].default
    print(
        f"one device polling every {args.poll:g} s (304 fast path), operator reads every "
        f"{OPERATOR_READ_S:g} s, {args.duration:g} s per run"
    )
    print(f"{'last_seen refresh':<32} {'median s':>9} {'p95 s':>8} {'max s':>8}")
    for label, write_s in (
        ("before: polls do not refresh", None),
        (f"after: coalesced every {default_write_s:g} s", default_write_s),
    ):
        with (
            tempfile.TemporaryDirectory(prefix="bench-presence-") as tmp,
            control_plane(Path(tmp), write_s) as url,
        ):
            samples = staleness(url, args.duration, args.poll)
            if write_s is not None:
                api, page = visibility(url, args.changes)
        print(
            f"{label:<32} {statistics.median(samples):>9.2f} {_p(samples, 0.95):>8.2f} "
            f"{max(samples):>8.2f}"
        )
    print(f"\nreported state -> operator view, {args.changes} changes (ms from the PUT's start)")
    for name, values in (("GET /v1/devices/{id}", api), ("/ui page", page)):
        print(
            f"{name:<32} median {statistics.median(values) * 1000:7.1f}   "
            f"max {max(values) * 1000:7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

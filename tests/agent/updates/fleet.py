"""A real control plane on loopback and in-process devices for the update-client tests.

``ControlPlane`` serves a real app (SQLite, the real FP32 variant build, the real TUF repository)
with uvicorn on a fixed loopback port, and can be stopped and started again on that port (a
control plane that is down for a while). ``Device`` is the agent's store, slots and update client
in this process, on an injected clock so backoff and retries need no real waiting.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import uvicorn
from onnx import helper, numpy_helper

from agent.config import AgentSettings, ControlPlaneConfig, SwapConfig
from agent.contracts.events import UpdateEvent
from agent.daemon import ServedModels
from agent.events import EventBus
from agent.hardware import detect_profile
from agent.models.store import ModelStore
from agent.updates.client import UpdateClient
from agent.updates.download import DownloadConfig
from control_plane.app import create_app
from control_plane.builds import build_variants
from control_plane.settings import Settings

ADMIN_TOKEN = "admin-token-for-ota-tests-0123456789"
BOOTSTRAP_TOKEN = "bootstrap-token-for-ota-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

fp32_build = functools.partial(build_variants, targets=("onnx-fp32",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ControlPlane:
    """The real control-plane app under uvicorn, stoppable and restartable on one port."""

    def __init__(self, data_dir: Path, *, port: int | None = None, deltas: bool = False) -> None:
        # deltas off unless asked: these tests judge the full archive's path
        self.settings = Settings(
            data_dir=data_dir,
            database_url=f"sqlite:///{data_dir / 'cp.db'}",
            bootstrap_token=BOOTSTRAP_TOKEN,
            admin_token=ADMIN_TOKEN,
            desired_state_cache_ttl_s=0,
            deltas=deltas,
        )
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app: Any = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ControlPlane:
        self.app = create_app(self.settings, build_variants=fp32_build)
        server = uvicorn.Server(
            uvicorn.Config(
                self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=20)
        self._server = self._thread = None

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=ADMIN, timeout=60)

    def root_json(self, dest: Path) -> Path:
        with self.admin() as c:
            r = c.get("/v1/tuf/root")
            assert r.status_code == 200, r.text
            dest.write_bytes(r.content)
        return dest

    def artifact_file(self, name: str, version: str) -> Path:
        """The stored bundle archive of ``name`` ``version`` (the FP32 variant)."""
        with self.admin() as c:
            v = c.get(f"/v1/models/{name}/versions/{version}").json()
        sha = next(var["sha256"] for var in v["variants"] if var.get("sha256"))
        path: Path = self.ctx.store._path(sha)
        return path

    def push(self, onnx_path: Path, cal: Path, *, name: str, version: str) -> None:
        with self.admin() as c:
            if c.get(f"/v1/models/{name}").status_code == 404:
                r = c.post("/v1/models", json={"name": name})
                assert r.status_code == 201, r.text
            files = {
                "onnx": ("model.onnx", onnx_path.read_bytes(), "application/octet-stream"),
                "calibration": ("cal.npz", cal.read_bytes(), "application/octet-stream"),
            }
            r = c.post(f"/v1/models/{name}/versions", data={"version": version}, files=files)
            assert r.status_code == 202, r.text
            job_id = r.json()["job"]["id"]
            deadline = time.monotonic() + 60
            while True:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed"):
                    break
                assert time.monotonic() < deadline, job
                time.sleep(0.05)
            assert job["status"] == "succeeded", job

    def deploy(self, name: str, version: str, device_id: str) -> None:
        with self.admin() as c:
            body = {"model": name, "version": version, "device_id": device_id}
            r = c.post("/v1/assignments", json=body)
            assert r.status_code in (200, 201), r.text

    def device(self, device_id: str) -> dict[str, Any]:
        with self.admin() as c:
            r = c.get(f"/v1/devices/{device_id}")
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out


def wide_digits(src: Path, dest: Path, *, hidden: int = 8192) -> Path:
    """The digits CNN plus an input-dependent branch multiplied by zero: same outputs, a
    ~2 MiB weight, so its archive arrives in many chunks."""
    model = onnx.load(str(src))
    for node in model.graph.node:
        for j, out in enumerate(node.output):
            if out == "logits":
                node.output[j] = "logits_raw"
    first_input = model.graph.input[0].name
    rng = np.random.default_rng(3)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(rng.normal(0, 0.1, (64, hidden)).astype(np.float32), "wide_w"),
            numpy_helper.from_array(np.array([0.0], np.float32), "wide_zero"),
        ]
    )
    model.graph.node.extend(
        [
            helper.make_node("Flatten", [first_input], ["wide_flat"], axis=1),
            helper.make_node("MatMul", ["wide_flat", "wide_w"], ["wide_h"]),
            helper.make_node("ReduceSum", ["wide_h"], ["wide_s"], keepdims=1),
            helper.make_node("Mul", ["wide_s", "wide_zero"], ["wide_z"]),
            helper.make_node("Add", ["logits_raw", "wide_z"], ["logits"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return dest


@dataclass
class FakeClock:
    """Monotonic seconds that move only when the code under test sleeps (or the test says)."""

    t: float = 1000.0
    slept: list[float] = field(default_factory=list)
    on_sleep: Callable[[float], None] | None = None

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep(seconds)
        self.t += seconds

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Device:
    """One device's agent in this process: store, slots and update client, on a fake clock."""

    def __init__(
        self,
        cp: ControlPlane,
        state_dir: Path,
        *,
        name: str = "robot",
        root: Path | None = None,
        download_config: DownloadConfig | None = None,
        bandwidth_limit_bps: int | None = None,
        http: httpx.Client | None = None,
        poll_interval_s: float = 30.0,
        min_inferences: int = 0,
        loop_health: Callable[[], Any] | None = None,
    ) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        root = root or cp.root_json(state_dir.parent / f"{name}-root.json")
        self.settings = AgentSettings(
            device_id=name,
            state_dir=state_dir,
            control_plane=ControlPlaneConfig(
                url=cp.url,
                bootstrap_token=BOOTSTRAP_TOKEN,
                tuf_root_path=root,
                poll_interval_s=poll_interval_s,
                bandwidth_limit_bps=bandwidth_limit_bps,
                labels={"site": "lab"},
            ),
            swap=SwapConfig(probation_s=0, warmup_runs=1, probation_min_inferences=min_inferences),
        )
        self.events: list[UpdateEvent] = []
        self.bus = EventBus(name)
        self.bus.subscribe(self.events.append)
        self.store = ModelStore(state_dir, bus=self.bus)
        self.served = ServedModels(self.settings, self.store, self.bus)
        self.clock = FakeClock()
        self.client = UpdateClient(
            state_dir=state_dir,
            config=self.settings.control_plane,
            store=self.store,
            activators=self.served,
            bus=self.bus,
            device_name=name,
            profile=detect_profile,
            http=http,
            download_config=download_config
            or DownloadConfig(free_space_margin_bytes=0, max_attempts=3),
            monotonic=self.clock.monotonic,
            sleep=self.clock.sleep,
            rng=__import__("random").Random(7),
            loop_health=loop_health,
        )

    @property
    def device_id(self) -> str:
        cred = self.client.credential
        assert cred is not None
        return cred.device_id

    def serving(self, name: str = "digits") -> str:
        return self.served.get(name).slot.version

    def infer(self, feeds: dict[str, np.ndarray[Any, Any]], name: str = "digits") -> str:
        (version, _variant), _ = self.served.get(name).slot.infer_versioned(feeds)
        return version

    def steps(self) -> list[str]:
        return [e.step for e in self.events]

    def tick_until_idle(self) -> float:
        """Tick, then advance the clock by what the client asked for; the last delay."""
        delay = self.client.tick()
        self.clock.advance(delay)
        return delay

    def close(self) -> None:
        self.client.close()
        self.served.close()


class Traffic:
    """Inference on a slot from a background thread the whole time; counts by version and
    every failure."""

    def __init__(self, device: Device, feeds: dict[str, np.ndarray[Any, Any]]) -> None:
        self._device = device
        self._feeds = feeds
        self.by_version: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                v = self._device.infer(self._feeds)
                self.by_version[v] = self.by_version.get(v, 0) + 1
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.002)

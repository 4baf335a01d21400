"""``python -m demo.fleet`` (``make demo``): the whole product on one machine.

Starts, on embedded defaults and generated secrets: an MQTT broker (the one on 127.0.0.1:1883,
else ``mosquitto`` on a free port, else the embedded broker of ``demo.broker``),
the control plane (uvicorn on a free loopback port, SQLite under the demo directory) and three
agents as real ``edge-agent daemon`` processes with their own state directories and labels.
Then it pushes the digits CNN v1.0.0 and a retrained v1.1.0 through the control plane's API
(variants built and measured for real), deploys v1.0.0 to the fleet, rolls v1.1.0 out in
waves (one device, then all) while every agent's inference loop keeps running, and ends with a
summary: inferences by version, failed and dropped frames per device. Exit 0 when every device
runs v1.1.0, no inference failed and no frame was dropped across the rollout (frames dropped
while the fleet boots, before it, are shown apart).

A live table (rich) on a terminal, plain log lines otherwise. Ctrl-C stops every child process.
Environment: ``EDGEFLEET_DEMO_FAST=1`` (shorter soak and probation, for tests),
``EDGEFLEET_DEMO_BROKER=running|mosquitto|embedded``, ``EDGEFLEET_DEMO_DIR`` (keep everything
there instead of a temporary directory), ``EDGEFLEET_DEMO_RATE_HZ``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from control_plane.cli._client import ControlPlaneClient
from control_plane.errors import ConfigError, ControlPlaneError
from demo.fleet_view import DeviceRow, FleetWatch
from demo.models import MODEL_NAME, V1, V2, DemoModels, prepare_models
from demo.procs import BrokerChoice, Child, Children, free_port, pick_broker

__all__ = ["DemoConfig", "main"]

P99_RATIO_LIMIT = 10.0
FLEET_LABEL = {"fleet": "demo"}
AGENTS: tuple[tuple[str, dict[str, str]], ...] = (
    ("robot-a", {"site": "lyon", "board": "jetson-orin"}),
    ("robot-b", {"site": "porto", "board": "raspberry-pi-5"}),
    ("robot-c", {"site": "oslo", "board": "x86-box"}),
)


class DemoError(ControlPlaneError):
    """The demo could not reach its end; the message says which step failed."""


@dataclass(frozen=True)
class DemoConfig:
    fast: bool = False
    rate_hz: float = 20.0  # each agent's inference loop: a 50 ms frame budget
    probation_s: float = 6.0  # a swapped version is watched this long before it commits
    soak_s: float = 5.0  # a wave stays healthy this long before the next one starts
    final_soak_s: float = 3.0
    step_timeout_s: float = 60.0
    broker: str | None = None
    work_dir: Path | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DemoConfig:
        env = dict(os.environ if env is None else env)
        fast = env.get("EDGEFLEET_DEMO_FAST", "") not in ("", "0")
        base = (
            cls(fast=True, rate_hz=10.0, probation_s=2.0, soak_s=1.5, final_soak_s=1.0)
            if fast
            else cls()
        )
        rate = float(env.get("EDGEFLEET_DEMO_RATE_HZ") or base.rate_hz)
        if not rate > 0:
            raise ConfigError(f"EDGEFLEET_DEMO_RATE_HZ must be positive, got {rate}")
        work = env.get("EDGEFLEET_DEMO_DIR")
        return DemoConfig(
            fast=base.fast,
            rate_hz=rate,
            probation_s=base.probation_s,
            soak_s=base.soak_s,
            final_soak_s=base.final_soak_s,
            step_timeout_s=base.step_timeout_s,
            broker=env.get("EDGEFLEET_DEMO_BROKER") or None,
            work_dir=Path(work) if work else None,
        )


# -- display ---------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def fleet_table(rows: list[DeviceRow], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col, justify in (
        ("device", "left"),
        ("labels", "left"),
        ("online", "left"),
        ("version", "left"),
        ("phase", "left"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("inferences", "right"),
        ("failed", "right"),
        ("dropped", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        online = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[r.online]
        phase = r.phase or "-"
        if r.phase in ("failed", "rolled_back"):
            phase = f"[red]{phase}[/]"
        elif r.phase in ("committed",):
            phase = f"[green]{phase}[/]"
        elif r.phase not in (None, "idle"):
            phase = f"[yellow]{phase}[/]"
        table.add_row(
            r.name,
            ",".join(f"{k}={v}" for k, v in sorted(r.labels.items()) if k != "fleet") or "-",
            online,
            r.version or "-",
            phase,
            _ms(r.p50_ms),
            _ms(r.p99_ms),
            str(r.inferences),
            str(r.failed) if not r.failed else f"[red]{r.failed}[/]",
            str(r.dropped) if not r.dropped else f"[red]{r.dropped}[/]",
        )
    return table


class Display:
    """The live table on a terminal; on a pipe, plain lines when something changes."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tty = console.is_terminal
        self._live: Live | None = None
        self._status = ""
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._last_plain = 0.0

    @contextlib.contextmanager
    def live(self) -> Iterator[Display]:
        if self.tty:
            with Live(console=self.console, auto_refresh=False, transient=False) as live:
                self._live = live
                try:
                    yield self
                finally:
                    self._live = None
        else:
            yield self

    def step(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.tty:
            self.console.print(f"[dim]{stamp}[/] {message}")
        else:
            print(f"{stamp} {Text.from_markup(message).plain}", flush=True)

    def update(self, rows: list[DeviceRow], status: str) -> None:
        if self._live is not None:
            self._live.update(Group(fleet_table(rows, status)), refresh=True)
            return
        now = time.monotonic()
        for r in rows:
            key = (r.online, r.version, r.phase)
            if self._seen.get(r.name) != key:
                self._seen[r.name] = key
                self.step(
                    f"{r.name}: online={r.online} version={r.version or '-'} phase={r.phase or '-'}"
                )
        if status != self._status or now - self._last_plain >= 5.0:
            self._status, self._last_plain = status, now
            totals = " ".join(
                f"{r.name}:{r.inferences}/{r.failed}/{r.dropped}(p99 {_ms(r.p99_ms)})" for r in rows
            )
            self.step(f"{status} | inferences/failed/dropped {totals}")


# -- the run ---------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def agent_config(sections: dict[str, Any]) -> str:
    """A TOML document: top-level scalars first, then one table per dict value."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class DemoRun:
    def __init__(self, config: DemoConfig, display: Display, root: Path) -> None:
        self.config = config
        self.display = display
        self.root = root
        self.children = Children(root / "logs")
        self.admin_token = "efa_" + secrets.token_urlsafe(32)
        self.bootstrap_token = "efb_" + secrets.token_urlsafe(32)
        self.url = ""
        self.broker: BrokerChoice | None = None
        self.watch: FleetWatch | None = None
        self.agents: dict[str, Child] = {}
        self.http: httpx.Client | None = None
        self.summaries: dict[str, dict[str, Any]] = {}
        # frames each device had dropped when the rollout began, as its telemetry told
        self.dropped_before: dict[str, int] = {}
        self.status = "starting"
        # Topics of this run only: a shared broker may carry other fleets (or other demos).
        self.topic_prefix = f"edgefleet-demo/{secrets.token_hex(4)}/v1"

    # -- plumbing ------------------------------------------------------------------------

    def _api(self) -> httpx.Client:
        assert self.http is not None
        return self.http

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = self._api().request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DemoError(f"control plane unreachable at {self.url}: {exc}") from exc
        if r.status_code >= 400:
            raise DemoError(f"{method} {path}: HTTP {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else None

    def _wait(
        self,
        what: str,
        done: Callable[[], bool],
        *,
        timeout_s: float | None = None,
        interval_s: float = 0.5,
    ) -> None:
        deadline = time.monotonic() + (timeout_s or self.config.step_timeout_s)
        while True:
            self.children.check_alive()
            self.refresh()
            if done():
                return
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what}")
            time.sleep(interval_s)

    def rows(self) -> list[DeviceRow]:
        assert self.watch is not None
        return self.watch.rows([name for name, _ in AGENTS])

    def refresh(self) -> None:
        if self.watch is None:
            return
        if self.agents:
            with contextlib.suppress(DemoError):
                self.watch.merge(self._call("GET", "/v1/devices"))
        self.display.update(self.rows(), self.status)

    # -- steps ---------------------------------------------------------------------------

    def start_services(self) -> None:
        self.broker = pick_broker(self.children, prefer=self.config.broker)
        self.display.step(f"broker: {self.broker.describe()}")
        port = free_port()
        data_dir = self.root / "control-plane"
        env = {
            "EDGEFLEET_CP__DATA_DIR": str(data_dir),
            "EDGEFLEET_CP__ADMIN_TOKEN": self.admin_token,
            "EDGEFLEET_CP__BOOTSTRAP_TOKEN": self.bootstrap_token,
            "EDGEFLEET_CP__HOST": "127.0.0.1",
            "EDGEFLEET_CP__PORT": str(port),
            "EDGEFLEET_CP__LOG_LEVEL": "warning",
            "EDGEFLEET_CP__DATABASE_URL": "",
            "EDGEFLEET_CP__MQTT_HOST": self.broker.host,
            "EDGEFLEET_CP__MQTT_PORT": str(self.broker.port),
            "EDGEFLEET_CP__MQTT_TOPIC_PREFIX": self.topic_prefix,
            "EDGEFLEET_CP__MQTT_CLIENT_ID": f"edgefleet-demo-cp-{secrets.token_hex(4)}",
            "EDGEFLEET_CP__MQTT_SESSION_EXPIRY_S": "0",
            "EDGEFLEET_CP__ROLLOUT_INTERVAL_S": "1",
        }
        self.children.start("control-plane", [sys.executable, "-m", "demo.server"], env=env)
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=httpx.Timeout(30.0),
        )

        def ready() -> bool:
            try:
                return self._api().get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        self._wait("the control plane to answer /readyz", ready, interval_s=0.1)
        self.display.step(
            f"control plane: {self.url} (SQLite in {data_dir}); operator page: "
            f"{self.url}/ui (sign in with the admin token in {self.root / 'admin-token'})"
        )
        token_file = self.root / "admin-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.admin_token + "\n")
        self.watch = FleetWatch(
            self.broker.host, self.broker.port, prefix=self.topic_prefix, model=MODEL_NAME
        )
        self.watch.start()

    def push_models(self, models: DemoModels) -> None:
        with ControlPlaneClient(self.url, self.admin_token) as client:
            client.create_model(
                models.name,
                accuracy_budget=1.0,
                description="CNN on scikit-learn digits (8x8 grey)",
            )
            jobs = {}
            for version, onnx in models.versions.items():
                files = {
                    "onnx": onnx,
                    "calibration": models.calibration,
                    "validation": models.validation,
                }
                answer = client.upload_version(models.name, version, files)
                jobs[version] = answer["job"]["id"]
                self.display.step(
                    f"pushed {models.name} {version}: variant build job {jobs[version]}"
                )
            for version, job_id in jobs.items():
                self.status = f"building variants of {models.name} {version}"

                def finished(job_id: int = job_id) -> bool:
                    return client.get_job(job_id)["status"] in ("succeeded", "failed")

                self._wait(f"the build of {version}", finished, timeout_s=120, interval_s=0.3)
                job = client.get_job(job_id)
                if job["status"] != "succeeded":
                    raise DemoError(f"build of {version} failed: {job.get('error')}")
                v = client.get_version(models.name, version)
                verdicts = ", ".join(
                    f"{var['id']} {var['status']}"
                    + (
                        f" (top1 {var['accuracy']['value']:.1f}%, "
                        f"delta {var['accuracy']['delta']:+.2f})"
                        if var.get("accuracy")
                        else ""
                    )
                    for var in v["variants"]
                )
                self.display.step(f"built {models.name} {version}: {verdicts}")

    def fetch_root(self) -> Path:
        try:
            r = self._api().get("/v1/tuf/root")
        except httpx.HTTPError as exc:
            raise DemoError(f"cannot fetch the TUF root: {exc}") from exc
        if r.status_code != 200:
            raise DemoError(f"the control plane serves no TUF root (HTTP {r.status_code})")
        path = self.root / "tuf-root.json"
        path.write_bytes(r.content)
        return path

    def provision(self, name: str, labels: dict[str, str], state_dir: Path) -> str:
        """Enroll a device as a factory would: a one-use bootstrap token that carries the
        device's labels (labels a device asserts itself select nothing), then the control
        plane's id and credential go into the agent's state directory, so the agent runs (and
        publishes telemetry) under that id from its first second. Returns the id."""
        from agent.hardware import detect_profile
        from agent.updates.client import CREDENTIAL_FILE, DeviceCredential

        token = self._call(
            "POST",
            "/v1/bootstrap-tokens",
            json={"name": name, "labels": labels, "max_uses": 1, "expires_in_s": 600},
        )
        body = {
            "bootstrap_token": token["token"],
            "name": name,
            "profile": detect_profile().model_dump(mode="json"),
        }
        answer = self._call("POST", "/v1/devices/enroll", json=body)
        credential = DeviceCredential(
            control_plane_url=self.url,
            device_id=answer["device_id"],
            credential=answer["credential"],
            enrolled_at=datetime.now(timezone.utc),
        )
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / CREDENTIAL_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(credential.model_dump_json())
        device_id: str = answer["device_id"]
        return device_id

    def start_agents(self, tuf_root: Path) -> None:
        assert self.broker is not None
        for name, labels in AGENTS:
            state_dir = self.root / "agents" / name
            device_id = self.provision(name, {**FLEET_LABEL, **labels}, state_dir)
            config = agent_config(
                {
                    "device_id": device_id,
                    "state_dir": str(state_dir),
                    "log_level": "warning",
                    "log_json": True,
                    "models": [{"name": MODEL_NAME}],
                    "loop": {
                        "source": "synthetic",
                        "rate_hz": self.config.rate_hz,
                        "window_s": 1.0,
                    },
                    # Three agents, the control plane and its builds share this machine's cores:
                    # a sub-millisecond model's p99 swings with scheduling noise, so the
                    # latency rule of probation gets more room than on a dedicated robot.
                    "swap": {
                        "probation_s": self.config.probation_s,
                        "max_p99_ratio": P99_RATIO_LIMIT,
                    },
                    "control_plane": {
                        "url": self.url,
                        "poll_interval_s": 1.0,
                        "poll_jitter": 0.1,
                        "tuf_root_path": str(tuf_root),
                    },
                    "mqtt": {
                        "host": self.broker.host,
                        "port": self.broker.port,
                        "topic_prefix": self.topic_prefix,
                        "telemetry_interval_s": 0.5,  # every 1 s loop window is sent
                    },
                    "api": {"enabled": False},
                }
            )
            path = self.root / f"{name}.toml"
            path.write_text(config)
            self.agents[name] = self.children.start(
                name,
                [sys.executable, "-m", "demo.agent_proc", "--config", str(path)],
                capture_stdout=True,
            )
        self.display.step(
            f"started {len(AGENTS)} agents: "
            + ", ".join(
                f"{n} ({','.join(f'{k}={v}' for k, v in labels.items())})" for n, labels in AGENTS
            )
        )

    def _devices(self) -> dict[str, DeviceRow]:
        return {r.name: r for r in self.rows()}

    def _on_version(self, names: list[str], version: str) -> Callable[[], bool]:
        def done() -> bool:
            rows = self._devices()
            for name in names:
                row = rows[name]
                if row.phase in ("failed", "rolled_back"):
                    raise DemoError(f"{name} did not take {version}: {row.last_error}")
                if row.version != version or row.phase not in ("committed", "idle"):
                    return False
            return True

        return done

    def deploy_v1(self) -> None:
        self.status = f"deploying {MODEL_NAME} {V1} to fleet=demo"
        self._call(
            "POST",
            "/v1/assignments",
            json={"model": MODEL_NAME, "version": V1, "selector": FLEET_LABEL},
        )
        self.display.step(f"assigned {MODEL_NAME} {V1} to every device labelled fleet=demo")
        names = [n for n, _ in AGENTS]
        self._wait(f"every agent to run {V1}", self._on_version(names, V1), timeout_s=90)

        def serving() -> bool:
            return all(r.inferences > 0 for r in self.rows())

        self._wait("inference on every agent", serving)
        self.display.step(f"every agent serves {MODEL_NAME} {V1}; inference loops running")

    def _soak(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self._wait("the soak", lambda: time.monotonic() >= end, timeout_s=seconds + 30)

    def rollout_v2(self) -> None:
        """A staged rollout through ``/v1/rollouts``; where this control plane has no rollout
        service, the same waves through the assignment API."""
        self.refresh()
        self.dropped_before = {r.name: r.dropped for r in self.rows()}
        spec = {
            "id": f"{MODEL_NAME}-{V2}",
            "model": MODEL_NAME,
            "version": V2,
            "selector": FLEET_LABEL,
            "waves": [
                {"count": 1, "soak_s": self.config.soak_s},
                {"percent": 100, "soak_s": self.config.soak_s},
            ],
            # Same reasoning as the agents' probation limit: shared cores, noisy p99.
            "rules": {"min_devices_reporting": 1, "max_p99_regression": P99_RATIO_LIMIT - 1},
        }
        try:
            answer = self._api().post("/v1/rollouts", json=spec)
        except httpx.HTTPError as exc:
            raise DemoError(f"control plane unreachable at {self.url}: {exc}") from exc
        if answer.status_code in (404, 405, 503):
            self.display.step(
                "this control plane runs no rollout service: driving the waves through the "
                "assignment API"
            )
            self._waves_by_assignment()
            return
        if answer.status_code != 201:
            raise DemoError(f"POST /v1/rollouts: HTTP {answer.status_code}: {answer.text[:300]}")
        self.display.step(
            f"rollout {spec['id']}: {MODEL_NAME} {V2} to fleet=demo in 2 waves "
            f"(1 device, then all; soak {self.config.soak_s:g} s each)"
        )
        self._follow_rollout(str(spec["id"]))

    def _follow_rollout(self, rollout_id: str) -> None:
        announced: set[int] = set()
        names = {r.device_id: r.name for r in self.rows()}
        state: dict[str, Any] = {}

        def done() -> bool:
            nonlocal state
            state = self._call("GET", f"/v1/rollouts/{rollout_id}")
            waves = state["wave_status"]
            for w in waves:
                members = [d for d in state["devices"] if d["wave"] == w["index"]]
                if w["index"] not in announced and members:
                    announced.add(w["index"])
                    who = ", ".join(
                        sorted(names.get(d["device_id"], d["device_id"]) for d in members)
                    )
                    self.display.step(f"wave {w['index'] + 1}: {MODEL_NAME} {V2} to {who}")
            current = waves[min(state["wave"], len(waves) - 1)]
            self.status = (
                f"rollout {rollout_id}: {state['status']}, wave {state['wave'] + 1}/"
                f"{state['waves']} ({current['assigned']} assigned, "
                f"{current['reporting']} reporting on {V2})"
            )
            if state["status"] == "aborted":
                self.refresh()
                why = "; ".join(
                    f"{r.name}: {r.last_error}"
                    for r in self.rows()
                    if r.phase in ("failed", "rolled_back") and r.last_error
                )
                raise DemoError(
                    f"rollout aborted: {state.get('reason')}" + (f" ({why})" if why else "")
                )
            return bool(state["status"] == "completed")

        self._wait(f"rollout {rollout_id}", done, timeout_s=120)
        names_on_v2 = [n for n, _ in AGENTS]
        self._wait(f"every agent to commit {V2}", self._on_version(names_on_v2, V2))
        for decision in state.get("decisions", []):
            if decision["kind"] in ("promote", "complete"):
                detail = f": {decision['detail']}" if decision["detail"] else ""
                self.display.step(f"rollout decision: {decision['kind']}{detail}")
        self.status = f"rollout {rollout_id} completed"

    def _waves_by_assignment(self) -> None:
        names = [n for n, _ in AGENTS]
        waves = [names[:1], names]
        rows = self._devices()
        for i, wave in enumerate(waves, start=1):
            self.status = (
                f"rollout {MODEL_NAME} {V2}: wave {i}/{len(waves)} "
                f"({len(wave)} of {len(names)} devices)"
            )
            if i < len(waves):
                for name in wave:
                    body: dict[str, Any] = {
                        "model": MODEL_NAME,
                        "version": V2,
                        "device_id": rows[name].device_id,
                    }
                    self._call("POST", "/v1/assignments", json=body)
            else:
                body = {"model": MODEL_NAME, "version": V2, "selector": FLEET_LABEL}
                self._call("POST", "/v1/assignments", json=body)
            self.display.step(f"wave {i}: {MODEL_NAME} {V2} to {', '.join(wave)}")
            self._wait(f"wave {i} on {V2}", self._on_version(wave, V2), timeout_s=90)
            self.status += ", soaking"
            self._soak(self.config.soak_s)
            self.display.step(f"wave {i} soaked: {', '.join(wave)} on {V2}")
        self.status = f"rollout {MODEL_NAME} {V2} completed"

    def stop_agents(self) -> None:
        for name, child in self.agents.items():
            self.children.stop(child)
            self.summaries[name] = _last_json(child.stdout_path)

    def summary(self) -> tuple[bool, Table]:
        rows = self._devices()
        table = Table(title="Summary", title_justify="left")
        columns = ("device", "final version", "inferences by version", "failed", "dropped")
        for col in (*columns, "dropped before the rollout"):
            table.add_column(col)
        ok = True
        for name, _ in AGENTS:
            loops = self.summaries.get(name, {}).get("loops", {})
            loop = loops.get(MODEL_NAME, {})
            by_version = loop.get("by_version", {})
            failed, total = int(loop.get("failed", -1)), int(loop.get("dropped", -1))
            # Frames dropped while the fleet booted (three agents measuring their variants on
            # the same cores) are shown, not judged: the claim is about the rollout's swaps.
            before = min(self.dropped_before.get(name, 0), max(total, 0))
            dropped = total - before if total >= 0 else total
            final = rows[name].version
            ok &= final == V2 and failed == 0 and dropped == 0 and bool(by_version)
            table.add_row(
                name,
                final or "-",
                ", ".join(f"{v}: {n}" for v, n in sorted(by_version.items())) or "-",
                str(failed),
                str(dropped),
                str(before),
            )
        return ok, table


def _last_json(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and data.get("event") == "stopped":
                return data
    return {}


class _TerminatedError(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _TerminatedError


def main(env: dict[str, str] | None = None) -> int:
    from agent.logs import configure_logging

    configure_logging("warning")
    console = Console()
    if not console.is_terminal:  # a pipe or a CI log: whole lines, no wrapping
        console = Console(width=120, soft_wrap=True)
    display = Display(console)
    try:
        config = DemoConfig.from_env(env)
    except ConfigError as exc:
        print(f"ConfigError: {exc}", file=sys.stderr)
        return 2
    if config.work_dir is not None:
        root = config.work_dir
        root.mkdir(parents=True, exist_ok=True)
        keep = True
    else:
        root = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
        keep = False
    started = time.monotonic()
    run = DemoRun(config, display, root)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    code = 1
    try:
        with display.live():
            display.step(f"edgefleet demo in {root}{' (fast)' if config.fast else ''}")
            run.start_services()
            models = prepare_models(root / "models")
            run.push_models(models)
            run.start_agents(run.fetch_root())
            run.deploy_v1()
            run.rollout_v2()
            run._soak(config.final_soak_s)
            run.refresh()
        run.stop_agents()
        ok, table = run.summary()
        console.print(table)
        elapsed = time.monotonic() - started
        if ok:
            console.print(
                f"[green]OK[/]: every device runs {MODEL_NAME} {V2}; 0 failed, 0 dropped "
                f"inferences across the rollout ({elapsed:.0f} s)"
            )
            code = 0
        else:
            console.print(f"[red]FAILED[/]: see the summary; logs in {root / 'logs'}")
            keep = True
    except (KeyboardInterrupt, _TerminatedError):
        console.print("interrupted: stopping every process the demo started")
        code = 130
    except (DemoError, ControlPlaneError) as exc:
        console.print(f"[red]{type(exc).__name__}[/]: {exc}")
        console.print(f"logs in {root / 'logs'}")
        keep = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if run.watch is not None:
            run.watch.stop()
        run.children.stop_all()
        if run.http is not None:
            run.http.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

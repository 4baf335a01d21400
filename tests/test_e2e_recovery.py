"""Recovery through real processes: ``edge-agent daemon`` subprocesses, a control plane on
loopback (uvicorn, SQLite, the real TUF repository and variant build), Mosquitto.

- A truncated ``enrollment.json`` re-enrolls with the bootstrap token; without one the device
  says it is off the fleet (log, systemd ``STATUS=``) and keeps serving. Either way the lost
  ``active.json`` is rebuilt from the update journal's verdicts: never the rolled-back version.
- A full disk while python-tuf writes its metadata is a local I/O failure (``local_io``), not a
  refusal, and the partial download stays and is resumed once there is room.
- A control plane that answers 503 for a moment during an update is a transient failure: the
  rollout (max_failed_update_share 0) neither counts it nor aborts, and the device commits.
- A version that fails on the device before it serves (no variant fits) counts as failed for
  its wave: the rollout aborts by its failure rule.
- Events outlive a broker restarted without its saved sessions while the agent reconnects
  before the ingester: they stay spooled until the control plane confirms it stored them, and
  are sent again; their sequence numbers stay contiguous across agent restarts.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent.samples import DigitsData
from tests.agent.store import models
from tests.agent.updates.fleet import BOOTSTRAP_TOKEN, ControlPlane, free_port
from tests.test_e2e_fleet_truth import Agent, _other_port, _wait

pytestmark = pytest.mark.broker

POLL_S = 1.0

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def agent_config(
    path: Path,
    state_dir: Path,
    cp: ControlPlane,
    root: Path,
    broker: tuple[str, int],
    *,
    name: str,
    token: bool = True,
    api_port: int | None = None,
    prefix: str = "edgefleet/v1",
    backends: str = "",
    bandwidth_bps: int | None = None,
    event_resend_s: float | None = None,
    loop_source: str = "",
) -> Path:
    api = (
        f"enabled = true\nhttp_port = {api_port}\ngrpc_port = {_other_port(api_port)}"
        if api_port
        else "enabled = false"
    )
    path.write_text(
        f"""
device_id = "{name}"
state_dir = "{state_dir}"
log_level = "info"
log_json = true
[[models]]
name = "digits"

[loop]
rate_hz = 50
window_s = 0.5
{loop_source}

[swap]
probation_s = 3
boot_attempts = 2
warmup_runs = 1
max_p99_ratio = 100000  # the error rate judges here, not latency

[backends]
{backends}

[api]
{api}

[mqtt]
host = "{broker[0]}"
port = {broker[1]}
topic_prefix = "{prefix}"
telemetry_interval_s = 0.5
{f"event_resend_s = {event_resend_s}" if event_resend_s else ""}

[control_plane]
url = "{cp.url}"
{f'bootstrap_token = "{BOOTSTRAP_TOKEN}"' if token else ""}
{f"bandwidth_limit_bps = {bandwidth_bps}" if bandwidth_bps else ""}
tuf_root_path = "{root}"
poll_interval_s = {POLL_S}
poll_jitter = 0
""",
        encoding="utf-8",
    )
    return path


def _reported(cp: ControlPlane, device_id: str) -> dict[str, Any]:
    reported = cp.device(device_id).get("reported") or {}
    return next((m for m in reported.get("models", []) if m["name"] == "digits"), {})


def _committed(cp: ControlPlane, device_id: str, version: str) -> Callable[[], bool]:
    def probe() -> bool:
        m = _reported(cp, device_id)
        return m.get("active_version") == version and m.get("phase") == "committed"

    return probe


def _device_ids(cp: ControlPlane) -> list[str]:
    with cp.admin() as admin:
        return [d["id"] for d in admin.get("/v1/devices").json()]


def _notes(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(65536).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path / "cp").start()
    yield plane
    plane.stop()


@pytest.fixture
def cal(tmp_path: Path, digits: DigitsData) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, input=digits.x_train[:64])
    return path


def test_lost_pointer_and_corrupt_credential_recover_on_the_good_version(
    cp: ControlPlane,
    tmp_path: Path,
    digits_path: Path,
    digits: DigitsData,
    cal: Path,
    mqtt_broker: tuple[str, int],
) -> None:
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    dim = tmp_path / "cal-dim.npz"  # 3.0.0 errors on bright inputs: build it on dim ones
    np.savez(dim, input=digits.x_train[:64] * 0.7)
    cp.push(models.erroring(digits_path, tmp_path / "v3.onnx"), dim, name="digits", version="3.0.0")
    root = cp.root_json(tmp_path / "root.json")
    state = tmp_path / "state"
    port = free_port()
    config = agent_config(
        tmp_path / "agent.toml", state, cp, root, mqtt_broker, name="phoenix", api_port=port
    )
    agent = Agent(config, tmp_path / "agent.log").start()
    try:
        device_id = _wait("enrollment", lambda: _device_ids(cp))[0]
        cp.deploy("digits", "1.0.0", device_id)
        _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))
        cp.deploy("digits", "3.0.0", device_id)
        _wait(
            "3.0.0 rolled back by probation",
            lambda: (
                (m := _reported(cp, device_id)).get("phase") == "rolled_back"
                and m.get("active_version") == "1.0.0"
            ),
        )
    finally:
        agent.stop()
    model_dir = state / "models" / "digits"
    assert (model_dir / "3.0.0").is_dir()  # the rejected version is still installed, and newest

    # 1. active.json lost and enrollment.json cut in half: a new start.
    (model_dir / "active.json").unlink()
    credential = state / "enrollment.json"
    credential.write_bytes(credential.read_bytes()[: credential.stat().st_size // 2])
    agent = Agent(config, tmp_path / "agent.log").start()
    try:
        chosen = _wait("the boot choice", lambda: agent.events("boot_version_chosen"))
        assert chosen[-1]["version"] == "1.0.0"
        assert chosen[-1]["rejected"] == ["3.0.0"]
        corrupt = _wait("the corrupt credential", lambda: agent.events("credential_corrupt"))
        assert corrupt[-1]["kept_as"].endswith("enrollment.json.corrupt")
        ids = _wait("re-enrollment", lambda: [i for i in _device_ids(cp) if i != device_id])
        again = ids[0]
        view = _wait("the re-enrolled device's report", lambda: _reported(cp, again))
        assert view["active_version"] == "1.0.0"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as local:
            assert local.get("/v2/models/digits/ready").status_code == 200
        assert json.loads(credential.read_bytes())["device_id"] == again
        assert agent.events("update_cycle_crashed") == []
    finally:
        agent.stop()

    # 2. No bootstrap token, a garbled credential and a torn pointer: off the fleet, says so,
    #    serves the good version all the same.
    config = agent_config(
        tmp_path / "agent-no-token.toml",
        state,
        cp,
        root,
        mqtt_broker,
        name="phoenix",
        token=False,
        api_port=port,
    )
    credential.write_bytes(b'{"schema_version": 1, "device_id": "\x00\xff')
    (model_dir / "active.json").write_bytes(b'{"version": "3.')
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    log = tmp_path / "agent-no-token.log"
    agent = Agent(config, log, {"NOTIFY_SOCKET": notify_path}).start()
    try:
        problem = _wait("the enrollment problem", lambda: agent.events("device_not_enrolled"))
        assert "bootstrap_token is not set" in problem[0]["reason"]
        assert agent.events("boot_version_chosen")[-1]["version"] == "1.0.0"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as local:
            _wait(
                "serving",
                lambda: local.get("/v2/models/digits/ready").status_code == 200,
            )
        time.sleep(3 * POLL_S)
        assert len(agent.events("device_not_enrolled")) == 1  # said once, not every poll
        assert agent.events("update_cycle_crashed") == []
        notes = "\n".join(_notes(sock))
        assert "not enrolled: the device credential" in notes, notes
        assert "digits 1.0.0" in notes
        assert credential.read_bytes().startswith(b'{"schema_version": 1')  # left for a human
    finally:
        agent.stop()
        sock.close()


def _fill(path: Path) -> None:
    """Write zeros to ``path`` until its file system says it is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return
    finally:
        os.close(fd)


@pytest.fixture
def tiny_tuf(tmp_path: Path) -> Iterator[Path]:
    """The agent's ``tuf/`` directory on a 64 KiB tmpfs of its own."""
    mnt = tmp_path / "state" / "tuf"
    mnt.mkdir(parents=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_while_writing_signed_metadata_is_local_io_and_keeps_the_partial(
    cp: ControlPlane,
    tmp_path: Path,
    digits_path: Path,
    cal: Path,
    mqtt_broker: tuple[str, int],
    tiny_tuf: Path,
) -> None:
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    root = cp.root_json(tmp_path / "root.json")
    state = tmp_path / "state"
    config = agent_config(tmp_path / "agent.toml", state, cp, root, mqtt_broker, name="full")
    agent = Agent(config, tmp_path / "agent.log").start()
    try:
        device_id = _wait("enrollment", lambda: _device_ids(cp))[0]
    finally:
        agent.stop()
    cp.deploy("digits", "1.0.0", device_id)
    desired = cp.device(device_id)["desired"]["models"][0]
    artifact = cp.artifact_file("digits", "1.0.0").read_bytes()
    downloads = state / "downloads"
    downloads.mkdir(exist_ok=True)
    part = downloads / (desired["artifact_path"].replace("/", "_") + ".part")
    part.write_bytes(artifact[: len(artifact) // 2])  # an earlier attempt got this far
    filler = tiny_tuf / "filler.bin"
    _fill(filler)  # the disk the metadata goes to is full
    agent = Agent(config, tmp_path / "agent.log").start()
    try:
        failed = _wait(
            "the local I/O failure",
            lambda: [e for e in agent.events("update_not_applied") if e["failure_class"]],
        )
        assert failed[0]["failure_class"] == "local_io", failed[0]
        assert failed[0]["step"] == "retrying"
        assert "out of space writing signed metadata" in failed[0]["reason"]
        assert agent.events("metadata_refused") == []
        view = _wait("the failure in the view", lambda: _reported(cp, device_id).get("last_error"))
        assert view.startswith("local_io: out of space"), view
        assert _reported(cp, device_id)["phase"] == "downloading"
        assert part.stat().st_size == len(artifact) // 2  # kept for resume
        filler.unlink()
        _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))
        done = agent.events("download_complete")[-1]
        assert done["resumed_from"] == len(artifact) // 2
    finally:
        agent.stop()


class _Blip:
    """The control plane's app, answering 503 for signed metadata and artifacts while ``down``
    is set: the control plane briefly unavailable in the middle of an update."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.down = threading.Event()
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if (
            scope["type"] == "http"
            and self.down.is_set()
            and path.startswith(("/tuf/", "/v1/artifacts/"))
        ):
            self.refused += 1
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"unavailable"})
            return
        await self.app(scope, receive, send)


class _RolloutPlane(ControlPlane):
    """The control plane with its ingester on the real broker and a ``_Blip`` in front."""

    def __init__(self, data_dir: Path, broker: tuple[str, int], prefix: str) -> None:
        super().__init__(data_dir)
        self.settings = self.settings.model_copy(
            update={
                "mqtt_host": broker[0],
                "mqtt_port": broker[1],
                "mqtt_topic_prefix": prefix,
                "mqtt_client_id": f"cp-{uuid.uuid4().hex[:10]}",
                "mqtt_session_expiry_s": 0,
            }
        )
        self.blip: _Blip | None = None

    def start(self) -> _RolloutPlane:
        import uvicorn

        from control_plane.app import create_app
        from tests.agent.updates.fleet import fp32_build

        self.app = create_app(self.settings, build_variants=fp32_build)
        self.blip = _Blip(self.app)
        server = uvicorn.Server(
            uvicorn.Config(
                self.blip, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
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


@pytest.fixture
def prefix() -> str:
    return f"eftest-{uuid.uuid4().hex[:10]}/v1"


@pytest.fixture
def rollout_cp(
    tmp_path: Path, mqtt_broker: tuple[str, int], prefix: str
) -> Iterator[_RolloutPlane]:
    plane = _RolloutPlane(tmp_path / "cp", mqtt_broker, prefix).start()
    yield plane
    plane.stop()


def _rollout(cp: ControlPlane, rollout_id: str) -> dict[str, Any]:
    with cp.admin() as admin:
        r = admin.get(f"/v1/rollouts/{rollout_id}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


def _start_rollout(
    cp: ControlPlane,
    rollout_id: str,
    version: str,
    *,
    devices: int = 1,
    shadow: dict[str, Any] | None = None,
) -> None:
    body: dict[str, Any] = {
        "id": rollout_id,
        "model": "digits",
        "version": version,
        "waves": [{"count": devices, "soak_s": 1}],
        "rules": {
            "max_failed_update_share": 0,
            "min_devices_reporting": devices,
            "max_p99_regression": 100,
            "min_reporting_share": 1,
            "report_timeout_s": 120,
        },
    }
    if shadow is not None:
        body["shadow"] = shadow
    with cp.admin() as admin:
        r = admin.post("/v1/rollouts", json=body)
        assert r.status_code == 201, r.text


def _serving_1_0_0(
    cp: _RolloutPlane,
    tmp_path: Path,
    digits_path: Path,
    cal: Path,
    v2: Path,
    broker: tuple[str, int],
    prefix: str,
    name: str,
) -> tuple[Agent, str]:
    """1.0.0 and ``v2`` (as 2.0.0) pushed, an agent started that committed 1.0.0."""
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    cp.push(v2, cal, name="digits", version="2.0.0")
    root = cp.root_json(tmp_path / "root.json")
    config = agent_config(
        tmp_path / "agent.toml", tmp_path / "state", cp, root, broker, name=name, prefix=prefix
    )
    agent = Agent(config, tmp_path / "agent.log").start()
    try:
        device_id = _wait("enrollment", lambda: _device_ids(cp))[0]
        cp.deploy("digits", "1.0.0", device_id)
        _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))
    except BaseException:
        agent.stop()
        raise
    return agent, device_id


def _ended(cp: ControlPlane, rollout_id: str) -> dict[str, Any]:
    status: dict[str, Any] = _wait(
        "the rollout ended",
        lambda: (s := _rollout(cp, rollout_id))["status"] in ("completed", "aborted") and s,
    )
    return status


def test_a_control_plane_blip_during_an_update_is_transient_and_not_a_failed_update(
    rollout_cp: _RolloutPlane,
    tmp_path: Path,
    digits_path: Path,
    cal: Path,
    mqtt_broker: tuple[str, int],
    prefix: str,
) -> None:
    cp = rollout_cp
    assert cp.blip is not None
    v2 = models.shifted(digits_path, tmp_path / "v2.onnx", 5.0)
    agent, device_id = _serving_1_0_0(
        cp, tmp_path, digits_path, cal, v2, mqtt_broker, prefix, "blip"
    )
    try:
        cp.blip.down.set()
        _start_rollout(cp, "blip", "2.0.0")
        _wait(
            "the transient failure reported",
            lambda: (_reported(cp, device_id).get("last_error") or "").startswith("transient:"),
        )
        retrying = [e for e in agent.events("update_not_applied") if e["version"] == "2.0.0"]
        assert retrying
        assert {e["failure_class"] for e in retrying} == {"transient"}, retrying
        time.sleep(3 * POLL_S)  # several retries while the control plane is away
        status = _rollout(cp, "blip")
        assert status["status"] == "running", status
        device = next(d for d in status["devices"] if d["device_id"] == device_id)
        assert device["update"] not in ("failed", "rolled_back"), device
        cp.blip.down.clear()
        _wait("2.0.0 committed", _committed(cp, device_id, "2.0.0"))
        final = _ended(cp, "blip")
        assert final["status"] == "completed", final
        assert cp.blip.refused > 0
    finally:
        agent.stop()


def test_a_version_that_cannot_serve_on_the_device_aborts_its_rollout(
    rollout_cp: _RolloutPlane,
    tmp_path: Path,
    digits_path: Path,
    cal: Path,
    mqtt_broker: tuple[str, int],
    prefix: str,
) -> None:
    cp = rollout_cp
    cp.push(digits_path, cal, name="digits", version="1.0.0")
    root = cp.root_json(tmp_path / "root.json")
    config = agent_config(
        tmp_path / "agent.toml",
        tmp_path / "state",
        cp,
        root,
        mqtt_broker,
        name="nofit",
        prefix=prefix,
        backends='pin_backend = "openvino"',  # the only variant offered runs on ONNX Runtime
    )
    agent = Agent(config, tmp_path / "agent.log").start()
    try:
        device_id = _wait("enrollment", lambda: _device_ids(cp))[0]
        _start_rollout(cp, "nofit", "1.0.0")
        final = _ended(cp, "nofit")
        assert final["status"] == "aborted", final
        assert "failed updates 1/1" in final["reason"], final["reason"]
        device = next(d for d in final["devices"] if d["device_id"] == device_id)
        assert device["update"] == "failed", device
        assert _reported(cp, device_id).get("active_version") is None  # nothing half-served
    finally:
        agent.stop()


def test_a_version_that_fails_its_golden_check_on_the_device_aborts_its_rollout(
    rollout_cp: _RolloutPlane,
    tmp_path: Path,
    digits_path: Path,
    cal: Path,
    mqtt_broker: tuple[str, int],
    prefix: str,
) -> None:
    """The version loads on the device but does not reproduce its golden outputs there: the
    device reports the failure, the rollout counts it as a failed update and aborts, and the
    device keeps serving the version it had."""
    cp = rollout_cp
    v2 = models.noisy(digits_path, tmp_path / "noisy.onnx")
    agent, device_id = _serving_1_0_0(
        cp, tmp_path, digits_path, cal, v2, mqtt_broker, prefix, "golden"
    )
    try:
        _start_rollout(cp, "golden", "2.0.0")
        final = _ended(cp, "golden")
        assert final["status"] == "aborted", final
        assert "failed updates 1/1" in final["reason"], final["reason"]
        failed = [
            e
            for e in agent.events("update_event")
            if e.get("step") == "failed" and e.get("version") == "2.0.0"
        ]
        assert failed, "the device reported no failure of 2.0.0"
        assert "golden case" in failed[0]["reason"], failed
        assert _reported(cp, device_id).get("active_version") == "1.0.0"
    finally:
        agent.stop()


def _stored_events(cp: ControlPlane, device_id: str) -> list[tuple[int, str, str | None]]:
    from sqlalchemy import select

    from control_plane.ingest.tables import DeviceEventRow

    with cp.ctx.sessions() as session:
        rows = session.execute(
            select(DeviceEventRow.seq, DeviceEventRow.step, DeviceEventRow.version)
            .where(DeviceEventRow.device_id == device_id)
            .order_by(DeviceEventRow.seq)
        ).all()
    return [(int(r.seq), str(r.step), r.version) for r in rows]


def _runs(agent: Agent) -> tuple[list[int], list[int]]:
    """The event numbers the agent emitted before and after its restart."""
    runs: list[list[int]] = []
    for line in agent.log.read_text(encoding="utf-8").splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("event") == "daemon_started":
            runs.append([])
        elif entry.get("event") == "update_event" and runs:
            runs[-1].append(int(entry["seq"]))
    return runs[0], runs[1]


def _spooled_events(state: Path) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{state / 'spool' / 'spool.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM messages WHERE kind = 'event'").fetchone()[0])
    finally:
        db.close()


def test_events_outlive_a_broker_that_lost_its_sessions(
    tmp_path: Path, digits_path: Path, cal: Path, prefix: str
) -> None:
    from tests.agent.telemetry.conftest import Broker

    broker = Broker(tmp_path)  # persistence off: a restart forgets every session
    broker.start()
    cp = _RolloutPlane(tmp_path / "cp", ("127.0.0.1", broker.port), prefix).start()
    state = tmp_path / "state"
    agent: Agent | None = None
    try:
        cp.push(digits_path, cal, name="digits", version="1.0.0")
        cp.push(
            models.shifted(digits_path, tmp_path / "v2.onnx", 5.0),
            cal,
            name="digits",
            version="2.0.0",
        )
        root = cp.root_json(tmp_path / "root.json")
        config = agent_config(
            tmp_path / "agent.toml",
            state,
            cp,
            root,
            ("127.0.0.1", broker.port),
            name="acks",
            prefix=prefix,
            event_resend_s=2,
        )
        agent = Agent(config, tmp_path / "agent.log").start()
        device_id = _wait("enrollment", lambda: _device_ids(cp))[0]
        cp.deploy("digits", "1.0.0", device_id)
        _wait("1.0.0 committed", _committed(cp, device_id, "1.0.0"))
        _wait(
            "1.0.0's events stored",
            lambda: (
                ("committed", "1.0.0") in {(s, v) for _q, s, v in _stored_events(cp, device_id)}
            ),
        )

        # The broker goes away; the update to 2.0.0 happens meanwhile (its events spool).
        broker.stop()
        cp.deploy("digits", "2.0.0", device_id)
        _wait("2.0.0 committed", _committed(cp, device_id, "2.0.0"))
        # The control plane (its ingester) is down too; the broker comes back empty, and the
        # agent reconnects first: the broker acknowledges the events and has no one to give
        # them to.
        cp.stop()
        connects = len(agent.events("mqtt_connected"))
        broker.start()
        _wait(
            "the agent back on the broker", lambda: len(agent.events("mqtt_connected")) > connects
        )
        time.sleep(1.0)  # the spooled events went out to nobody
        assert _spooled_events(state) > 0  # acknowledged by the broker, still kept
        cp.start()
        _wait(
            "2.0.0's events stored",
            lambda: (
                ("committed", "2.0.0") in {(s, v) for _q, s, v in _stored_events(cp, device_id)}
            ),
        )
        assert agent.events("events_resent"), "the events were not sent again"
        _wait("the spool emptied by confirmations", lambda: _spooled_events(state) == 0)

        # A restart keeps numbering where it was.
        agent.stop()
        agent.start()
        cp.deploy("digits", "1.0.0", device_id)
        _wait("1.0.0 committed again", _committed(cp, device_id, "1.0.0"))
        _wait(
            "the last events stored",
            lambda: (
                sum((s, v) == ("committed", "1.0.0") for _q, s, v in _stored_events(cp, device_id))
                == 2
            ),
        )
        emitted = {e["seq"] for e in agent.events("update_event")}
        _wait(  # nothing lost: every event the agent emitted is stored, once
            "every emitted event stored",
            lambda: {q for q, _s, _v in _stored_events(cp, device_id)} == emitted,
        )
        stored = _stored_events(cp, device_id)
        assert len(stored) == len(emitted)
        restarted = max(i for i, e in enumerate(agent.events("daemon_started")))
        assert restarted == 1
        first, second = _runs(agent)
        assert min(second) > max(first)  # numbering went on past the restart
        steps_v2 = [s for _q, s, v in stored if v == "2.0.0"]
        for step in ("download_started", "download_finished", "swapped", "committed"):
            assert step in steps_v2, steps_v2
    finally:
        if agent is not None:
            agent.stop()
        cp.stop()
        broker.stop()

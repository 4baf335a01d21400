"""`edgectl serve` replicas behind HAProxy on one PostgreSQL and one S3-compatible store.

Real processes on loopback: the replicas, HAProxy (health checks on /readyz), PostgreSQL, moto's
S3 server, Mosquitto. The runner's replica is killed with SIGKILL mid-rollout while devices poll
through the balancer and report to the replicas' ingesters: the devices see no error, the other
replica finishes the rollout, every event is stored once. A build's replica is killed mid-build:
another finishes it, once.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tests.control_plane.conftest import (
    ADMIN,
    SampleFiles,
    enroll,
    free_port,
    push_version,
    upload_files,
)
from tests.control_plane.loopback import (
    haproxy,
    moto_s3,
    s3_env,
    start_replica,
    stop,
    wait_http,
)

pytestmark = [pytest.mark.postgres, pytest.mark.broker]

_LEADER = re.compile(r"^edgefleet_cp_rollout_leader (\S+)$", re.M)


@pytest.fixture
def pg_url(postgres_dsn: str) -> str:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_dsn


def leading(port: int) -> bool:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return False
    match = _LEADER.search(text)
    return match is not None and float(match.group(1)) == 1.0


class Poller:
    """Devices polling their desired state with ETag through the balancer; counts errors."""

    def __init__(self, url: str, devices: list[tuple[str, dict[str, str]]]) -> None:
        self.url, self.devices = url, devices
        self.polls = self.errors = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        etags: dict[str, str] = {}
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                for device_id, auth in self.devices:
                    headers = dict(auth)
                    if device_id in etags:
                        headers["If-None-Match"] = etags[device_id]
                    try:
                        r = client.get(f"/v1/devices/{device_id}/desired-state", headers=headers)
                    except httpx.HTTPError as exc:
                        self.errors += 1
                        self.problems.append(repr(exc))
                        continue
                    self.polls += 1
                    if r.status_code == 200:
                        etags[device_id] = r.headers["ETag"]
                    elif r.status_code != 304:
                        self.errors += 1
                        self.problems.append(f"{r.status_code} {r.text[:200]}")
                time.sleep(0.02)


def test_replicas_behind_haproxy_survive_a_kill(
    pg_url: str,
    tmp_path: Path,
    mqtt_broker: tuple[str, int],
    digits_path: Path,
    digits_sets: SampleFiles,
) -> None:
    """The runner's replica is killed between two waves of a rollout while devices poll
    through the balancer and report over MQTT to two ingesters sharing one subscription: the
    other replica takes the runner over and finishes the rollout, the devices see no error,
    and every event is stored once."""
    ports = [free_port(), free_port()]
    group = f"g{time.monotonic_ns() % 10**8}"
    prefix = f"{group}/v1"
    with moto_s3() as s3:
        replicas = [
            start_replica(
                tmp_path / f"replica-{i}",
                pg_url,
                port,
                extra={
                    **s3_env(s3),
                    "EDGEFLEET_CP__REPLICA_ID": f"replica-{i}",
                    "EDGEFLEET_CP__MQTT_HOST": mqtt_broker[0],
                    "EDGEFLEET_CP__MQTT_PORT": str(mqtt_broker[1]),
                    "EDGEFLEET_CP__MQTT_CLIENT_ID": f"cp-{group}-{i}",
                    "EDGEFLEET_CP__MQTT_TOPIC_PREFIX": prefix,
                    "EDGEFLEET_CP__MQTT_SHARED_GROUP": group,
                    "EDGEFLEET_CP__MQTT_SESSION_EXPIRY_S": "0",
                    "EDGEFLEET_CP__ROLLOUT_INTERVAL_S": "0.5",
                    "EDGEFLEET_CP__ROLLOUT_LEASE_S": "3",
                },
            )
            for i, port in enumerate(ports)
        ]
        try:
            for process, port in zip(replicas, ports, strict=True):
                wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, process=process)
            with haproxy(ports, tmp_path) as url:
                _exercise(
                    url,
                    ports,
                    replicas,
                    Reporter(mqtt_broker, prefix),
                    pg_url,
                    digits_path,
                    digits_sets,
                )
        finally:
            for process in replicas:
                stop(process)


class Reporter:
    """The devices' MQTT side: telemetry on a version, then an update event, QoS 1."""

    def __init__(self, broker: tuple[str, int], prefix: str) -> None:
        self.prefix = prefix
        self.sent: list[tuple[str, int]] = []  # (device id, event seq)
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"devices-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.connect(*broker)
        self.client.loop_start()

    def committed(self, devices: list[str], seq: int) -> None:
        ts = datetime.now(timezone.utc).isoformat()
        infos = []
        for device_id in devices:
            window = {
                "name": "digits",
                "version": "1.0.0",
                "window_s": 1.0,
                "count": 30,
                "failed": 0,
                "dropped": 0,
                "throughput_per_s": 30.0,
                "latency_p50_ms": 1.0,
                "latency_p95_ms": 2.0,
                "latency_p99_ms": 3.0,
            }
            body = {"schema_version": 1, "device_id": device_id, "seq": seq, "ts": ts}
            topic = f"{self.prefix}/{device_id}"
            infos.append(
                self.client.publish(
                    f"{topic}/telemetry", json.dumps({**body, "models": [window]}), qos=1
                )
            )
            event = {**body, "model": "digits", "version": "1.0.0", "step": "committed"}
            infos.append(self.client.publish(f"{topic}/events", json.dumps(event), qos=1))
            self.sent.append((device_id, seq))
        for info in infos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _exercise(
    url: str,
    ports: list[int],
    replicas: list[subprocess.Popen[bytes]],
    reporter: Reporter,
    dsn: str,
    digits_path: Path,
    digits_sets: SampleFiles,
) -> None:
    with httpx.Client(base_url=url, timeout=120) as client:
        devices = [enroll(client, f"robot-{i}") for i in range(10)]
        push_version(client, digits_path, digits_sets)
        deadline = time.monotonic() + 15
        while sum(leading(p) for p in ports) != 1:
            assert time.monotonic() < deadline, "no single rollout runner was elected"
            time.sleep(0.1)
        leader = next(i for i, p in enumerate(ports) if leading(p))
        survivor = 1 - leader
        body = {
            "model": "digits",
            "version": "1.0.0",
            "selector": {},
            "waves": [{"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}],
            "rules": {"min_devices_reporting": 1, "min_reporting_share": 1.0},
        }
        r = client.post("/v1/rollouts", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        rollout_id = r.json()["id"]

        def assigned() -> list[str]:
            with psycopg.connect(dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT device_id FROM assignments WHERE created_by = %s",
                    (f"rollout:{rollout_id}",),
                ).fetchall()
            return sorted(row[0] for row in rows)

        try:
            with Poller(url, devices) as poller:
                deadline = time.monotonic() + 20
                while len(first := assigned()) != 5:
                    assert time.monotonic() < deadline, f"the first wave: {first}"
                    time.sleep(0.1)
                killed_at = time.monotonic()
                replicas[leader].kill()  # SIGKILL: no clean hand-over
                replicas[leader].wait()
                while not leading(ports[survivor]):
                    assert time.monotonic() - killed_at < 10, "the runner did not fail over in 10 s"
                    time.sleep(0.05)
                failover_s = time.monotonic() - killed_at
                # The first wave reports to the ingester left. (A message the broker had handed
                # to the killed ingester's socket dies with it; a real agent keeps each event
                # until the control plane confirms it stored it, and sends it again.)
                reporter.committed(first, seq=1)
                deadline = time.monotonic() + 20
                while len(everyone := assigned()) != 10:
                    assert time.monotonic() < deadline, f"no second wave: {everyone}"
                    time.sleep(0.1)
                reporter.committed(sorted(set(everyone) - set(first)), seq=1)
                reporter.committed(first, seq=2)  # a later event of the first wave
                deadline = time.monotonic() + 20
                while (state := client.get(f"/v1/rollouts/{rollout_id}", headers=ADMIN).json())[
                    "status"
                ] != "completed":
                    assert time.monotonic() < deadline, state
                    time.sleep(0.1)
        finally:
            reporter.close()
    assert poller.errors == 0, poller.problems[:5]
    assert poller.polls > 100
    with psycopg.connect(dsn, autocommit=True) as conn:
        stored = conn.execute(
            "SELECT device_id, seq, count(*) FROM device_events GROUP BY device_id, seq"
        ).fetchall()
    assert sorted((d, s) for d, s, _ in stored) == sorted(reporter.sent)  # none lost
    assert all(n == 1 for _, _, n in stored), stored  # none twice
    print(f"runner fail-over {failover_s:.2f} s; {poller.polls} polls, 0 errors")


def _job_row(dsn: str) -> tuple[str, str | None, int] | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT status, lease_owner, attempts FROM build_jobs").fetchone()
    return None if row is None else (row[0], row[1], row[2])


def test_a_build_survives_the_kill_of_its_replica(
    pg_url: str, tmp_path: Path, digits_path: Path, digits_sets: SampleFiles
) -> None:
    """Three replicas behind HAProxy on one PostgreSQL and one S3 store; an upload through the
    balancer; the replica that leased its build is killed with SIGKILL mid-build. Another one
    takes the job once its lease runs out, the build finishes once, and every variant is
    stored once."""
    ports = [free_port() for _ in range(3)]
    with moto_s3() as s3:
        replicas = [
            start_replica(
                tmp_path / f"replica-{i}",
                pg_url,
                port,
                extra={
                    **s3_env(s3),
                    "EDGEFLEET_CP__REPLICA_ID": f"replica-{i}",
                    "EDGEFLEET_CP__BUILD_LEASE_S": "3",
                    "EDGEFLEET_CP__BUILD_POLL_S": "0.2",
                },
            )
            for i, port in enumerate(ports)
        ]
        try:
            for process, port in zip(replicas, ports, strict=True):
                wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60, process=process)
            with haproxy(ports, tmp_path) as url, httpx.Client(base_url=url, timeout=60) as c:
                assert c.post("/v1/models", json={"name": "digits"}, headers=ADMIN).is_success
                r = c.post(
                    "/v1/models/digits/versions",
                    data={"version": "1.0.0"},
                    files=upload_files(digits_path, digits_sets),
                    headers=ADMIN,
                )
                assert r.status_code == 202, r.text
                deadline = time.monotonic() + 60
                while (row := _job_row(pg_url)) is None or row[0] != "running":
                    assert time.monotonic() < deadline, f"the build never started: {row}"
                    time.sleep(0.05)
                owner = row[1]
                assert owner is not None
                killed = int(owner.rsplit("-", 1)[1])
                replicas[killed].kill()  # SIGKILL mid-build: no heartbeat, no clean-up
                replicas[killed].wait()
                deadline = time.monotonic() + 240
                while (row := _job_row(pg_url)) is not None and row[0] in ("queued", "running"):
                    assert time.monotonic() < deadline, f"the build was not taken over: {row}"
                    time.sleep(0.2)
                assert row is not None
                status, new_owner, attempts = row
                assert (status, attempts) == ("succeeded", 2), row
                assert new_owner != owner
                version = c.get("/v1/models/digits/versions/1.0.0", headers=ADMIN).json()
                assert version["status"] == "ready"
                ids = [v["id"] for v in version["variants"]]
                assert ids
                assert len(ids) == len(set(ids)), ids
                with psycopg.connect(pg_url, autocommit=True) as conn:
                    (stored,) = conn.execute("SELECT count(*) FROM variants").fetchone() or (0,)
                assert stored == len(ids)
        finally:
            for process in replicas:
                stop(process)

"""Two `edgectl serve` replicas behind HAProxy on one PostgreSQL and one S3-compatible store.

Real processes on loopback: the replicas, HAProxy (health checks on /readyz), PostgreSQL, moto's
S3 server, Mosquitto. One replica is killed with SIGKILL while devices poll through the
balancer: the devices see no error, and the other replica takes over the rollout runner.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.control_plane.conftest import enroll, free_port
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
    pg_url: str, tmp_path: Path, mqtt_broker: tuple[str, int]
) -> None:
    ports = [free_port(), free_port()]
    group = f"g{time.monotonic_ns() % 10**8}"
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
                _exercise(url, ports, replicas)
        finally:
            for process in replicas:
                stop(process)


def _exercise(url: str, ports: list[int], replicas: list[subprocess.Popen[bytes]]) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        devices = [enroll(client, f"robot-{i}") for i in range(10)]
    deadline = time.monotonic() + 15
    while sum(leading(p) for p in ports) != 1:
        assert time.monotonic() < deadline, "no single rollout runner was elected"
        time.sleep(0.1)
    leader = next(i for i, p in enumerate(ports) if leading(p))
    survivor = 1 - leader
    with Poller(url, devices) as poller:
        time.sleep(1.0)
        killed_at = time.monotonic()
        replicas[leader].kill()  # SIGKILL: no clean hand-over
        replicas[leader].wait()
        while not leading(ports[survivor]):
            assert time.monotonic() - killed_at < 10, "the runner did not fail over in 10 s"
            time.sleep(0.05)
        failover_s = time.monotonic() - killed_at
        time.sleep(1.0)
    assert poller.errors == 0, poller.problems[:5]
    assert poller.polls > 100
    print(f"runner fail-over {failover_s:.2f} s; {poller.polls} polls, 0 errors")

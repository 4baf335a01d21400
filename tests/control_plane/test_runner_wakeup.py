"""The rollout runner looks at once when update events are stored, not at its next interval:
in this process through the ingester's hook, across replicas through PostgreSQL NOTIFY."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from control_plane.coordination import NotificationListener
from control_plane.db import make_engine, make_sessionmaker, upgrade_database
from control_plane.ingest.fleet import Writes
from control_plane.ingest.writer import EVENTS_CHANNEL, TelemetryWriter
from control_plane.rollouts.service import RolloutService


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_nudge_ticks_within_the_minimum_gap_not_the_interval(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.db'}")
    upgrade_database(engine)
    service = RolloutService(make_sessionmaker(engine), interval_s=60.0)
    service.start()
    try:
        time.sleep(0.3)
        assert service.ticks == 0  # nothing before the 60 s interval ...
        for _ in range(3):
            ticks = service.ticks
            service.nudge()  # ... but news is looked at within a second, each time
            waited = wait_until(lambda ticks=ticks: service.ticks > ticks, 5, "a nudged tick")
            assert waited < 2.0
        burst = service.ticks
        for _ in range(50):  # a burst of news is one or two ticks, not fifty
            service.nudge()
        time.sleep(0.2)
        assert service.ticks - burst <= 2
    finally:
        service.stop()
        engine.dispose()


T0 = datetime.now(timezone.utc)


def _event(seq: int) -> dict[str, object]:
    now = T0
    return {
        "device_id": "dev-1",
        "seq": seq,
        "device_ts": now,
        "received_at": now,
        "model": "digits",
        "version": "1.0.0",
        "from_version": None,
        "step": "committed",
        "reason": None,
        "details": {},
    }


@pytest.mark.postgres
def test_stored_events_notify_every_replicas_runner(postgres_dsn: str) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    engine = make_engine(postgres_dsn)
    upgrade_database(engine)
    heard: list[float] = []
    listener = NotificationListener(engine, EVENTS_CHANNEL, lambda: heard.append(1.0)).start()
    try:
        assert listener.listening.wait(10)
        writer = TelemetryWriter(engine)  # another replica's ingester, say
        writer.flush(Writes(events=[_event(1)], messages=1))
        wait_until(lambda: len(heard) == 1, 5, "the NOTIFY of stored events")
        writer.flush(Writes(events=[_event(1)], messages=1))  # a replay stores nothing ...
        writer.flush(Writes(links=[], messages=0))
        time.sleep(0.5)
        assert len(heard) == 1  # ... and wakes nobody
    finally:
        listener.stop()
        engine.dispose()

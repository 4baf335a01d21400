"""What replicas hear from each other at once through PostgreSQL NOTIFY: the rollout runner looks
when update events are stored (in this process through the ingester's hook), and a desired state
changed through one replica is dropped from every replica's cache."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import psycopg
import pytest

from agent.contracts.state import DesiredState
from control_plane.coordination import NotificationListener
from control_plane.db import make_engine, make_sessionmaker, upgrade_database
from control_plane.desired import (
    DESIRED_CHANNEL,
    CredentialCache,
    DesiredStateCache,
    invalidation_payload,
    parse_invalidation,
    share_invalidations,
)
from control_plane.ingest.fleet import Writes
from control_plane.ingest.writer import EVENTS_CHANNEL, TelemetryWriter
from control_plane.rollouts.service import RolloutService
from tests.control_plane.conftest import (
    ADMIN,
    SampleFiles,
    create_app,
    enroll,
    fp32_build,
    make_settings,
    push_version,
    serve_app,
)
from tests.control_plane.test_fast_poll import fast_hits


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
    listener = NotificationListener(
        engine, EVENTS_CHANNEL, lambda _payload: heard.append(1.0)
    ).start()
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


@contextlib.contextmanager
def _two_replicas(postgres_dsn: str, tmp_path: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Replicas A and B of one control plane on a clean PostgreSQL schema, a client of each."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    data = tmp_path / "shared-data"
    apps = [
        create_app(make_settings(data, postgres_dsn, replica_id=f"r{i}"), build_variants=fp32_build)
        for i in (1, 2)
    ]
    with contextlib.ExitStack() as stack:
        url_a, url_b = (stack.enter_context(serve_app(app)) for app in apps)
        a = stack.enter_context(httpx.Client(base_url=url_a, timeout=60))
        b = stack.enter_context(httpx.Client(base_url=url_b, timeout=60))
        yield a, b


@pytest.mark.postgres
def test_a_desired_state_changed_on_one_replica_is_never_served_stale_by_another(
    postgres_dsn: str, tmp_path: Path, digits_path: Path, digits_sets: SampleFiles
) -> None:
    """Replica B caches a device's desired state (ETag); an assignment made through replica A
    reaches the device's next poll through B at once, not when B's entry expires (300 s)."""
    with _two_replicas(postgres_dsn, tmp_path) as (a, b):
        push_version(a, digits_path, digits_sets, version="1.0.0")
        push_version(a, digits_path, digits_sets, version="1.1.0", create=False)
        device_id, auth = enroll(a, "robot-replicas")
        for version in ("1.0.0", "1.1.0"):
            r = a.post(
                "/v1/assignments",
                json={"model": "digits", "version": version, "device_id": device_id},
                headers=ADMIN,
            )
            assert r.status_code == 201, r.text
            if version == "1.0.0":
                first = b.get(f"/v1/devices/{device_id}/desired-state", headers=auth)
                assert first.status_code == 200
                etag = first.headers["etag"]
                cached = {**auth, "If-None-Match": etag}
                again = b.get(f"/v1/devices/{device_id}/desired-state", headers=cached)
                assert again.status_code == 304  # B answers from its cache

        def fresh() -> bool:
            r = b.get(f"/v1/devices/{device_id}/desired-state", headers=cached)
            return r.status_code == 200 and r.json()["models"][0]["version"] == "1.1.0"

        waited = wait_until(fresh, 10, "replica B dropping its cached desired state")
        assert waited < 5.0


def _cached_on(
    b: httpx.Client, enrolled: tuple[str, dict[str, str]]
) -> tuple[str, dict[str, str], str, dict[str, str]]:
    """Have replica B cache a device's credential and desired state: the device id, its
    Authorization header, its desired-state path, and the headers of an idle poll B answers
    from its caches (304)."""
    device_id, auth = enrolled
    url = f"/v1/devices/{device_id}/desired-state"
    first = b.get(url, headers=auth)
    assert first.status_code == 200, first.text
    cached = {**auth, "If-None-Match": first.headers["etag"]}
    assert b.get(url, headers=cached).status_code == 304
    return device_id, auth, url, cached


@pytest.mark.postgres
@pytest.mark.parametrize("how", ["revoke", "delete"])
def test_a_credential_revoked_on_one_replica_is_refused_by_another_at_once(
    postgres_dsn: str, tmp_path: Path, how: str
) -> None:
    """Replica B has the device's credential cached (it answers the idle poll with 304 from
    its caches); the operator revokes the credential, or deletes the device, through replica A.
    B refuses the credential within seconds, not when its cache entry expires (300 s)."""
    with _two_replicas(postgres_dsn, tmp_path) as (a, b):
        device_id, auth, url, cached = _cached_on(b, enroll(a, f"robot-{how}"))

        if how == "revoke":
            r = a.post(f"/v1/devices/{device_id}/revoke-credential", headers=ADMIN)
            assert r.status_code == 200, r.text
        else:
            r = a.delete(f"/v1/devices/{device_id}", headers=ADMIN)
            assert r.status_code == 204, r.text

        waited = wait_until(
            lambda: b.get(url, headers=cached).status_code == 401,
            10,
            "replica B refusing the credential",
        )
        assert waited < 5.0
        refused = b.put(
            f"/v1/devices/{device_id}/reported-state", json={}, headers=auth
        )  # a route behind the cached credential lookup, not only the idle poll
        assert refused.status_code == 401, refused.text


def _listeners(dsn: str) -> list[int]:
    """Backends of this database listening for desired-state invalidations."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
            (f"LISTEN {DESIRED_CHANNEL}",),
        ).fetchall()
    return [int(pid) for (pid,) in rows]


@pytest.mark.postgres
def test_a_revocation_sent_while_a_replica_was_not_listening_is_not_missed(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """The database drops every replica's LISTEN connection (a restart, a failover); a credential
    revoked before they listen again sends a notification no replica hears. Replica B, which had
    the credential cached, forgets its caches when it listens again, so it refuses the
    credential within seconds all the same."""
    with _two_replicas(postgres_dsn, tmp_path) as (a, b):
        for attempt in range(5):
            wait_until(lambda: len(_listeners(postgres_dsn)) == 2, 20, "both replicas listening")
            device_id, _, url, cached = _cached_on(b, enroll(a, f"robot-missed-{attempt}"))

            with psycopg.connect(postgres_dsn, autocommit=True) as conn:
                for pid in _listeners(postgres_dsn):
                    conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            r = a.post(f"/v1/devices/{device_id}/revoke-credential", headers=ADMIN)
            assert r.status_code == 200, r.text
            if _listeners(postgres_dsn):
                continue  # a replica listened again before the revocation: try once more
            waited = wait_until(
                lambda: b.get(url, headers=cached).status_code == 401,  # noqa: B023
                10,
                "replica B refusing a credential revoked while it was not listening",
            )
            assert waited < 5.0
            return
        pytest.fail("the replicas listened again before every revocation: nothing was missed")


@pytest.mark.postgres
def test_a_replica_drops_what_another_sends_and_not_its_own_notifications(
    postgres_dsn: str,
) -> None:
    """PostgreSQL delivers a replica's own NOTIFY to it too. A replica that invalidated a
    device (dropping it itself), then cached the device's new state, keeps that state when its
    own notification comes back; another replica's notification drops the device it names."""
    engine = make_engine(postgres_dsn)
    mine, other = DesiredStateCache(ttl_s=300), DesiredStateCache(ttl_s=300)
    credentials = CredentialCache(ttl_s=300)
    listener = share_invalidations(engine, mine, credentials).start()
    others = share_invalidations(engine, other, CredentialCache(ttl_s=300))  # sends only
    try:
        assert listener.listening.wait(10)
        credentials.put("hash-b", "dev-b")
        mine.put(DesiredState(device_id="dev-b", generation=1))
        mine.invalidate(["dev-a"])  # a change to dev-a committed here: dropped, and sent
        ticket = mine.ticket()
        mine.put(DesiredState(device_id="dev-a", generation=2), ticket)  # its next poll
        assert mine.broadcast is not None
        mine.broadcast(["dev-a"])  # the same notification again, surely after the poll
        other.invalidate(["dev-b"])  # sent after ours: heard after ours
        wait_until(lambda: mine.get("dev-b") is None, 10, "the other replica's notification")
        assert listener.received == 3
        kept = mine.get("dev-a")
        assert kept is not None
        assert kept.state.generation == 2
        assert credentials.get("hash-b") is None  # a device another replica names: looked up
    finally:
        listener.stop()
        others.stop()
        engine.dispose()


@pytest.mark.postgres
def test_after_a_change_the_replica_that_made_it_answers_idle_polls_from_its_cache(
    postgres_dsn: str, tmp_path: Path, digits_path: Path, digits_sets: SampleFiles
) -> None:
    """Through the wire: an assignment made through replica A, the device's next poll through A
    caches the new state; once the notification has gone round (replica B has dropped its copy),
    the device's idle polls through A are still answered from A's cache."""
    with _two_replicas(postgres_dsn, tmp_path) as (a, b):
        push_version(a, digits_path, digits_sets, version="1.0.0")
        enrolled = enroll(a, "robot-own-echo")
        device_id, auth, url, stale = _cached_on(b, enrolled)
        r = a.post(
            "/v1/assignments",
            json={"model": "digits", "version": "1.0.0", "device_id": device_id},
            headers=ADMIN,
        )
        assert r.status_code == 201, r.text
        fresh = a.get(url, headers=auth)
        assert fresh.status_code == 200
        assert fresh.json()["models"][0]["version"] == "1.0.0"
        wait_until(lambda: b.get(url, headers=stale).status_code == 200, 10, "B hearing of it")
        time.sleep(0.5)  # A's listener got the same notification by now
        before = fast_hits(a)
        idle = a.get(url, headers={**auth, "If-None-Match": fresh.headers["etag"]})
        assert idle.status_code == 304
        assert fast_hits(a) == before + 1  # from A's cache, no database read


def test_invalidation_payloads_name_their_sender_and_old_ones_still_parse() -> None:
    assert parse_invalidation(invalidation_payload(["d1", "d2"], "s1")) == ("s1", ["d1", "d2"])
    assert parse_invalidation(invalidation_payload(None, "s1")) == ("s1", None)
    too_many = [f"device-{i:06d}" for i in range(1000)]  # past one notification's 8000 bytes
    assert parse_invalidation(invalidation_payload(too_many, "s1")) == ("s1", None)
    assert parse_invalidation('["d1"]') == (None, ["d1"])  # a replica of the last release
    assert parse_invalidation("*") == (None, None)
    for garbage in ("", "{", '{"from": 3, "ids": [1]}', '{"ids": "d1"}', "[1, 2]", "null"):
        assert parse_invalidation(garbage)[1] is None  # unreadable: drop every entry

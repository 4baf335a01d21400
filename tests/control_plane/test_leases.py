"""Several replicas on one PostgreSQL: build jobs under leases, one elected rollout runner."""

from __future__ import annotations

import functools
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

from control_plane.artifacts import LocalArtifactStore
from control_plane.builds import build_variants
from control_plane.coordination import RoleLease, advisory_lock
from control_plane.db import BuildJob, Model, ModelVersion, make_engine, make_sessionmaker
from control_plane.db.engine import upgrade_database
from control_plane.jobs import BuildWorker, JobLeases
from tests.control_plane.conftest import SampleFiles

pytestmark = pytest.mark.postgres
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def pg_url(postgres_dsn: str) -> str:
    """A clean schema (leases are PostgreSQL's; SQLite keeps the in-process queue)."""
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return postgres_dsn


def queued_job(
    sessions: sessionmaker[Session], store: LocalArtifactStore, onnx: Path, sets: SampleFiles
) -> int:
    source, calibration = store.put_file(onnx), store.put_file(sets.calibration)
    with sessions() as session:
        model = Model(name="digits", accuracy_budget=1.0, description="", created_at=T0)
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_id=model.id,
            version="1.0.0",
            status="building",
            source_sha256=source.sha256,
            source_size=source.size,
            calibration_sha256=calibration.sha256,
            created_at=T0,
            created_by="admin",
        )
        session.add(version)
        session.flush()
        job = BuildJob(version_id=version.id, status="queued", created_at=T0)
        session.add(job)
        session.commit()
        return job.id


def replica(
    sessions: sessionmaker[Session], store: LocalArtifactStore, work: Path, name: str
) -> BuildWorker:
    return BuildWorker(
        sessions=sessions,
        store=store,
        build_variants=functools.partial(build_variants, targets=("onnx-fp32",)),
        work_dir=work / name,
        leases=JobLeases(owner=name, lease_s=1.5, poll_s=0.1),
    )


def test_a_dead_replicas_build_is_taken_over_once_after_its_lease(
    pg_url: str, tmp_path: Path, digits_path: Path, digits_sets: SampleFiles
) -> None:
    engine = make_engine(pg_url)
    upgrade_database(engine)
    sessions = make_sessionmaker(engine)
    store = LocalArtifactStore(tmp_path / "artifacts")
    job_id = queued_job(sessions, store, digits_path, digits_sets)
    dead = replica(sessions, store, tmp_path, "replica-a")
    assert dead.claim() == job_id  # ... and the process dies: no heartbeat, no build
    survivor = replica(sessions, store, tmp_path, "replica-b")
    started = time.monotonic()
    try:
        assert survivor.resume_unfinished() == []  # never re-queues a leased job itself
        survivor.wait(job_id, timeout=30)
    finally:
        survivor.shutdown()
    assert time.monotonic() - started >= 1.0  # not before the lease ran out
    with sessions() as session:
        job = session.get(BuildJob, job_id)
        assert job is not None
        assert (job.status, job.lease_owner, job.attempts) == ("succeeded", "replica-b", 2)
        assert "lease of replica-a expired; taken over" in job.log
        version = session.get(ModelVersion, job.version_id)
        assert version is not None
        assert [v.variant_id for v in version.variants] == ["onnx-fp32"]
    dead._fail(job_id, "the old owner wakes up late")  # its outcome is discarded
    with sessions() as session:
        job = session.get(BuildJob, job_id)
        assert job is not None
        assert job.status == "succeeded"
    assert dead.renew() == [job_id]  # and it learns the lease is gone
    engine.dispose()


def test_a_live_replicas_build_is_never_taken(
    pg_url: str, tmp_path: Path, digits_path: Path, digits_sets: SampleFiles
) -> None:
    engine = make_engine(pg_url)
    upgrade_database(engine)
    sessions = make_sessionmaker(engine)
    store = LocalArtifactStore(tmp_path / "artifacts")
    job_id = queued_job(sessions, store, digits_path, digits_sets)
    owner = replica(sessions, store, tmp_path, "replica-a")
    assert owner.claim() == job_id
    other = replica(sessions, store, tmp_path, "replica-b")
    beating = threading.Event()

    def heartbeat() -> None:
        while not beating.wait(0.3):
            assert owner.renew() == []

    thread = threading.Thread(target=heartbeat)
    thread.start()
    other.resume_unfinished()
    time.sleep(4.0)  # well past the 1.5 s lease, renewed all along
    other.shutdown()
    beating.set()
    thread.join()
    with sessions() as session:
        job = session.get(BuildJob, job_id)
        assert job is not None
        assert (job.status, job.lease_owner, job.attempts) == ("running", "replica-a", 1)
    engine.dispose()


def test_one_runner_at_a_time_and_failover_after_the_lease(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade_database(engine)
    a = RoleLease(engine, "rollout-runner", holder="replica-a", ttl_s=1.0)
    b = RoleLease(engine, "rollout-runner", holder="replica-b", ttl_s=1.0)
    assert a.hold()
    assert not b.hold()
    assert a.hold()  # renewal
    time.sleep(1.2)  # a dies: it stops renewing
    assert b.hold()
    assert not a.hold()  # a frozen holder that wakes up has lost it
    assert b.held
    assert not a.held
    b.release()  # a clean stop hands over at once
    assert a.hold()
    engine.dispose()


def test_advisory_lock_excludes_other_connections(pg_url: str) -> None:
    engine = make_engine(pg_url)
    order: list[str] = []
    inside = threading.Event()

    def second() -> None:
        inside.wait()
        with advisory_lock(engine, "tuf"):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with advisory_lock(engine, "tuf"):
        inside.set()
        time.sleep(0.3)
        order.append("first")
    thread.join()
    assert order == ["first", "second"]
    engine.dispose()

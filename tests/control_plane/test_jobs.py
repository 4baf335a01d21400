"""The build job machinery: failures recorded, progress throttled, builds resumed after a stop."""

from __future__ import annotations

import functools
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from control_plane.app import create_app
from control_plane.artifacts import LocalArtifactStore
from control_plane.builds import build_variants
from control_plane.db import BuildJob, Model, ModelVersion, make_engine, make_sessionmaker
from control_plane.db.engine import upgrade_database
from control_plane.jobs import BuildWorker
from control_plane.settings import Settings
from tests.control_plane.conftest import ADMIN, SampleFiles, enroll, upload_files, wait_job

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


class TestFailedBuild:
    @pytest.fixture
    def app(self, settings: Settings) -> FastAPI:
        # the real library, asked for a target it does not know: it raises inside the job
        return create_app(
            settings, build_variants=functools.partial(build_variants, targets=("no-such",))
        )

    def test_failure_is_recorded_and_the_version_cannot_be_deployed(
        self, client: httpx.Client, digits_path: Path, digits_sets: SampleFiles
    ) -> None:
        client.post("/v1/models", json={"name": "digits"}, headers=ADMIN)
        r = client.post(
            "/v1/models/digits/versions",
            data={"version": "1.0.0"},
            files=upload_files(digits_path, digits_sets),
            headers=ADMIN,
        )
        assert r.status_code == 202
        job = wait_job(client, r.json()["job"]["id"])
        assert job["status"] == "failed"
        assert "no-such" in job["error"]
        assert job["log"][-1].startswith("failed: ")
        version = client.get("/v1/models/digits/versions/1.0.0", headers=ADMIN).json()
        assert version["status"] == "failed"
        assert version["variants"] == []
        device_id, _ = enroll(client)
        r = client.post(
            "/v1/assignments",
            json={"model": "digits", "version": "1.0.0", "device_id": device_id},
            headers=ADMIN,
        )
        assert r.status_code == 409
        assert "failed" in r.json()["message"]
        metrics = client.get("/metrics").text
        assert 'edgefleet_cp_builds_total{status="failed"} 1.0' in metrics


def test_unfinished_jobs_resume_after_a_restart(
    settings: Settings, digits_path: Path, digits_sets: SampleFiles
) -> None:
    engine = make_engine(settings.resolved_database_url())
    upgrade_database(engine)
    sessions = make_sessionmaker(engine)
    store = LocalArtifactStore(settings.data_dir / "artifacts")
    source = store.put_file(digits_path)
    calibration = store.put_file(digits_sets.calibration)
    with sessions() as session:  # what a process killed mid-build leaves behind
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
        session.add(
            BuildJob(
                version_id=version.id,
                status="running",
                progress=0.4,
                message="building onnx-fp32",
                log="build started",
                created_at=T0,
            )
        )
        session.commit()
        first_job = session.scalars(select(BuildJob)).one().id

    def new_worker() -> BuildWorker:
        return BuildWorker(
            sessions=sessions,
            store=store,
            build_variants=functools.partial(build_variants, targets=("onnx-fp32",)),
            work_dir=settings.data_dir / "builds",
            now=lambda: T0,
        )

    # a request that queues a build while the process stops: no error, the row stays for later
    stopping = new_worker()
    stopping.shutdown()
    stopping.submit(first_job)
    worker = new_worker()
    try:
        (job_id,) = worker.resume_unfinished()
        assert job_id == first_job
        worker.wait(job_id, timeout=60)
    finally:
        worker.shutdown()
    with sessions() as session:
        job = session.get(BuildJob, job_id)
        assert job is not None
        assert job.status == "succeeded"
        assert "restarted after the service stopped mid-build" in job.log
        version = session.get(ModelVersion, job.version_id)
        assert version is not None
        assert version.status == "ready"
        assert [v.variant_id for v in version.variants] == ["onnx-fp32"]
        assert job.finished_at == T0
    engine.dispose()


def test_progress_writes_are_throttled(settings: Settings, digits_path: Path) -> None:
    engine = make_engine(settings.resolved_database_url())
    upgrade_database(engine)
    sessions = make_sessionmaker(engine)
    store = LocalArtifactStore(settings.data_dir / "artifacts")
    source = store.put_file(digits_path)
    with sessions() as session:
        model = Model(name="m", accuracy_budget=1.0, description="", created_at=T0)
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_id=model.id,
            version="1.0.0",
            status="building",
            source_sha256=source.sha256,
            source_size=source.size,
            created_at=T0,
            created_by="admin",
        )
        session.add(version)
        session.flush()
        job = BuildJob(
            version_id=version.id, status="running", progress=0.0, message="", log="", created_at=T0
        )
        session.add(job)
        session.commit()
        job_id = job.id
    clock = [0.0]
    worker = BuildWorker(
        sessions=sessions,
        store=store,
        build_variants=build_variants,
        work_dir=settings.data_dir / "builds",
        clock=lambda: clock[0],
    )
    progress = worker._progress_writer(job_id)

    def job_row() -> BuildJob:
        with sessions() as s:
            row = s.get(BuildJob, job_id)
            assert row is not None
            return row

    progress(0.1, "quantizing")
    progress(0.2, "quantizing")  # same message, too soon: not written
    assert (job_row().progress, job_row().log) == (0.1, "quantizing")
    clock[0] = 1.0
    progress(0.3, "quantizing")  # same message, later: progress written, no new log line
    assert (job_row().progress, job_row().log) == (0.3, "quantizing")
    progress(0.35, "measuring")  # a new message is always written
    assert (job_row().progress, job_row().log) == (0.35, "quantizing\nmeasuring")
    worker.shutdown()
    engine.dispose()

"""Background variant builds: a small in-process worker pool driving job rows in the database.

Owns the job life cycle (queued -> running -> succeeded | failed), progress and log lines, and
resuming unfinished jobs after a restart. What a build does is the builds library's business
(``BuildVariants``); what a finished build leaves behind is ``registry.record_build``. ``sign``
(the service passes its TUF publisher) runs inside the transaction that marks the version
ready, after the rows are flushed: a version is ``ready`` only once its archives are signed
targets, and a signing failure fails the job instead.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from agent.logs import get_logger
from control_plane.artifacts import ArtifactStore
from control_plane.db.models import BuildJob, ModelVersion
from control_plane.registry import BuildVariants, record_build

__all__ = ["MAX_LOG_LINES", "BuildWorker", "skipped_variants"]

log = get_logger(__name__)

MAX_LOG_LINES = 500  # lines kept per job
PROGRESS_WRITE_INTERVAL_S = 0.5  # seconds between progress writes of one job


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class BuildWorker:
    """Runs builds on ``workers`` threads; every state change is committed to the job row."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        store: ArtifactStore,
        build_variants: BuildVariants,
        work_dir: Path,
        workers: int = 1,
        on_finished: Callable[[int, str], None] | None = None,
        sign: Callable[[Session], object] | None = None,
        now: Callable[[], datetime] = _utcnow,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._build = build_variants
        self._work_dir = work_dir
        self._on_finished = on_finished
        self._sign = sign
        self._now = now
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="build")
        self._futures: dict[int, Future[None]] = {}
        self._lock = threading.Lock()

    def submit(self, job_id: int) -> None:
        with self._lock:
            self._futures[job_id] = self._pool.submit(self._run, job_id)

    def resume_unfinished(self) -> list[int]:
        """Queue again the jobs a previous process left queued or running."""
        with self._sessions() as session:
            jobs = session.scalars(
                select(BuildJob).where(BuildJob.status.in_(("queued", "running")))
            ).all()
            for job in jobs:
                if job.status == "running":
                    job.log = _append(job.log, "restarted after the service stopped mid-build")
                job.status, job.progress = "queued", 0.0
            session.commit()
            ids = [j.id for j in jobs]
        for job_id in ids:
            self.submit(job_id)
        if ids:
            log.info("builds_resumed", jobs=ids)
        return ids

    def wait(self, job_id: int, timeout: float | None = None) -> None:
        """Block until a submitted job finishes (for tests and the CLI's --wait in-process)."""
        with self._lock:
            future = self._futures.get(job_id)
        if future is not None:
            future.result(timeout=timeout)

    def shutdown(self, *, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def _run(self, job_id: int) -> None:
        scratch = self._work_dir / f"job-{job_id}"
        try:
            self._execute(job_id, scratch)
        except Exception as exc:
            log.warning("build_failed", job=job_id, error=str(exc), exc_info=True)
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _execute(self, job_id: int, scratch: Path) -> None:
        with self._sessions() as session:
            job = session.get(BuildJob, job_id)
            if job is None or job.status not in ("queued", "running"):
                return
            version = session.get(ModelVersion, job.version_id)
            assert version is not None
            job.status, job.started_at, job.message = "running", self._now(), "starting"
            job.log = _append(job.log, "build started")
            session.commit()
            name, number = version.model.name, version.version
            budget = version.model.accuracy_budget
            task = version.task
            digests = {
                "calibration": version.calibration_sha256,
                "validation": version.validation_sha256,
                "golden": version.golden_sha256,
            }
            source_sha = version.source_sha256

        shutil.rmtree(scratch, ignore_errors=True)
        inputs, bundle = scratch / "inputs", scratch / "bundle"
        inputs.mkdir(parents=True)
        bundle.mkdir()
        source = self._store.copy_to(source_sha, inputs / "model.onnx")
        paths = {
            key: self._store.copy_to(sha, inputs / f"{key}.npz") if sha else None
            for key, sha in digests.items()
        }
        log.info("build_started", job=job_id, model=name, version=number)
        manifest = self._build(
            source,
            bundle,
            name=name,
            version=number,
            calibration=paths["calibration"],
            validation=paths["validation"],
            golden=paths["golden"],
            accuracy_budget=budget,
            progress=self._progress_writer(job_id),
            task=task,  # type: ignore[arg-type]  # checked against TASKS at upload
        )
        with self._sessions() as session:
            job = session.get(BuildJob, job_id)
            version = session.get(ModelVersion, job.version_id) if job else None
            assert job is not None
            assert version is not None
            record_build(
                session,
                self._store,
                version=version,
                manifest=manifest,
                bundle_dir=bundle,
                scratch=scratch,
            )
            if self._sign is not None:
                session.flush()
                self._sign(session)
            accepted = [v.id for v in manifest.variants if v.status == "accepted"]
            rejected = [v.id for v in manifest.variants if v.status != "accepted"]
            job.status, job.progress, job.finished_at = "succeeded", 1.0, self._now()
            job.message = f"{len(accepted)} variants accepted, {len(rejected)} rejected"
            job.log = _append(job.log, job.message)
            session.commit()
        log.info("build_succeeded", job=job_id, accepted=accepted, rejected=rejected)
        if self._on_finished:
            self._on_finished(job_id, "succeeded")

    def _progress_writer(self, job_id: int) -> Callable[[float, str], None]:
        last_write = [float("-inf")]
        last_message = [""]

        def progress(fraction: float, message: str) -> None:
            fraction = min(max(float(fraction), 0.0), 1.0)
            new_message = message != last_message[0]
            if not new_message and self._clock() - last_write[0] < PROGRESS_WRITE_INTERVAL_S:
                return
            last_write[0], last_message[0] = self._clock(), message
            with self._sessions() as session:
                job = session.get(BuildJob, job_id)
                if job is None:
                    return
                job.progress, job.message = fraction, message[:1000]
                if new_message:
                    job.log = _append(job.log, message)
                session.commit()

        return progress

    def _fail(self, job_id: int, error: str) -> None:
        with self._sessions() as session:
            job = session.get(BuildJob, job_id)
            if job is None:
                return
            job.status, job.error, job.finished_at = "failed", error[:4000], self._now()
            job.message = "failed"
            job.log = _append(job.log, f"failed: {error}")
            version = session.get(ModelVersion, job.version_id)
            if version is not None:
                version.status, version.error = "failed", error[:4000]
            session.commit()
        if self._on_finished:
            self._on_finished(job_id, "failed")


# The builds library reports a target it leaves out as a progress line "<id> skipped: <why>",
# where <why> usually starts with "<id>: " again (the error's own prefix).
_SKIPPED = re.compile(r"^(?P<id>[A-Za-z0-9][A-Za-z0-9._-]{0,63}) skipped: (?P<reason>.+)$")


def skipped_variants(log_text: str) -> dict[str, str]:
    """Targets a build left out, with the reason, read from the job's log (latest line wins)."""
    out: dict[str, str] = {}
    for line in log_text.splitlines():
        match = _SKIPPED.match(line)
        if match is None:
            continue
        target, reason = match["id"], match["reason"].strip()
        if reason:
            out[target] = reason.removeprefix(f"{target}:").strip() or "no reason given"
    return out


def _append(log_text: str, line: str) -> str:
    lines = [*log_text.splitlines(), line.replace("\n", " ")[:1000]]
    return "\n".join(lines[-MAX_LOG_LINES:])

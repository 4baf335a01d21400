"""Background variant builds: a small worker pool driving job rows in the database.

Owns the job life cycle (queued -> running -> succeeded | failed), progress and log lines, and
resuming unfinished jobs after a restart. Two queues, one life cycle:

- SQLite (one machine): an in-process queue; at start every job left queued or running by the
  previous process is queued again (``resume_unfinished``).
- PostgreSQL (any number of replicas, ``leases``): the job rows are the queue. A worker takes
  the oldest queued job, or a running one whose lease has expired, with ``SELECT ... FOR UPDATE
  SKIP LOCKED`` (two replicas never take the same row), and holds it with a lease that a
  heartbeat renews every third of ``lease_s``. A replica that dies stops renewing; once the
  lease expires another replica takes the job over (``attempts`` grows; after
  ``max_attempts`` the job fails instead of crashing replicas for ever). A live replica's job
  is never taken: its lease keeps being renewed. The result is committed only while the row
  is still leased to this replica (checked under ``FOR UPDATE``), so a build that lost its
  lease (a frozen process that wakes up late) discards its result instead of finishing the
  job twice. Plain ``SKIP LOCKED`` over a job library: the job row is already the unit of
  truth the API reads, and the lease columns are three.

What a build does is the builds library's business (``BuildVariants``); what a finished
build leaves behind is ``registry.record_build``. ``sign`` (the service passes its TUF
publisher) runs inside the transaction that marks the version ready, after the rows are
flushed: a version is ``ready`` only once its archives are signed targets, and a signing
failure fails the job instead.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from agent.contracts.manifest import Preprocessing
from agent.logs import get_logger
from control_plane.artifacts import ArtifactStore
from control_plane.db.models import BuildJob, ModelVersion
from control_plane.registry import BuildVariants, record_build

__all__ = ["MAX_LOG_LINES", "BuildWorker", "JobLeases", "skipped_variants"]

log = get_logger(__name__)

MAX_LOG_LINES = 500  # lines kept per job
PROGRESS_WRITE_INTERVAL_S = 0.5  # seconds between progress writes of one job


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class JobLeases:
    """The PostgreSQL queue's knobs (module docstring)."""

    owner: str  # this replica's name in ``build_jobs.lease_owner``
    lease_s: float = 60.0  # seconds a lease lasts unrenewed; renewed every third of it
    poll_s: float = 2.0  # seconds between looks for queued jobs (a local submit wakes at once)
    max_attempts: int = 3  # takes of one job before it fails


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
        leases: JobLeases | None = None,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._build = build_variants
        self._work_dir = work_dir
        self._on_finished = on_finished
        self._sign = sign
        self._now = now
        self._clock = clock
        self._leases = leases
        self._workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="build")
        self._futures: dict[int, Future[None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._owned: set[int] = set()  # leased jobs running here (the heartbeat renews them)
        self._threads: list[threading.Thread] = []

    def submit(self, job_id: int) -> None:
        if self._leases is not None:
            self._wake.set()  # the row is the queue: any replica's worker may take it
            return
        with self._lock:
            if self._stop.is_set():
                # shutting down: the row stays queued and the next start resumes it
                log.info("build_deferred", job_id=job_id, reason="shutting down")
                return
            self._futures[job_id] = self._pool.submit(self._run, job_id)

    def resume_unfinished(self) -> list[int]:
        """Queue again the jobs a previous process left queued or running (in-process queue);
        with leases, start taking jobs from the table instead: unfinished jobs of a dead
        replica are taken once their lease expires, a live replica's never. Returns the ids
        queued again (none with leases: the workers find them)."""
        if self._leases is not None:
            self._start_lease_workers()
            return []
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
        if self._leases is not None:
            self._wait_row(job_id, timeout)
            return
        with self._lock:
            future = self._futures.get(job_id)
        if future is not None:
            future.result(timeout=timeout)

    def shutdown(self, *, wait: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if wait:
            for thread in self._threads:
                thread.join()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    # -- the PostgreSQL queue ------------------------------------------------------------------

    def _start_lease_workers(self) -> None:
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._take_jobs, name=f"build-{i}", daemon=True)
            for i in range(self._workers)
        ]
        self._threads.append(
            threading.Thread(target=self._heartbeat, name="build-heartbeat", daemon=True)
        )
        for thread in self._threads:
            thread.start()
        self._wake.set()

    def _take_jobs(self) -> None:
        assert self._leases is not None
        while not self._stop.is_set():
            try:
                job_id = self.claim()
            except SQLAlchemyError as exc:
                log.warning("build_claim_failed", error=str(exc))
                job_id = None
            if job_id is None:
                self._wake.wait(self._leases.poll_s)
                self._wake.clear()
                continue
            try:
                self._run(job_id, leased=True)
            finally:
                with self._lock:
                    self._owned.discard(job_id)

    def claim(self) -> int | None:
        """Take the oldest queued job, or a running one whose lease expired, for this replica;
        its id, or None when there is none (or each is being taken by another replica)."""
        leases = self._leases
        assert leases is not None
        expired = and_(
            BuildJob.status == "running",
            or_(BuildJob.lease_expires_at.is_(None), BuildJob.lease_expires_at < func.now()),
        )
        with self._sessions() as session, session.begin():
            job = session.scalars(
                select(BuildJob)
                .where(or_(BuildJob.status == "queued", expired))
                .order_by(BuildJob.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if job is None:
                return None
            job_id, previous = job.id, job.lease_owner
            if job.status == "running":
                job.log = _append(
                    job.log, f"lease of {previous or 'a stopped process'} expired; taken over"
                )
            if job.attempts >= leases.max_attempts:
                error = f"gave up after {job.attempts} attempts (each worker stopped mid-build)"
                job.log = _append(job.log, f"failed: {error}")
                job.status, job.error, job.message = "failed", error, "failed"
                job.finished_at, job.lease_owner = self._now(), None
                version = session.get(ModelVersion, job.version_id)
                if version is not None:
                    version.status, version.error = "failed", error
                log.warning("build_given_up", job=job_id, attempts=job.attempts)
                return None
            session.execute(
                update(BuildJob)
                .where(BuildJob.id == job_id)
                .values(
                    status="running",
                    progress=0.0,
                    lease_owner=leases.owner,
                    lease_expires_at=func.now() + timedelta(seconds=leases.lease_s),
                    attempts=BuildJob.attempts + 1,
                )
            )
        with self._lock:
            self._owned.add(job_id)
        log.info("build_claimed", job=job_id, owner=leases.owner, previous_owner=previous)
        return job_id

    def renew(self) -> list[int]:
        """Extend the lease of every job running here; returns the ids whose lease is lost."""
        leases = self._leases
        assert leases is not None
        with self._lock:
            owned = set(self._owned)
        if not owned:
            return []
        with self._sessions() as session, session.begin():
            kept = set(
                session.scalars(
                    update(BuildJob)
                    .where(
                        BuildJob.id.in_(owned),
                        BuildJob.lease_owner == leases.owner,
                        BuildJob.status == "running",
                    )
                    .values(lease_expires_at=func.now() + timedelta(seconds=leases.lease_s))
                    .returning(BuildJob.id)
                ).all()
            )
        lost = sorted(owned - kept)
        for job_id in lost:
            log.warning("build_lease_lost", job=job_id, owner=leases.owner)
        return lost

    def _heartbeat(self) -> None:
        assert self._leases is not None
        while not self._stop.wait(self._leases.lease_s / 3):
            try:
                self.renew()
            except SQLAlchemyError as exc:  # the next beat retries; the lease has slack
                log.warning("build_heartbeat_failed", error=str(exc))

    def _still_ours(self, session: Session, job_id: int) -> BuildJob | None:
        """The job row, locked, if this replica may still write its outcome."""
        job = session.get(BuildJob, job_id, with_for_update=self._leases is not None)
        if job is None:
            return None
        if self._leases is not None and (
            job.status != "running" or job.lease_owner != self._leases.owner
        ):
            log.warning("build_result_discarded", job=job_id, owner=job.lease_owner)
            return None
        return job

    def _wait_row(self, job_id: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._sessions() as session:
                job = session.get(BuildJob, job_id)
                if job is None or job.status in ("succeeded", "failed"):
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"build job {job_id} did not finish in {timeout} s")
            time.sleep(0.05)

    # -- one build -----------------------------------------------------------------------------

    def _run(self, job_id: int, *, leased: bool = False) -> None:
        scratch = self._work_dir / f"job-{job_id}"
        try:
            self._execute(job_id, scratch, leased=leased)
        except Exception as exc:
            log.warning("build_failed", job=job_id, error=str(exc), exc_info=True)
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _execute(self, job_id: int, scratch: Path, *, leased: bool = False) -> None:
        with self._sessions() as session:
            job = session.get(BuildJob, job_id)
            if job is None or job.status not in ("queued", "running"):
                return
            if leased and job.lease_owner != (self._leases.owner if self._leases else None):
                return
            version = session.get(ModelVersion, job.version_id)
            assert version is not None
            job.status, job.started_at, job.message = "running", self._now(), "starting"
            job.log = _append(job.log, "build started")
            session.commit()
            name, number = version.model.name, version.version
            budget = version.model.accuracy_budget
            task = version.task
            preprocessing = (
                Preprocessing.model_validate(version.preprocessing)
                if version.preprocessing
                else None
            )
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
            preprocessing=preprocessing,
        )
        with self._sessions() as session:
            job = self._still_ours(session, job_id)
            if job is None:
                return
            version = session.get(ModelVersion, job.version_id)
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
                if job is None or (
                    self._leases is not None and job.lease_owner != self._leases.owner
                ):
                    return
                job.progress, job.message = fraction, message[:1000]
                if new_message:
                    job.log = _append(job.log, message)
                session.commit()

        return progress

    def _fail(self, job_id: int, error: str) -> None:
        with self._sessions() as session:
            job = self._still_ours(session, job_id)
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

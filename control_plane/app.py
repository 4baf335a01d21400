"""The FastAPI application factory: ``create_app(settings)``.

Owns wiring: database (migrated at start with Alembic), artifact store and TUF repository
(local or S3-compatible, ``control_plane.storage``), build worker (PostgreSQL: a leased queue
shared by replicas), caches, metrics, routes and error handlers. The variant builds come
from ``control_plane.builds`` unless a ``build_variants`` callable is passed (the tests'
fast FP32-only build, for one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from fastapi import FastAPI
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from agent.logs import get_logger
from control_plane import __version__
from control_plane.api.errors import install_error_handlers
from control_plane.api.fast_poll import ControlPlaneAPI, FastPoll
from control_plane.api.limits import RequestLimits, RequestLimitsMiddleware
from control_plane.api.routes import (
    artifacts,
    assignments,
    bootstrap_tokens,
    devices,
    health,
    jobs,
    models,
    tokens,
    tuf,
)
from control_plane.api.routes import deltas as delta_routes
from control_plane.api.routes import latency as latency_routes
from control_plane.api.routes import rollouts as rollout_routes
from control_plane.api.routes import web as web_page
from control_plane.artifacts import ArtifactStore
from control_plane.context import AppContext
from control_plane.coordination import NotificationListener, is_postgres, replica_name
from control_plane.db.engine import make_engine, make_sessionmaker, upgrade_database
from control_plane.deltas import DeltaService
from control_plane.desired import CredentialCache, DesiredStateCache, share_invalidations
from control_plane.fleet_metrics import FleetCollector
from control_plane.ingest.wiring import IngestCollector, fleet_telemetry
from control_plane.jobs import BuildWorker, JobLeases
from control_plane.metrics import Metrics, RequestMetricsMiddleware
from control_plane.presence import LastSeenRecorder
from control_plane.registry import BuildVariants
from control_plane.settings import Settings
from control_plane.signing.publisher import (
    MetadataRefresher,
    publish_archives,
    publish_registry,
    unsigned_archives,
)
from control_plane.storage import artifact_store, tuf_repository

__all__ = ["create_app"]

log = get_logger(__name__)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _default_builder(settings: Settings) -> BuildVariants:
    import functools

    from control_plane.builds import Int8Search, build_variants

    search = Int8Search(seconds=settings.build_int8_search_s)
    builder: BuildVariants = functools.partial(build_variants, search=search)
    return builder


def create_app(
    settings: Settings,
    *,
    build_variants: BuildVariants | None = None,
    store: ArtifactStore | None = None,
    now: Callable[[], datetime] = _utcnow,
) -> FastAPI:
    """A control-plane instance; the database is migrated and builds resume on start."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url())
    sessions = make_sessionmaker(engine)
    store = store or artifact_store(settings)
    metrics = Metrics()
    desired = DesiredStateCache(ttl_s=settings.desired_state_cache_ttl_s)
    credentials = CredentialCache(ttl_s=settings.desired_state_cache_ttl_s)
    replica = replica_name(settings.replica_id)
    desired_listener: NotificationListener | None = None
    if is_postgres(engine):
        # Replicas: a desired state changed on one is dropped from every replica's cache at
        # once, not when its entry expires.
        desired_listener = share_invalidations(engine, desired, credentials)

    signed = tuf_repository(settings, engine)
    presence = (
        LastSeenRecorder(sessions, interval_s=settings.last_seen_write_s, now=now)
        if settings.last_seen_write_s is not None
        else None
    )

    def on_finished(job_id: int, status: str) -> None:
        metrics.builds.labels(status).inc()

    def sign(session: Session) -> list[str]:  # in the build's transaction: ready == signed
        return publish_archives(signed, session)

    worker = BuildWorker(
        sessions=sessions,
        store=store,
        build_variants=build_variants or _default_builder(settings),
        work_dir=settings.data_dir / "builds",
        workers=settings.build_workers,
        on_finished=on_finished,
        sign=sign,
        now=now,
        # PostgreSQL: the job rows are a queue shared by every replica, with leases
        leases=JobLeases(
            owner=replica, lease_s=settings.build_lease_s, poll_s=settings.build_poll_s
        )
        if is_postgres(engine)
        else None,
    )
    telemetry = fleet_telemetry(
        settings,
        engine,
        sessions,
        on_desired_changed=desired.invalidate,
        clock=lambda: now().timestamp(),
        unsigned=lambda archives: sorted(unsigned_archives(signed, archives)),
        replica=replica,
    )
    metrics.registry.register(IngestCollector(telemetry.ingester, telemetry.rollouts))
    metrics.registry.register(FleetCollector(sessions, now=now))
    ctx = AppContext(
        settings=settings,
        engine=engine,
        sessions=sessions,
        store=store,
        worker=worker,
        desired=desired,
        credentials=credentials,
        metrics=metrics,
        now=now,
        tuf=signed,
        ingester=telemetry.ingester,
        rollouts=telemetry.rollouts,
        presence=presence,
        deltas=DeltaService(
            store=store,
            tuf=signed,
            work_dir=settings.data_dir / "deltas",
            max_ratio=settings.delta_max_ratio,
            keep_s=settings.delta_keep_s,
        )
        if settings.deltas
        else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(upgrade_database, engine)
        if desired_listener is not None:
            desired_listener.start()
        await run_in_threadpool(publish_registry, sessions, signed)
        refresher = MetadataRefresher(signed, settings.tuf_refresh_interval_s).start()
        await run_in_threadpool(worker.resume_unfinished)
        await run_in_threadpool(telemetry.start)  # MQTT ingestion and the rollout runner
        if presence is not None:
            presence.start()
        log.info(
            "control_plane_started",
            database=engine.url.get_backend_name(),
            data_dir=str(settings.data_dir),
            object_store=settings.object_store,
            replica=replica,
        )
        try:
            yield
        finally:
            if presence is not None:
                await run_in_threadpool(presence.stop)
            await run_in_threadpool(telemetry.stop)
            await run_in_threadpool(worker.shutdown)
            refresher.stop()
            if desired_listener is not None:
                await run_in_threadpool(desired_listener.stop)
            engine.dispose()

    app = ControlPlaneAPI(
        title="edgefleet control plane",
        version=__version__,
        description="Model registry with per-target variants, device registry, desired state.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.fast_poll = FastPoll(ctx)  # idle polls answered in front of the framework
    install_error_handlers(app)
    app.include_router(delta_routes.router)  # before artifacts: /v1/artifacts/deltas/...
    for module in (health, tokens, models, jobs, devices, assignments, artifacts, tuf):
        app.include_router(module.router)
    app.include_router(bootstrap_tokens.router)
    app.include_router(latency_routes.router)
    app.include_router(rollout_routes.router)
    app.include_router(web_page.router)  # the operator page at / and /ui
    # header and body bounds, before any route parses (inside the metrics: refusals are counted)
    app.add_middleware(RequestLimitsMiddleware, limits=RequestLimits.from_settings(settings))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app

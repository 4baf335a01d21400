"""The service's telemetry side, assembled from settings: ingester, rollout runner, metrics.

``create_app`` calls ``fleet_telemetry(...)`` once and ``start``/``stop`` in its lifespan (after
the database is migrated). Without ``mqtt_host`` there is no ingester: rollouts still run, from
whatever telemetry other replicas ingest, and devices learn changes at their next poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from control_plane.coordination import NotificationListener, RoleLease, is_postgres, replica_name
from control_plane.ingest.fleet import FleetLimits
from control_plane.ingest.ingester import IngestOptions, MqttLink, TelemetryIngester
from control_plane.ingest.writer import EVENTS_CHANNEL, Retention
from control_plane.rollouts.service import RolloutService
from control_plane.settings import Settings

__all__ = ["RUNNER_ROLE", "FleetTelemetry", "IngestCollector", "fleet_telemetry"]

RUNNER_ROLE = "rollout-runner"  # the lease row of the one replica that runs the controller

_COUNTERS = (
    ("received", "MQTT messages received"),
    ("stored", "messages applied and written"),
    ("dropped_malformed", "messages ignored: bad topic, JSON or contract"),
    ("dropped_oversized", "messages ignored: over the payload bound"),
    ("dropped_mismatch", "messages ignored: payload device id is not the topic's"),
    ("dropped_overload", "messages dropped: backlog or in-memory bounds full"),
    ("duplicates", "messages ignored as replays"),
    ("flush_failures", "database flushes that failed (rows kept and retried)"),
    ("commands_sent", "commands published to devices"),
    ("commands_failed", "commands that could not be published"),
)


class IngestCollector(Collector):
    """Reads the ingester's and the runner's counters at scrape time (no double bookkeeping)."""

    def __init__(self, ingester: TelemetryIngester | None, rollouts: RolloutService) -> None:
        self._ingester = ingester
        self._rollouts = rollouts

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self._ingester is not None:
            c = self._ingester.counters()
            for name, doc in _COUNTERS:
                yield CounterMetricFamily(
                    f"edgefleet_cp_ingest_{name}", doc, value=getattr(c, name)
                )
            yield GaugeMetricFamily(
                "edgefleet_cp_ingest_backlog", "messages queued for the writer", value=c.backlog
            )
            yield GaugeMetricFamily(
                "edgefleet_cp_ingest_pending_rows",
                "rows waiting for their write-behind flush",
                value=c.pending_rows,
            )
            yield GaugeMetricFamily(
                "edgefleet_cp_ingest_connected", "1 while the broker link is up", value=c.connected
            )
            if c.broker_dropped is not None:
                yield GaugeMetricFamily(
                    "edgefleet_cp_broker_dropped_messages",
                    "messages the broker dropped (queue or in-flight limits), every client, "
                    "since it started: its $SYS count",
                    value=c.broker_dropped,
                )
        yield CounterMetricFamily(
            "edgefleet_cp_rollout_ticks", "rollout controller ticks", value=self._rollouts.ticks
        )
        yield CounterMetricFamily(
            "edgefleet_cp_rollout_tick_failures",
            "rollout ticks that raised",
            value=self._rollouts.tick_failures,
        )
        yield GaugeMetricFamily(
            "edgefleet_cp_rollout_leader",
            "1 while this replica runs the rollout controller",
            value=int(self._rollouts.leading and self._rollouts.running),
        )


@dataclass
class FleetTelemetry:
    ingester: TelemetryIngester | None
    rollouts: RolloutService
    run_rollouts: bool
    # PostgreSQL: update events stored by any replica's ingester wake this replica's runner
    events: NotificationListener | None = None

    def start(self) -> None:
        if self.ingester is not None:
            self.ingester.start()
        if self.run_rollouts:
            self.rollouts.start()
            if self.events is not None:
                self.events.start()

    def stop(self) -> None:
        if self.events is not None:
            self.events.stop()
        self.rollouts.stop()
        if self.ingester is not None:
            self.ingester.stop()


def fleet_telemetry(
    settings: Settings,
    engine: Engine,
    sessions: sessionmaker[Session],
    *,
    on_desired_changed: Callable[[Iterable[str]], None],
    clock: Callable[[], float] = time.time,
    unsigned: Callable[[Mapping[str, tuple[int, str]]], list[str]] | None = None,
    replica: str = "",
) -> FleetTelemetry:
    ingester: TelemetryIngester | None = None
    if settings.mqtt_host:
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        ingester = TelemetryIngester(
            MqttLink(
                host=settings.mqtt_host,
                port=settings.mqtt_port,
                username=settings.mqtt_username,
                password=password,
                tls_ca=settings.mqtt_tls_ca,
                client_id=settings.mqtt_client_id,
                topic_prefix=settings.mqtt_topic_prefix,
                session_expiry_s=settings.mqtt_session_expiry_s,
                shared_group=settings.mqtt_shared_group,
            ),
            engine,
            options=IngestOptions(
                limits=FleetLimits(link_write_interval_s=settings.telemetry_state_write_s),
                retention=Retention(
                    bucket_max_age_s=settings.telemetry_retention_s,
                    bucket_max_rows=settings.telemetry_max_rows,
                ),
            ),
            clock=clock,
        )
    rollouts = RolloutService(
        sessions,
        commands=ingester,
        on_desired_changed=on_desired_changed,
        clock=clock,
        interval_s=settings.rollout_interval_s,
        unsigned=unsigned,
        # One runner across replicas on PostgreSQL (docs/rollouts.md); SQLite: this process.
        lease=RoleLease(
            engine, RUNNER_ROLE, holder=replica_name(replica), ttl_s=settings.rollout_lease_s
        )
        if is_postgres(engine)
        else None,
    )
    if ingester is not None:  # this replica's own stored events, without a round trip
        ingester.on_events_stored = rollouts.nudge
    events = (
        NotificationListener(
            engine,
            EVENTS_CHANNEL,
            lambda _payload: rollouts.nudge(),
            on_relisten=rollouts.nudge,  # events stored meanwhile: look now, not at the interval
        )
        if is_postgres(engine)
        else None
    )
    return FleetTelemetry(ingester, rollouts, settings.rollout_runner, events)

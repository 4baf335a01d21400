"""The control plane's MQTT subscriber: device state, telemetry and events into the database.

Owns the broker connection (paho-mqtt 2.x, MQTT 5, optional TLS and password), the hand-off
queue and the writer thread. The network thread only stamps each message with the control
plane's receive time and queues it; the writer thread decodes (``decode``), folds it into the
in-memory fleet (``fleet``) and flushes batches (``writer``) every ``flush_interval_s`` or
``flush_max_messages``. Counters say what happened to every message received.

It also carries the control plane's commands to devices (``publish_command``), since it holds the
one broker connection the service has.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine

from agent.contracts.errors import ContractError
from agent.contracts.telemetry import (
    DEFAULT_TOPIC_PREFIX,
    CheckUpdateCommand,
    DeviceTopics,
    RollbackCommand,
)
from agent.logs import get_logger
from control_plane.errors import ConfigError, StorageError
from control_plane.ingest.decode import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MessageRejectedError,
    decode_message,
)
from control_plane.ingest.fleet import FleetLimits, FleetState
from control_plane.ingest.writer import Retention, TelemetryWriter

__all__ = ["IngestCounters", "IngestOptions", "MqttLink", "TelemetryIngester"]

log = get_logger(__name__)


@dataclass(frozen=True)
class MqttLink:
    """Where the broker is and who the control plane is to it."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    client_id: str = "edgefleet-control-plane"
    topic_prefix: str = DEFAULT_TOPIC_PREFIX
    keepalive_s: int = 30
    # MQTT 5 session expiry: the broker queues QoS 1 events while the service restarts.
    session_expiry_s: int = 3600
    # MQTT 5 shared subscription group for telemetry and events: replicas in one group split
    # them (each message goes to one of them); None: this replica gets every message.
    shared_group: str | None = None

    def subscriptions(self) -> list[tuple[str, int]]:
        """State goes to every replica (retained, rare, ordered); telemetry and events are
        split across the group when there is one."""
        prefix = self.topic_prefix
        share = f"$share/{self.shared_group}/" if self.shared_group else ""
        return [
            (f"{prefix}/+/state", 1),
            (f"{share}{prefix}/+/telemetry", 1),
            (f"{share}{prefix}/+/events", 1),
        ]


@dataclass(frozen=True)
class IngestOptions:
    """Batching, bounds and retention; seconds and bytes as named."""

    flush_interval_s: float = 0.25
    flush_max_messages: int = 5000
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_backlog: int = 200_000  # messages queued for the writer; beyond it they are dropped
    prune_interval_s: float = 60.0
    retry_min_s: float = 0.2  # after a failed flush
    retry_max_s: float = 10.0
    limits: FleetLimits = field(default_factory=FleetLimits)
    retention: Retention = field(default_factory=Retention)


@dataclass(frozen=True)
class IngestCounters:
    """Totals since start. ``received`` = stored + every dropped kind + duplicates + in flight."""

    received: int = 0
    stored: int = 0  # applied and covered by a committed flush
    dropped_malformed: int = 0
    dropped_oversized: int = 0
    dropped_mismatch: int = 0
    dropped_overload: int = 0  # backlog full, or a device/model over the in-memory bounds
    duplicates: int = 0
    backlog: int = 0  # queued for the writer now
    pending_rows: int = 0  # applied, waiting for their (write-behind) row
    flushes: int = 0
    flush_failures: int = 0
    events_stored: int = 0
    commands_sent: int = 0
    commands_failed: int = 0
    connected: bool = False
    # The broker's own count of messages it dropped (queue or in-flight limits), every client
    # together, since the broker started: what never reached any ingester. Mosquitto publishes
    # it in $SYS when it changes: 0 from the subscription until then; None when the broker
    # refused the subscription (an ACL) or it is not acknowledged yet.
    broker_dropped: int | None = None


_Message = tuple[str, bytes, float]  # topic, payload, receive time (epoch seconds)

# Mosquitto's count of the PUBLISH messages it dropped because a client's queue or in-flight
# window was full (retained, published every sys_interval when it changed)
BROKER_DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"


class TelemetryIngester:
    """Subscribe, queue, decode, aggregate, write; ``start()``/``stop()`` around the service."""

    def __init__(
        self,
        link: MqttLink,
        engine: Engine,
        *,
        options: IngestOptions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if link.tls_ca is not None and not link.tls_ca.is_file():
            raise ConfigError(f"mqtt_tls_ca: no such file: {link.tls_ca}")
        self.link = link
        self.options = options or IngestOptions()
        self._clock = clock
        self._writer = TelemetryWriter(engine, retention=self.options.retention)
        # Called after a flush that stored update events (the rollout runner's nudge).
        self.on_events_stored: Callable[[], None] | None = None
        self.fleet = FleetState(self.options.limits)
        self._queue: deque[_Message] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sync_lock = threading.Condition()
        self._sync_requested = 0
        self._sync_done = 0
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._disconnected = threading.Event()
        self._n: dict[str, int] = dict.fromkeys(
            (
                "received",
                "stored",
                "dropped_malformed",
                "dropped_oversized",
                "dropped_mismatch",
                "dropped_overload",
                "flushes",
                "flush_failures",
                "events_stored",
                "duplicate_events_db",
                "commands_sent",
                "commands_failed",
            ),
            0,
        )
        self._broker_dropped: int | None = None
        self._sys_mid: int | None = None
        self._client = self._new_client()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the stored fleet state, connect (in the background) and start the writer."""
        if self._thread is not None:
            raise StorageError("ingester already started")
        self.fleet.load(self._writer.load_links(self.options.limits.max_devices), self._clock())
        if self._client.on_message is None:  # stopped before: a fresh client
            self._client = self._new_client()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_writer, name="ingest-writer", daemon=True)
        self._thread.start()
        try:
            self._client.connect_async(
                self.link.host,
                self.link.port,
                keepalive=self.link.keepalive_s,
                clean_start=self.link.session_expiry_s == 0,
                properties=self._connect_properties(),
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot connect to MQTT {self.link.host}: {exc}") from exc
        self._client.loop_start()
        log.info("ingest_started", host=self.link.host, port=self.link.port)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect, write out everything applied, stop the writer. Idempotent."""
        was_connected = self._connected.is_set()
        self._connected.clear()  # a disconnect we asked for is not worth a warning
        self._disconnected.clear()
        self._client.disconnect()
        if was_connected:  # let paho send DISCONNECT and close its socket before its loop ends
            self._disconnected.wait(2.0)
        self._client.loop_stop()
        # paho leaves its wake-up socket pair to the client's __del__, which the callbacks'
        # reference cycle (client -> bound method -> ingester -> client) delays to a collection
        # that may finalize the sockets first (ResourceWarning): break the cycle
        client = self._client
        client.on_connect = client.on_subscribe = client.on_disconnect = None
        client.on_message = None
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout)
            self._thread = None
        log.info("ingest_stopped", **self._counts())

    def __enter__(self) -> TelemetryIngester:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until everything received so far is applied and every pending row written."""
        with self._sync_lock:
            self._sync_requested += 1
            ticket = self._sync_requested
        self._wake.set()
        deadline = time.monotonic() + timeout
        with self._sync_lock:
            while self._sync_done < ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._sync_lock.wait(left)
        return True

    def counters(self) -> IngestCounters:
        n = self._n
        return IngestCounters(
            received=n["received"],
            stored=n["stored"],
            dropped_malformed=n["dropped_malformed"],
            dropped_oversized=n["dropped_oversized"],
            dropped_mismatch=n["dropped_mismatch"],
            dropped_overload=n["dropped_overload"] + self.fleet.dropped_over_limit,
            duplicates=self.fleet.duplicates + n["duplicate_events_db"],
            backlog=len(self._queue),
            pending_rows=self.fleet.pending_rows(),
            flushes=n["flushes"],
            flush_failures=n["flush_failures"],
            events_stored=n["events_stored"],
            commands_sent=n["commands_sent"],
            commands_failed=n["commands_failed"],
            connected=self._connected.is_set(),
            broker_dropped=self._broker_dropped,
        )

    def _counts(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self.counters()).items() if v}

    # -- commands --------------------------------------------------------------------------

    def publish_command(
        self, device_id: str, command: CheckUpdateCommand | RollbackCommand
    ) -> bool:
        """Send a command on the device's ``/cmd`` topic at QoS 1, never retained.

        False (and counted) when the device id is not topic-safe or the link is down; the
        device still learns its desired state at its next poll.
        """
        try:
            topic = DeviceTopics(device_id, self.link.topic_prefix).cmd
        except ContractError:
            self._n["commands_failed"] += 1
            return False
        if not self._connected.is_set():
            self._n["commands_failed"] += 1
            log.warning("command_not_sent", device_id=device_id, reason="broker link down")
            return False
        info = self._client.publish(topic, command.model_dump_json().encode(), qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._n["commands_failed"] += 1
            return False
        self._n["commands_sent"] += 1
        return True

    # -- paho ------------------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.link.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if self.link.username is not None:
            client.username_pw_set(self.link.username, self.link.password)
        if self.link.tls_ca is not None:
            try:
                client.tls_set(ca_certs=str(self.link.tls_ca), tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"mqtt_tls_ca {self.link.tls_ca}: {exc}") from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(1000)  # commands while the link is briefly down
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Above the payload bound, so oversized messages still arrive and are counted; well
        # below what would hurt.
        props.MaximumPacketSize = max(4 * self.options.max_payload_bytes, 256 * 1024)
        if self.link.session_expiry_s:
            props.SessionExpiryInterval = self.link.session_expiry_s
        return props

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("ingest_connect_refused", reason=str(reason_code))
            return
        self._connected.set()
        client.subscribe(self.link.subscriptions())
        # separately, so a broker that refuses $SYS to this user refuses only this one
        self._sys_mid = client.subscribe(BROKER_DROPPED_TOPIC, 0)[1]
        log.info(
            "ingest_connected",
            host=self.link.host,
            session=bool(flags.session_present),
            shared_group=self.link.shared_group,
        )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if mid == self._sys_mid:
            if refused:
                log.warning("broker_drop_count_unavailable", topic=BROKER_DROPPED_TOPIC)
            elif self._broker_dropped is None:
                # Mosquitto publishes the count when it changes, not on subscribe: 0 until then
                self._broker_dropped = 0
            return
        if refused:
            log.error("ingest_subscribe_refused", reasons=refused)
            return
        self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected.is_set():
            log.warning("ingest_disconnected", reason=str(reason_code))
        self._connected.clear()
        self._subscribed.clear()
        self._disconnected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        # Runs on paho's thread for every message: stamp, queue, nothing else.
        received = self._clock()
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = None
        if topic is not None and topic.startswith("$SYS/"):
            self._on_broker_dropped(message.payload)
            return
        self._n["received"] += 1
        queue = self._queue
        if len(queue) >= self.options.max_backlog:
            self._n["dropped_overload"] += 1
            return
        if topic is None:
            self._n["dropped_malformed"] += 1
            return
        queue.append((topic, bytes(message.payload), received))
        if len(queue) == 1:
            self._wake.set()

    def _on_broker_dropped(self, payload: bytes | bytearray) -> None:
        try:
            total = int(payload[:32])
        except ValueError:
            return
        before, self._broker_dropped = self._broker_dropped or 0, total
        if total > before:
            # shed by the broker, before any ingester saw it: QoS 0 telemetry under overload
            log.warning("broker_dropped_messages", dropped=total - before, total=total)

    # -- the writer thread -----------------------------------------------------------------

    def _run_writer(self) -> None:
        opts = self.options
        last_flush = time.monotonic()
        last_prune = float("-inf")
        applied = 0
        retry_at = 0.0
        retry_s = opts.retry_min_s
        while True:
            stopping = self._stop.is_set()
            applied += self._apply_queued(opts.flush_max_messages)
            with self._sync_lock:
                wanted = self._sync_requested
            mono = time.monotonic()
            due = applied >= opts.flush_max_messages or mono - last_flush >= opts.flush_interval_s
            forced = stopping or wanted > self._sync_done
            if forced and self._queue:
                continue  # a sync or stop covers what was received before it: apply that first
            if (due or forced) and mono >= retry_at:
                ok = self._flush(everything=forced)
                last_flush, applied = mono, 0
                if ok:
                    retry_s = opts.retry_min_s
                    if forced:
                        with self._sync_lock:
                            self._sync_done = max(self._sync_done, wanted)
                            self._sync_lock.notify_all()
                else:
                    retry_at = mono + retry_s
                    retry_s = min(retry_s * 2, opts.retry_max_s)
            if mono - last_prune >= opts.prune_interval_s:
                last_prune = mono
                self._prune()
            if stopping:
                return
            if not self._queue:
                self._wake.wait(opts.flush_interval_s)
                self._wake.clear()

    def _apply_queued(self, limit: int) -> int:
        queue, fleet, n = self._queue, self.fleet, self._n
        prefix, max_bytes = self.link.topic_prefix, self.options.max_payload_bytes
        done = 0
        while done < limit and queue:
            topic, payload, received = queue.popleft()
            done += 1
            if not payload and topic.endswith("/state"):
                continue  # a retained state being cleared: nothing to learn
            try:
                decoded = decode_message(topic, payload, prefix=prefix, max_bytes=max_bytes)
            except MessageRejectedError as exc:
                n["dropped_" + exc.reason] += 1
                log.debug("message_rejected", reason=exc.reason, error=str(exc))
                continue
            fleet.apply(decoded.device_id, decoded.payload, received)
        return done

    def _flush(self, *, everything: bool) -> bool:
        writes = self.fleet.take_writes(self._clock(), everything=everything)
        if not writes:
            return True
        try:
            result = self._writer.flush(writes)
        except StorageError as exc:
            self.fleet.restore(writes)
            self._n["flush_failures"] += 1
            log.error("ingest_flush_failed", error=str(exc), rows=len(writes.links))
            return False
        if result.events and self.on_events_stored is not None:
            self.on_events_stored()  # the rollout runner looks at once (update progress)
        n = self._n
        n["flushes"] += 1
        n["stored"] += writes.messages - result.duplicate_events
        n["events_stored"] += result.events
        n["duplicate_events_db"] += result.duplicate_events
        return True

    def _prune(self) -> None:
        try:
            buckets, events = self._writer.prune(
                datetime.fromtimestamp(self._clock(), timezone.utc)
            )
        except StorageError as exc:
            log.error("ingest_prune_failed", error=str(exc))
            return
        if buckets or events:
            log.info("telemetry_pruned", buckets=buckets, events=events)

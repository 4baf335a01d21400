"""The agent's MQTT link: birth and last will, periodic telemetry, update events, commands.

Owns the connection (paho-mqtt 2.x, MQTT 5, optional TLS with client certificates, username and
password) under the device id as client id, reconnecting with jittered exponential backoff on a
fresh client each time, and delivery from the on-disk ``Spool``: every outgoing event and
telemetry message is spooled first and removed only when delivered (events: PUBACK, or with
``confirm_events_after_s`` only once the control plane confirms it stored them, resent when that
takes longer; telemetry, QoS 0: written to the socket), so nothing queued is lost across broker
outages, a broker that loses its sessions, or agent restarts. What the telemetry says comes from
providers handed in (window statistics, system metrics, slot identities); what a command does is
up to the handlers registered with ``on_command``.

Identity: the fleet's broker binds the client id to the certificate (``use_identity_as_username``
with ``use_username_as_clientid``, docs/security.md), so a client certificate must name this
device (its subject CN is the device id); one that names another device is refused before any
connect (``mqtt_tls_setup_failed``) and read again at the next attempt, so a corrected
certificate is picked up without a restart.

Threads: a network thread runs the paho loop, publishes and dispatches commands (handlers run
on it and must not block); a timer thread produces telemetry; ``publish_event`` may be called
from any thread.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.config import MqttConfig
from agent.contracts.errors import ContractError
from agent.contracts.events import UpdateEvent
from agent.contracts.profile import HardwareProfile
from agent.contracts.telemetry import (
    MAX_COMMAND_BYTES,
    Command,
    DeviceTopics,
    ModelTelemetry,
    SlotIdentity,
    StatePayload,
    SystemMetrics,
    TelemetryPayload,
    parse_command,
)
from agent.errors import ConfigError, TelemetryError
from agent.logs import get_logger
from agent.telemetry.spool import MessageKind, Spool

__all__ = ["CommandHandler", "TelemetryClient", "TelemetryCounters", "certificate_identity"]

log = get_logger(__name__)

# Drains another producer's queue through the connection: called with ``send(payload) -> bool``.
Outlet = Callable[[Callable[[bytes], bool]], object]
CommandHandler = Callable[[Command], None]
_MAX_PACKET_BYTES = 256 * 1024  # bytes; the broker drops larger messages to us (MQTT 5)
_SEEN_COMMAND_IDS = 256


@dataclass(frozen=True)
class TelemetryCounters:
    """Totals since ``start()``; the spool keeps its own (``TelemetryClient.spool.counters()``)."""

    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    events_delivered: int = 0
    events_resent: int = 0  # sent again: the control plane did not confirm them in time
    events_refused_by_broker: int = 0
    telemetry_produced: int = 0
    telemetry_delivered: int = 0
    commands_handled: int = 0
    commands_rejected: int = 0  # malformed, oversized or retained
    commands_duplicate: int = 0
    commands_unhandled: int = 0  # valid but no handler registered
    commands_failed: int = 0  # the handler raised


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def certificate_identity(path: Path) -> str | None:
    """The subject CN of the PEM certificate at ``path`` (its first one): the identity the
    broker gives a client that presents it. ``ConfigError`` when it cannot be read."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"mqtt.tls_cert {path} is not a readable PEM certificate: {exc}") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


class TelemetryClient:
    """Publishes a device's state, telemetry and events, and receives its commands."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        device_id: str,
        state_dir: Path,
        model_stats: Callable[[], Sequence[ModelTelemetry]] = tuple,
        system_metrics: Callable[[], SystemMetrics] | None = None,
        slots: Callable[[], Sequence[SlotIdentity]] = tuple,
        profile: HardwareProfile | None = None,
        agent_version: str = __version__,
        client_id: str | None = None,
        keepalive_s: int = 30,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 60.0,
        inflight_window: int = 20,
        max_command_bytes: int = MAX_COMMAND_BYTES,
        tick_s: float = 0.05,
        clock: Callable[[], datetime] = _utc_now,
        rng: random.Random | None = None,
        reconnect_wait: Callable[[float], object] | None = None,
        confirm_events_after_s: float | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if config.host is None:
            raise ConfigError("mqtt.host is not set: telemetry is disabled")
        if config.tls_key is not None and config.tls_cert is None:
            raise ConfigError("mqtt.tls_key is set without mqtt.tls_cert")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path: Path | None = getattr(config, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"mqtt.{name}: no such file: {path}")
        try:
            self.topics = DeviceTopics(device_id, config.topic_prefix)
        except ContractError as exc:
            raise ConfigError(str(exc)) from exc
        self._config = config
        self._host: str = config.host
        self._device_id = device_id
        self._client_id = client_id or device_id
        self._model_stats = model_stats
        self._system_metrics = system_metrics
        self._slots = slots
        self._profile = profile
        self._agent_version = agent_version
        self._keepalive_s = keepalive_s
        self._reconnect_min_s = reconnect_min_s
        self._reconnect_max_s = reconnect_max_s
        self._window = inflight_window
        self._max_command_bytes = max_command_bytes
        self._tick_s = tick_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._reconnect_wait = reconnect_wait or self._stop.wait
        self.spool = Spool(state_dir / "spool", max_bytes=config.spool_max_bytes)
        # None: an event leaves the spool at PUBACK. Else it stays until the control plane
        # confirms it stored it (``confirm_events``), and goes again after this many seconds.
        self._confirm_after_s = confirm_events_after_s
        self._wall = wall
        self._rewind = False  # events go out again: drain from the start of the spool

        self._handlers: dict[str, CommandHandler] = {}
        self._seen_ids: deque[str] = deque(maxlen=_SEEN_COMMAND_IDS)
        self._counts: dict[str, int] = dict.fromkeys(TelemetryCounters.__dataclass_fields__, 0)
        self._counts_lock = threading.Lock()
        self._connected = threading.Event()
        # set once the broker has granted this connection's subscription to commands: a command
        # published before that is not delivered (the session starts clean)
        self._subscribed = threading.Event()
        self._subscribe_mid: int | None = None
        self._connack_failed = False
        self._state_dirty = False
        self._telemetry_seq = 0
        self._seq_lock = threading.Lock()
        # Delivery bookkeeping, touched only on the network thread.
        self._inflight: dict[int, tuple[int, MessageKind]] = {}
        self._early_acks: dict[int, ReasonCode] = {}
        self._publishing = False
        self._cursor = 0
        self._threads: list[threading.Thread] = []
        self._paho: mqtt.Client | None = None
        self._outlets: list[Outlet] = []

    # -- public surface ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the network and telemetry threads; returns at once (connecting is async)."""
        if self._threads:
            raise TelemetryError("telemetry client already started")
        self._stop.clear()
        for target, name in ((self._run_network, "mqtt-net"), (self._run_timer, "mqtt-timer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the retained ``offline`` state, disconnect, close the spool. Idempotent."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        self.spool.close()

    def __enter__(self) -> TelemetryClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_commands_ready(self, timeout: float) -> bool:
        """Whether, within ``timeout``, the broker granted the subscription to this device's
        command topic on the current connection (a command sent before then is lost)."""
        return self._subscribed.wait(timeout) and self.connected

    def on_command(self, command: str, handler: CommandHandler) -> None:
        """Set the handler for ``check-update`` or ``rollback``; it runs on the net thread."""
        self._handlers[command] = handler

    def add_outlet(self, outlet: Outlet) -> None:
        """Have ``outlet(send)`` called on the network thread at each tick while connected and
        the socket keeps up; ``send(payload)`` publishes on ``<prefix>/<device_id>/results`` at
        QoS 0 and says False when the connection cannot take it now. Call before ``start``.
        The inference loop's MQTT result sinks drain their bounded queues this way
        (``agent.sinks``), so results share the device's one connection and identity."""
        self._outlets.append(outlet)

    def publish_event(self, event: UpdateEvent) -> None:
        """Spool an update event for QoS 1 delivery; an ``EventBus`` subscriber.

        Raises ``TelemetryError`` if the event names another device or the spool refuses it.
        """
        if not event.device_id:
            event = event.model_copy(update={"device_id": self._device_id})
        elif event.device_id != self._device_id:
            raise TelemetryError(
                f"event for device {event.device_id!r} on {self._device_id!r}'s link"
            )
        self.spool.enqueue(
            "event", self.topics.events, event.model_dump_json().encode(), qos=1, seq=event.seq
        )

    def pending_event_seq(self) -> int | None:
        """The lowest sequence number of an event the control plane has not confirmed yet."""
        return self.spool.lowest_unconfirmed_seq() if self._confirm_after_s is not None else None

    def confirm_events(self, seqs: Sequence[int]) -> int:
        """The control plane stored these events: they leave the spool. Returns how many."""
        removed = self.spool.confirm(seqs)
        if removed:
            log.debug("events_confirmed", count=removed)
        return removed

    def _resend_unconfirmed(self) -> None:
        if self._confirm_after_s is None:
            return
        again = self.spool.resend_unconfirmed(sent_before=self._wall() - self._confirm_after_s)
        if again:
            self._count("events_resent", again)
            self._rewind = True
            log.warning(
                "events_resent",
                count=again,
                reason=f"not confirmed stored by the control plane in {self._confirm_after_s} s",
            )

    def submit_telemetry(self) -> TelemetryPayload:
        """Build one telemetry message from the providers and spool it (the timer calls this)."""
        models: Sequence[ModelTelemetry] = ()
        system = SystemMetrics()
        try:
            models = self._model_stats()
        except Exception:
            log.exception("telemetry_provider_failed", provider="model_stats")
        if self._system_metrics is not None:
            try:
                system = self._system_metrics()
            except Exception:
                log.exception("telemetry_provider_failed", provider="system_metrics")
        with self._seq_lock:
            seq = self._telemetry_seq
            self._telemetry_seq += 1
        payload = TelemetryPayload(
            device_id=self._device_id,
            seq=seq,
            ts=self._clock(),
            models=tuple(models),
            system=system,
        )
        self._count("telemetry_produced")
        self.spool.enqueue(
            "telemetry", self.topics.telemetry, payload.model_dump_json().encode(), qos=0
        )
        return payload

    def refresh_state(self) -> None:
        """Re-publish the retained birth (call after a swap, commit or rollback)."""
        self._state_dirty = True

    def counters(self) -> TelemetryCounters:
        with self._counts_lock:
            return TelemetryCounters(**self._counts)

    # -- payloads ----------------------------------------------------------------------------

    def birth(self) -> StatePayload:
        try:
            slots = tuple(self._slots())
        except Exception:
            log.exception("telemetry_provider_failed", provider="slots")
            slots = ()
        return StatePayload(
            device_id=self._device_id,
            status="online",
            ts=self._clock(),
            agent_version=self._agent_version,
            profile=self._profile,
            models=slots,
        )

    def _offline(self, reason: str) -> bytes:
        return (
            StatePayload(
                device_id=self._device_id,
                status="offline",
                ts=self._clock(),
                agent_version=self._agent_version,
                reason=reason,
            )
            .model_dump_json()
            .encode()
        )

    # -- threads -----------------------------------------------------------------------------

    def _run_timer(self) -> None:
        interval = self._config.telemetry_interval_s
        deadline = time.monotonic() + interval
        while not self._stop.wait(max(0.0, deadline - time.monotonic())):
            deadline = max(deadline + interval, time.monotonic())
            try:
                self.submit_telemetry()
            except Exception:
                log.exception("telemetry_submit_failed")
            try:
                self._resend_unconfirmed()
            except TelemetryError:
                log.exception("event_resend_failed")

    def _run_network(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                client = self._new_client()
            except ConfigError as exc:  # unreadable certificate or key: say so and keep trying
                self._count("connect_failures")
                log.error("mqtt_tls_setup_failed", error=str(exc))
                attempt += 1
                self._reconnect_wait(self._backoff(attempt))
                continue
            self._paho = client
            self._connack_failed = False
            session = False
            try:
                client.connect(
                    self._host,
                    self._config.port,
                    keepalive=self._keepalive_s,
                    clean_start=True,
                    properties=self._connect_properties(),
                )
            except (OSError, ValueError) as exc:  # refused, unreachable, DNS, TLS handshake
                self._count("connect_failures")
                log.warning("mqtt_connect_failed", host=self._host, error=str(exc))
            else:
                session = self._serve(client)
            self._reset_delivery()
            if self._stop.is_set():
                break
            attempt = 0 if session else attempt + 1
            delay = self._backoff(attempt)
            log.info("mqtt_reconnect_wait", delay_s=round(delay, 3), attempt=attempt)
            self._reconnect_wait(delay)
        self._paho = None

    def _backoff(self, attempt: int) -> float:
        base = min(self._reconnect_max_s, self._reconnect_min_s * 2.0 ** min(attempt, 30))
        return base * (0.5 + 0.5 * self._rng.random())

    def _serve(self, client: mqtt.Client) -> bool:
        """Run one connection until it drops or stop is asked; True if a session was up."""
        had_session = False
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        while not self._stop.is_set():
            rc = client.loop(timeout=self._tick_s)
            if self._connected.is_set():
                had_session = True
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self._connack_failed:
                break
            if self._connected.is_set():
                if self._state_dirty:
                    self._state_dirty = False
                    self._publish_birth(client)
                try:
                    self._drain(client)
                except TelemetryError:
                    log.exception("spool_drain_failed")
                if self._outlets and not client.want_write():  # a socket behind: results wait
                    self._drain_outlets(client)
        if self._stop.is_set() and self._connected.is_set():
            self._shutdown(client)
        elif self._connected.is_set() or rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._connected.clear()
        with_socket = client.socket()
        if with_socket is not None:
            client.disconnect()
        return had_session

    def _shutdown(self, client: mqtt.Client) -> None:
        info = client.publish(self.topics.state, self._offline("shutdown"), qos=1, retain=True)
        deadline = time.monotonic() + 2.0
        while not info.is_published() and time.monotonic() < deadline:
            if client.loop(timeout=self._tick_s) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        for _ in range(10):
            if client.loop(timeout=self._tick_s) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        self._connected.clear()
        log.info("mqtt_stopped", device_id=self._device_id, spooled=len(self.spool))

    # -- paho plumbing -----------------------------------------------------------------------

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        # Our window stays below paho's limit, so paho never queues and order is kept.
        client.max_inflight_messages_set(self._window + 10)
        client.will_set(self.topics.state, self._offline("connection_lost"), qos=1, retain=True)
        cfg = self._config
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls_cert is not None:
            named = certificate_identity(cfg.tls_cert)
            if named != self._device_id:
                raise ConfigError(
                    f"mqtt.tls_cert {cfg.tls_cert} names {named!r}, not this device "
                    f"{self._device_id!r}: the broker would bind the connection to {named!r}"
                )
        if cfg.tls_ca is not None or cfg.tls_cert is not None:
            try:
                client.tls_set(
                    ca_certs=str(cfg.tls_ca) if cfg.tls_ca else None,
                    certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                    keyfile=str(cfg.tls_key) if cfg.tls_key else None,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"mqtt TLS set-up failed: {exc}") from exc
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.MaximumPacketSize = _MAX_PACKET_BYTES
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
            self._connack_failed = True
            self._count("connect_failures")
            log.error("mqtt_connect_refused", reason=str(reason_code))
            return
        self._count("connects")
        self._connected.set()
        self._publish_birth(client)
        self._subscribed.clear()
        _, self._subscribe_mid = client.subscribe(self.topics.cmd, qos=1)
        log.info("mqtt_connected", host=self._host, port=self._config.port, spooled=len(self.spool))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._connected.is_set() and not self._stop.is_set():
            self._count("disconnects")
            log.warning("mqtt_disconnected", reason=str(reason_code))
        self._connected.clear()
        self._subscribed.clear()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        if any(code.is_failure for code in reason_codes):
            log.error("mqtt_command_subscription_refused", reasons=[str(c) for c in reason_codes])
            return
        self._subscribed.set()

    def _publish_birth(self, client: mqtt.Client) -> None:
        client.publish(
            self.topics.state, self.birth().model_dump_json().encode(), qos=1, retain=True
        )

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        entry = self._inflight.pop(mid, None)
        if entry is None:
            if self._publishing:  # acked inside publish(), before we saw the mid
                self._early_acks[mid] = reason_code
            return  # birth / offline state, or a message of an earlier connection
        self._delivered(entry[0], entry[1], reason_code)

    def _delivered(self, spool_id: int, kind: MessageKind, reason_code: ReasonCode) -> None:
        if reason_code.is_failure:
            # A permanent refusal (e.g. 0x87 not authorised): retrying would block the queue.
            self._count("events_refused_by_broker")
            log.error("mqtt_publish_refused", spool_id=spool_id, kind=kind, reason=str(reason_code))
        else:
            self._count("events_delivered" if kind == "event" else "telemetry_delivered")
            if kind == "event" and self._confirm_after_s is not None:
                self.spool.mark_sent(spool_id, now=self._wall())  # kept until confirmed
                return
        self.spool.ack(spool_id)

    def _drain(self, client: mqtt.Client) -> None:
        if self._rewind:
            self._rewind = False
            self._cursor = 0
        room = self._window - len(self._inflight)
        if room <= 0:
            return
        for msg in self.spool.peek(after_id=self._cursor, limit=room):
            self._publishing = True
            try:
                info = client.publish(msg.topic, msg.payload, qos=msg.qos)
            except ValueError as exc:  # can never be sent (topic or size): do not block the queue
                log.error("spool_message_unsendable", spool_id=msg.id, error=str(exc))
                self.spool.ack(msg.id)
                continue
            finally:
                self._publishing = False
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return  # connection going down; the message stays spooled
            self._cursor = msg.id
            early = self._early_acks.pop(info.mid, None)
            if early is not None:
                self._delivered(msg.id, msg.kind, early)
            else:
                self._inflight[info.mid] = (msg.id, msg.kind)

    def _drain_outlets(self, client: mqtt.Client) -> None:
        topic = self.topics.results

        def send(payload: bytes) -> bool:
            info = client.publish(topic, payload, qos=0)
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                return False
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise TelemetryError(f"results publish refused: {info.rc}")
            return True

        for outlet in self._outlets:
            try:
                outlet(send)
            except Exception:  # an outlet's bug must not take the connection down
                log.exception("outlet_drain_failed")

    def _reset_delivery(self) -> None:
        # Unacked messages stay in the spool and go again, in order, on the next connection.
        self._connected.clear()
        self._inflight.clear()
        self._early_acks.clear()
        self._cursor = 0

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self.topics.cmd:
            return
        if message.retain:
            # A retained command would replay on every reconnect; commands are one-shot.
            self._count("commands_rejected")
            log.warning("command_rejected", reason="retained")
            return
        try:
            command = parse_command(bytes(message.payload), max_bytes=self._max_command_bytes)
        except ContractError as exc:
            self._count("commands_rejected")
            log.warning("command_rejected", reason=str(exc), bytes=len(message.payload))
            return
        if command.id in self._seen_ids:
            self._count("commands_duplicate")
            return
        self._seen_ids.append(command.id)
        handler = self._handlers.get(command.command)
        if handler is None:
            self._count("commands_unhandled")
            log.warning("command_unhandled", command=command.command, id=command.id)
            return
        try:
            handler(command)
        except Exception:
            self._count("commands_failed")
            log.exception("command_failed", command=command.command, id=command.id)
            return
        self._count("commands_handled")
        log.info("command_handled", command=command.command, id=command.id)

    def _count(self, name: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[name] += n

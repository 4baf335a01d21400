"""Where the inference loop's postprocessed results go: ``[[loop.sinks]]``, several at once.

Owns building the sinks once per process from ``LoopConfig`` (``build_sinks``), the fan-out a
loop is handed (``ResultSinks.for_loop``: postprocess each result once, serialize it at most
once, give it to every sink), and the sink kinds:

- ``jsonl``: one ``agent.contracts.results.ResultMessage`` per line, appended to a file
  (``loop.sink_path`` is its older form and still works);
- ``mqtt``: the same JSON on ``<prefix>/<device_id>/results`` at QoS 0. The loop's thread only
  appends to a bounded queue (the oldest is dropped when it is full) after a rate cap and a size
  cap; another thread drains it: the daemon's own MQTT connection
  (``agent.telemetry.TelemetryClient.add_outlet``) or, for ``edge-agent run``,
  ``ResultPublisher``'s paho client. A broker that is slow or away never slows the loop; every
  drop is counted and logged;
- ``ros2``: ``vision_msgs`` messages over DDS for a ROS 2 graph, and ``/diagnostics``
  (``agent.ros2.sink``).

A new kind is a config class in ``agent.config`` (a member of ``SinkConfig``) and a builder in
``_BUILDERS`` below, taking its config and a ``SinkContext``. Sinks are shared by every loop of
the process (a loop that is rebuilt keeps them) and closed by ``ResultSinks.close``. What a
result is belongs to ``agent.postprocess`` and ``agent.contracts.results``; the loop's pacing to
``agent.loop``.
"""

from __future__ import annotations

import collections
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from agent.config import (
    JsonlSinkConfig,
    LoopConfig,
    MqttConfig,
    MqttSinkConfig,
    PluginPostprocessConfig,
    Ros2SinkConfig,
    SinkConfig,
)
from agent.contracts.results import RESULT_SCHEMA_VERSION, message_fields
from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, SinkError, TelemetryError
from agent.logs import get_logger
from agent.postprocess import Postprocessor, ResultBody, build_postprocessor, load_plugin

__all__ = [
    "JsonlResultSink",
    "LoopResult",
    "MqttResultSink",
    "ResultPublisher",
    "ResultSinks",
    "Sink",
    "SinkContext",
    "build_sinks",
]

log = get_logger(__name__)

Array = np.ndarray[Any, Any]
# Hands one payload to the MQTT connection: True when it was taken (written or queued by
# paho), False when it cannot be now (not connected), so it stays queued.
Send = Callable[[bytes], bool]


class LoopResult:
    """One postprocessed result of one loop; its JSON is made once, by the first sink asking."""

    __slots__ = ("_json", "body", "latency_ms", "model", "seq", "ts")

    def __init__(self, model: str, seq: int, ts: float, latency_ms: float, body: ResultBody):
        self.model = model
        self.seq = seq
        self.ts = ts
        self.latency_ms = latency_ms
        self.body = body
        self._json: bytes | None = None

    def fields(self) -> dict[str, Any]:
        """The ``ResultMessage`` as a JSON object."""
        return message_fields(
            self.body,
            model=self.model,
            seq=self.seq,
            ts=round(self.ts, 6),
            latency_ms=round(self.latency_ms, 4),
        )

    def json_bytes(self) -> bytes:
        """``fields()`` as compact JSON: the envelope, then the body as pydantic writes it."""
        if self._json is None:
            head = json.dumps(
                {
                    "schema_version": RESULT_SCHEMA_VERSION,
                    "model": self.model,
                    "seq": self.seq,
                    "ts": round(self.ts, 6),
                    "latency_ms": round(self.latency_ms, 4),
                },
                separators=(",", ":"),
            )
            body = self.body.model_dump_json()  # an object with at least "kind"
            self._json = f"{head[:-1]},{body[1:]}".encode()
        return self._json


class Sink(Protocol):
    """A result sink: ``publish`` runs in a loop's thread and must not block or raise for a
    slow consumer (drop and count instead); ``every`` keeps one result in N."""

    kind: str
    every: int

    def publish(self, result: LoopResult) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SinkContext:
    """What builders may need beside their own config: the MQTT settings, the device id and
    (the daemon) the version each model serves now."""

    device_id: str
    mqtt: MqttConfig
    version: Callable[[str], str | None] | None = None


class JsonlResultSink:
    """Appends one ``ResultMessage`` per line to a file, opened at the first result (a run that
    fails before one leaves no file). Lines are buffered and flushed at each window end and on
    close. Loops of several models may share it: writes are serialized."""

    kind = "jsonl"

    def __init__(self, path: Path, *, every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"sink every must be >= 1, got {every}")
        if not path.parent.is_dir():
            raise ConfigError(f"sink directory does not exist: {path.parent}")
        if path.is_dir():
            raise ConfigError(f"sink path is a directory: {path}")
        self.path = path
        self.every = every
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def publish(self, result: LoopResult) -> None:
        line = result.json_bytes() + b"\n"
        with self._lock:
            try:
                if self._file is None:
                    self._file = self.path.open("ab")
                self._file.write(line)
            except OSError as exc:
                raise SinkError(f"cannot write {self.path}: {exc}", sink=self.kind) from exc

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                except OSError as exc:
                    raise SinkError(f"cannot write {self.path}: {exc}", sink=self.kind) from exc

    def close(self) -> None:
        with self._lock:
            if self._file is not None and not self._file.closed:
                self._file.close()


@dataclass
class MqttSinkCounters:
    """What happened to the results given to an MQTT sink, since it was built."""

    queued: int = 0  # taken into the queue
    sent: int = 0  # handed to the connection
    dropped_full: int = 0  # pushed out of a full queue (the oldest first)
    dropped_rate: int = 0  # over ``max_rate_hz``
    dropped_size: int = 0  # over ``max_bytes``
    send_failed: int = 0  # the connection refused it (not "not connected": those wait)

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_rate + self.dropped_size + self.send_failed


class MqttResultSink:
    """Results for ``<prefix>/<device_id>/results``, bounded three ways: a rate cap (a token
    bucket of one second's worth), a size cap per message, and a queue of ``queue_size`` that
    drops its oldest. ``publish`` (a loop's thread) never waits; ``drain`` (the connection's
    thread) sends what is queued. ``clock`` is monotonic seconds."""

    kind = "mqtt"

    def __init__(
        self,
        *,
        max_rate_hz: float = 30.0,
        max_bytes: int = 64 * 1024,
        queue_size: int = 64,
        every: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not max_rate_hz > 0 or max_bytes < 1 or queue_size < 1 or every < 1:
            raise ConfigError("mqtt sink: max_rate_hz, max_bytes, queue_size, every must be > 0")
        self.every = every
        self.max_rate_hz = max_rate_hz
        self.max_bytes = max_bytes
        self.queue_size = queue_size
        self.counters = MqttSinkCounters()
        self._queue: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._clock = clock
        self._burst = max(1.0, max_rate_hz)  # a second's worth
        self._tokens = self._burst
        self._refilled = clock()
        self._reported_drops = 0
        self._wake: threading.Event | None = None

    def publish(self, result: LoopResult) -> None:
        c = self.counters
        with self._lock:  # loops of several models may share this sink
            now = self._clock()
            tokens = min(self._burst, self._tokens + (now - self._refilled) * self.max_rate_hz)
            self._refilled = now
            if tokens < 1.0:
                self._tokens = tokens
                c.dropped_rate += 1
                return
            self._tokens = tokens - 1.0
        payload = result.json_bytes()
        if len(payload) > self.max_bytes:
            c.dropped_size += 1
            return
        with self._lock:
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                c.dropped_full += 1
            self._queue.append(payload)
            c.queued += 1
        if self._wake is not None:
            self._wake.set()

    def pending(self) -> int:
        return len(self._queue)

    def wake_on_publish(self, event: threading.Event) -> None:
        """Set ``event`` at each queued result (a draining thread waits on it)."""
        self._wake = event

    def drain(self, send: Send, limit: int | None = None) -> int:
        """Send queued payloads oldest first until the queue is empty, ``limit`` were sent or
        ``send`` says the connection cannot take one now; returns how many were sent."""
        sent = 0
        while limit is None or sent < limit:
            with self._lock:
                if not self._queue:
                    break
                payload = self._queue[0]
            try:
                taken = send(payload)
            except Exception as exc:  # the connection refused this payload: drop it, go on
                taken = True
                self.counters.send_failed += 1
                log.warning("result_send_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                if taken:
                    self.counters.sent += 1
                    sent += 1
            if not taken:
                break
            with self._lock:  # the loop may have pushed it out meanwhile: pop only if still first
                if self._queue and self._queue[0] is payload:
                    self._queue.popleft()
        return sent

    def flush(self) -> None:
        """At a window end: log the drops of the window, if any (never per result)."""
        dropped = self.counters.dropped
        if dropped != self._reported_drops:
            c = self.counters
            log.warning(
                "mqtt_results_dropped",
                dropped=dropped - self._reported_drops,
                total_dropped=dropped,
                queue_full=c.dropped_full,
                over_rate=c.dropped_rate,
                over_size=c.dropped_size,
                send_failed=c.send_failed,
                sent=c.sent,
            )
            self._reported_drops = dropped

    def close(self) -> None:
        c = self.counters
        log.info(
            "mqtt_results_closed",
            queued=c.queued,
            sent=c.sent,
            dropped=c.dropped,
            pending=self.pending(),
        )


def _jsonl(config: SinkConfig, ctx: SinkContext) -> Sink:
    assert isinstance(config, JsonlSinkConfig)
    return JsonlResultSink(config.path, every=config.every)


def _mqtt(config: SinkConfig, ctx: SinkContext) -> Sink:
    assert isinstance(config, MqttSinkConfig)
    if ctx.mqtt.host is None:
        raise ConfigError('[[loop.sinks]] kind = "mqtt" needs [mqtt] host (the broker)')
    return MqttResultSink(
        max_rate_hz=config.max_rate_hz,
        max_bytes=config.max_bytes,
        queue_size=config.queue_size,
        every=config.every,
    )


def _ros2(config: SinkConfig, ctx: SinkContext) -> Sink:
    assert isinstance(config, Ros2SinkConfig)
    from agent.ros2.sink import build_ros2_sink

    return build_ros2_sink(config, device_id=ctx.device_id, version=ctx.version)


_BUILDERS: dict[str, Callable[[SinkConfig, SinkContext], Sink]] = {
    "jsonl": _jsonl,
    "mqtt": _mqtt,
    "ros2": _ros2,
}


class _Fanout:
    """``agent.loop.ResultSink`` for one loop: postprocess, then give the result to every sink
    that wants this frame. Every sink gets its result even when another fails; the first
    failure is then raised (the loop counts the frame as failed)."""

    def __init__(self, model: str, postprocessor: Postprocessor, sinks: Sequence[Sink]) -> None:
        self.model = model
        self.postprocessor = postprocessor
        self._sinks = tuple(sinks)
        self._everies = tuple(s.every for s in sinks)
        self._every_one = all(e == 1 for e in self._everies)

    def __call__(self, seq: int, ts: float, latency_ns: int, outputs: Mapping[str, Array]) -> None:
        if not self._every_one and all(seq % e for e in self._everies):
            return
        result = LoopResult(self.model, seq, ts, latency_ns / 1e6, self.postprocessor(outputs))
        error: Exception | None = None
        for sink, every in zip(self._sinks, self._everies, strict=True):
            if every == 1 or not seq % every:
                try:
                    sink.publish(result)
                except Exception as exc:
                    error = error or exc
        if error is not None:
            raise error

    def flush(self) -> None:
        error: Exception | None = None
        for sink in self._sinks:
            try:
                sink.flush()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error

    def close(self) -> None:
        """The loop ended; the sinks live on for the next loop (``ResultSinks.close``)."""
        self.flush()


class ResultSinks:
    """The process's sinks, built once from the config; ``for_loop`` hands each loop its
    fan-out, ``mqtt_sinks`` are what an MQTT connection drains, ``close`` ends them all."""

    def __init__(self, loop: LoopConfig, sinks: Sequence[Sink]) -> None:
        self.postprocess = loop.postprocess
        self.sinks = tuple(sinks)

    @property
    def mqtt_sinks(self) -> tuple[MqttResultSink, ...]:
        return tuple(s for s in self.sinks if isinstance(s, MqttResultSink))

    def postprocessor(self, outputs: Sequence[TensorSpec] = ()) -> Postprocessor:
        """The configured postprocessor for a model with these outputs (``ConfigError``)."""
        return build_postprocessor(self.postprocess, outputs)

    def check(self, outputs: Sequence[TensorSpec] | None = None) -> None:
        """Raise ``ConfigError`` now for a postprocessor that cannot be built for a model with
        these outputs; with ``None`` (no model known yet) a plugin is only looked up and
        imported, its factory is left for the loop (it may need the outputs)."""
        if not self.sinks:
            return
        if outputs is None:
            if isinstance(self.postprocess, PluginPostprocessConfig):
                load_plugin(self.postprocess.name)
            return
        self.postprocessor(outputs)

    def for_loop(self, model: str, outputs: Sequence[TensorSpec] = ()) -> _Fanout | None:
        """The ``sink`` for a loop running ``model`` (None without sinks: nothing to do)."""
        if not self.sinks:
            return None
        return _Fanout(model, self.postprocessor(outputs), self.sinks)

    def drain_mqtt(self, send: Send) -> int:
        """Send what every MQTT sink has queued (the connection's thread)."""
        return sum(sink.drain(send) for sink in self.mqtt_sinks)

    def close(self) -> None:
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.warning("sink_close_failed", kind=sink.kind, error=str(exc))


def build_sinks(
    loop: LoopConfig,
    *,
    device_id: str,
    mqtt: MqttConfig,
    version: Callable[[str], str | None] | None = None,
) -> ResultSinks:
    """Every configured sink (``loop.sink_path`` first, as a ``jsonl`` sink, then
    ``[[loop.sinks]]`` in order); ``ConfigError`` for one that cannot work here."""
    configs: list[SinkConfig] = []
    if loop.sink_path is not None:
        configs.append(JsonlSinkConfig(path=loop.sink_path))
    configs.extend(loop.sinks)
    ctx = SinkContext(device_id=device_id, mqtt=mqtt, version=version)
    paths = [c.path.resolve() for c in configs if isinstance(c, JsonlSinkConfig)]
    if len(paths) != len(set(paths)):
        raise ConfigError("two jsonl sinks write the same file")
    return ResultSinks(loop, [_BUILDERS[c.kind](c, ctx) for c in configs])


class ResultPublisher:
    """An MQTT connection of its own that drains result sinks (for ``edge-agent run``; the
    daemon drains them on its telemetry connection instead). paho 2.x, MQTT 5, QoS 0, the
    ``[mqtt]`` host, port, credentials and TLS; reconnects by itself. ``stop`` sends what is
    still queued for at most ``linger_s`` while connected."""

    def __init__(
        self,
        config: MqttConfig,
        sinks: ResultSinks,
        *,
        device_id: str,
        linger_s: float = 1.0,
        tick_s: float = 0.02,
    ) -> None:
        from agent.contracts.errors import ContractError
        from agent.contracts.telemetry import DeviceTopics

        if config.host is None:
            raise ConfigError('[[loop.sinks]] kind = "mqtt" needs [mqtt] host (the broker)')
        try:
            self.topic = DeviceTopics(device_id, config.topic_prefix).results
        except ContractError as exc:
            raise ConfigError(str(exc)) from exc
        self._config = config
        self._sinks = sinks
        self._linger_s = linger_s
        self._tick_s = tick_s
        self._client_id = f"{device_id}-results-{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._connected = threading.Event()

    def start(self) -> ResultPublisher:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        cfg = self._config
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.tls_ca is not None or cfg.tls_cert is not None:
            try:
                client.tls_set(
                    ca_certs=str(cfg.tls_ca) if cfg.tls_ca else None,
                    certfile=str(cfg.tls_cert) if cfg.tls_cert else None,
                    keyfile=str(cfg.tls_key) if cfg.tls_key else None,
                )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"mqtt TLS set-up failed: {exc}") from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = lambda *_a: self._connected.set()
        client.on_disconnect = lambda *_a: self._connected.clear()
        assert cfg.host is not None
        client.connect_async(cfg.host, cfg.port, keepalive=30)
        client.loop_start()
        self._client = client
        for sink in self._sinks.mqtt_sinks:
            sink.wake_on_publish(self._wake)
        self._thread = threading.Thread(target=self._run, name="mqtt-results", daemon=True)
        self._thread.start()
        return self

    def _send(self, payload: bytes) -> bool:
        from paho.mqtt.enums import MQTTErrorCode

        if not self._connected.is_set():
            return False
        info = self._client.publish(self.topic, payload, qos=0)
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return False
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TelemetryError(f"publish refused: {info.rc}")
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            if self._connected.is_set():
                self._sinks.drain_mqtt(self._send)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        client = self._client
        if client is None:
            return
        # What is still queued goes out if the broker is there (or comes) within the linger.
        deadline = time.monotonic() + self._linger_s
        while any(s.pending() for s in self._sinks.mqtt_sinks) and time.monotonic() < deadline:
            if self._connected.is_set():
                self._sinks.drain_mqtt(self._send)
            time.sleep(self._tick_s)
        while client.want_write() and time.monotonic() < deadline:
            time.sleep(self._tick_s)
        client.disconnect()
        client.loop_stop()
        self._client = None

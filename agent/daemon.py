"""The agent daemon's composition root: settings in, a running device out.

Builds, in order: the model store (start-up recovery first), one slot and update driver per model
(``ServedModels``, booted from the store's pointers and the update journal), the local inference
API (``agent.api.server.start_api``) when enabled, the update client (``agent.updates.client``)
in its own thread when a control plane is configured, and an inference loop per configured model
once that model serves. Then it tells systemd it is ready and pings the watchdog while the loops
make progress. ``stop()`` reverses it and returns a summary of what the loops did.

A loop's health is the model's health: a loop that cannot start (the source does not open, the
model's input does not fit the frames), whose thread dies, or whose every frame of a window fails
is reported at once (log line, ``loop_failed`` event over MQTT, reported state, the model's
readiness on the local API, systemd ``STATUS=``), rebuilt every ``LOOP_RETRY_S`` or when another
version serves, and while it stays dead the watchdog is not pinged. A configured model with no
version installed says so the same way.

Each part owns its behaviour; this module only wires them and owns their lifetimes.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent._sources import build_source, require_source_kind
from agent.config import AgentSettings
from agent.contracts.events import UpdateEvent
from agent.contracts.manifest import Preprocessing
from agent.contracts.profile import HardwareProfile
from agent.contracts.state import LoopHealth
from agent.contracts.telemetry import ModelTelemetry, SlotIdentity
from agent.contracts.tensors import TensorSpec
from agent.errors import AgentError, ConfigError
from agent.events import EventBus, EventSequence
from agent.logs import get_logger
from agent.loop import FrameSource, InferenceLoop
from agent.models.activation import ModelActivator
from agent.models.probation import Limits, UpdateJournal, boot_version, rejected_versions
from agent.models.slots import ModelSlot, SlotRegistry, load_options_from
from agent.models.store import ModelStore
from agent.shadow import ShadowHost
from agent.sinks import ResultSinks, build_sinks
from agent.systemd import Notifier, WatchdogPinger, watchdog_interval_s
from agent.updates.report import LoopStatus

__all__ = ["Daemon", "ServedModels"]

log = get_logger(__name__)

Array = np.ndarray[Any, Any]

LOOP_RETRY_S = 5.0  # a failed loop is rebuilt this often (and whenever another version serves)
NOT_INSTALLED = "configured, but no version of it is installed"


@dataclass
class _LoopWatch:
    """What the daemon knows about one configured model's loop."""

    status: LoopStatus | None = None
    retry_at: float = 0.0  # monotonic seconds
    version: str = ""  # the version serving when the loop was built
    preprocessing: object = None  # the declared preprocessing the loop was built with
    window: object = None  # start of the last window looked at
    done: list[tuple[InferenceLoop, _CountingModel]] = field(default_factory=list)


class ServedModels:
    """Every served model: its slot (in ``registry``) and its update driver, made on first use.

    This is the ``agent.updates.client.Activators`` the update client drives.
    """

    def __init__(
        self,
        settings: AgentSettings,
        store: ModelStore,
        bus: EventBus,
        *,
        profile: Callable[[], HardwareProfile] | None = None,
        min_requests: int = 20,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._profile = profile
        self._store = store
        self._bus = bus
        self._now = now
        self.registry = SlotRegistry()
        self.journal = UpdateJournal(settings.state_dir)
        self.limits = Limits.from_config(settings.swap, min_requests=min_requests)
        self._activators: dict[str, ModelActivator] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ModelActivator:
        with self._lock:
            activator = self._activators.get(name)
            if activator is None:
                slot = ModelSlot(
                    name,
                    self._store,
                    swap_config=self._settings.swap,
                    backend_config=self._settings.backends,
                    load_options=load_options_from(
                        self._settings.backends, self._settings.state_dir / "cache"
                    ),
                    bus=self._bus,
                    profile=self._profile,
                    state_dir=self._settings.state_dir,
                )
                activator = ModelActivator(
                    slot, journal=self.journal, limits=self.limits, bus=self._bus, now=self._now
                )
                self._activators[name] = activator
                self.registry.add(slot)
            return activator

    def names(self) -> Sequence[str]:
        with self._lock:
            return sorted(self._activators)

    def boot_choice(self, name: str, installed: list[str]) -> str | None:
        """The version to serve when ``name``'s pointer is lost: by the journal's verdicts,
        never one this device rejected while a good one is installed."""
        try:
            record = self.journal.load(name)
        except AgentError as exc:
            log.error("update_journal_unreadable", model=name, reason=str(exc))
            record = None
        version = boot_version(record, installed)
        bad = rejected_versions(record)
        log.warning(
            "boot_version_chosen",
            model=name,
            version=version,
            installed=installed,
            rejected=sorted(bad),
            reason="the active pointer was lost or unusable",
        )
        return version

    def boot(self) -> None:
        """Serve what the store's pointers and the journal say, for every installed model."""
        for name in self._store.names():
            if self._store.active(name) is None and self.journal.load(name) is None:
                continue
            try:
                self.get(name).boot(resume=True)
            except AgentError as exc:
                log.error("model_boot_failed", model=name, reason=str(exc))

    def close(self) -> None:
        self.registry.close()


class _CountingModel:
    """The loop's view of a slot: runs on whatever version serves and counts by version."""

    def __init__(self, slot: ModelSlot) -> None:
        self.slot = slot
        self.name = slot.name
        self.inputs: tuple[TensorSpec, ...] = slot.inputs
        self.outputs: tuple[TensorSpec, ...] = slot.outputs
        self.by_version: collections.Counter[str] = collections.Counter()
        self.attempts = 0  # inferences that returned, successfully or not: the loop's progress

    def infer(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        try:
            computed, outputs = self.slot.infer_versioned(feeds)
        finally:
            self.attempts += 1
        self.by_version[computed.version] += 1
        return outputs


EARLY_EVENTS = 1024  # events kept from before MQTT runs


class Daemon:
    """The running agent. ``start()``, then ``wait(stop)`` or ``stop()``."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        profile: Callable[[], HardwareProfile] | None = None,
        notifier: Notifier | None = None,
        supervise_s: float = 0.1,
    ) -> None:
        self.settings = settings
        # Event numbers outlive restarts: the control plane confirms stored events by number.
        self.bus = EventBus(
            settings.device_id, sequence=EventSequence(settings.state_dir / "events.seq")
        )
        self.store = ModelStore(
            settings.state_dir, keep_versions=settings.swap.keep_versions, bus=self.bus
        )
        # Events from before MQTT runs (boot, the first update while enrolling) wait here and
        # go out when it starts: none is lost for starting early.
        self._early_events: collections.deque[UpdateEvent] = collections.deque(maxlen=EARLY_EVENTS)
        self._stop_buffering = self.bus.subscribe(self._early_events.append)
        self._profile = profile or _profile_reader(settings)
        self.served = ServedModels(settings, self.store, self.bus, profile=self._profile)
        # Versions run beside the serving ones on a share of their inferences (rollout shadows).
        self.shadows = ShadowHost()
        self._notifier = notifier or Notifier()
        self._supervise_s = supervise_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loops: dict[str, tuple[InferenceLoop, _CountingModel]] = {}
        self._api: Any = None
        self._watchdog: WatchdogPinger | None = None
        self._progress: dict[str, int] = {}
        self._warned_preprocessing: set[tuple[str, str]] = set()
        self._reported_windows: dict[str, object] = {}
        self._watch: dict[str, _LoopWatch] = {m.name: _LoopWatch() for m in settings.models}
        self._watch_lock = threading.Lock()
        self.update_client: Any = None
        self.telemetry: Any = None
        self._sinks: ResultSinks | None = None

    def start(self) -> None:
        settings = self.settings
        _check_state_dir(settings.state_dir)
        _check_loop_config(settings)
        self._sinks = build_sinks(
            settings.loop,
            device_id=settings.device_id,
            mqtt=settings.mqtt,
            version=self._serving_version,
        )
        report = self.store.recover(choose=self.served.boot_choice)
        for action in report.actions:
            log.warning("store_recovered", action=action)
        self.served.boot()
        self._check_postprocess()
        if settings.api.enabled:
            from agent.api.server import start_api

            self._api = start_api(self.served.registry, settings.api, self._metrics_registry())
        if settings.control_plane.url:
            self._start_update_client()
        if settings.mqtt.host:
            if self.update_client is None:
                self._start_telemetry(settings.device_id)
            else:
                # Publish under the id the control plane knows: wait for enrollment.
                thread = threading.Thread(
                    target=self._telemetry_after_enrollment, name="telemetry-start", daemon=True
                )
                thread.start()
                self._threads.append(thread)
        self._check_loops()
        supervisor = threading.Thread(target=self._supervise, name="daemon-supervisor", daemon=True)
        supervisor.start()
        self._threads.append(supervisor)
        self._notifier.ready(self.status_line())
        self.bus.subscribe(self._on_event)
        interval = watchdog_interval_s()
        if interval is not None:
            self._watchdog = WatchdogPinger(self._notifier, interval, self.healthy).start()
        log.info("daemon_started", models=list(self.served.names()))

    def _metrics_registry(self) -> Any:
        """The daemon's collectors (process, GPU, loops, update events) for ``/metrics``."""
        from prometheus_client import CollectorRegistry

        from agent.observability import register_daemon_metrics
        from agent.telemetry import SystemMetricsCollector

        registry = CollectorRegistry()
        register_daemon_metrics(
            registry,
            system=SystemMetricsCollector().collect,
            loops=self._loop_readings,
            spool=self._spool_reading,
            subscribe=self.bus.subscribe,
        )
        return registry

    def _spool_reading(self) -> tuple[int, int, int] | None:
        client = self.telemetry
        if client is None:
            return None
        spool = client.spool
        return len(spool), spool.bytes, self.settings.mqtt.spool_max_bytes

    def _loop_readings(self) -> list[tuple[str, dict[str, int], dict[str, float | None], float]]:
        out = []
        for name, (loop, _counting) in list(self._loops.items()):
            w = loop.latest
            if w is None:
                continue
            totals = {"ok": w.total_count, "failed": w.total_failed, "dropped": w.total_dropped}
            quantiles = {
                "0.5": w.latency_p50_ms,
                "0.95": w.latency_p95_ms,
                "0.99": w.latency_p99_ms,
            }
            out.append((name, totals, quantiles, w.throughput_hz))
        return out

    def _start_update_client(self) -> None:
        from agent.updates.client import UpdateClient

        settings = self.settings
        self.update_client = UpdateClient(
            state_dir=settings.state_dir,
            config=settings.control_plane,
            store=self.store,
            activators=self.served,
            bus=self.bus,
            device_name=settings.device_id,
            profile=self._profile,
            max_variants=settings.backends.max_candidates if settings.backends.measure else 1,
            loop_health=self.loop_health,
            shadows=self.shadows,
        )
        thread = threading.Thread(
            target=self.update_client.run, args=(self._stop,), name="update-client", daemon=True
        )
        thread.start()
        self._threads.append(thread)

    def _hardware_profile(self) -> HardwareProfile:
        return self._profile()

    def _telemetry_after_enrollment(self) -> None:
        while not self._stop.wait(0.2):
            credential = self.update_client.credential
            if credential is not None:
                self.bus.set_device_id(credential.device_id)
                self._start_telemetry(credential.device_id)
                return

    def _start_telemetry(self, device_id: str) -> None:
        """MQTT: retained birth and last will, periodic telemetry from the loops' windows,
        update events at QoS 1, and the control plane's commands. ``device_id`` is the enrolled
        id when a control plane is configured, so its ingester and rollouts find this device."""
        from agent.telemetry import SystemMetricsCollector, TelemetryClient

        client = TelemetryClient(
            self.settings.mqtt,
            device_id=device_id,
            state_dir=self.settings.state_dir,
            model_stats=self._model_stats,
            system_metrics=SystemMetricsCollector().collect,
            slots=self._slot_identities,
            profile=self._hardware_profile(),
            # With a control plane, events leave the spool only once it confirms it stored them.
            confirm_events_after_s=(
                self.settings.mqtt.event_resend_s if self.update_client is not None else None
            ),
        )
        if self._sinks is not None and self._sinks.mqtt_sinks:
            client.add_outlet(self._sinks.drain_mqtt)
        client.on_command("check-update", lambda _cmd: self.check_now())
        client.on_command("rollback", self._rollback_command)
        self.bus.subscribe(client.publish_event)
        self._stop_buffering()
        for event in list(self._early_events):  # one may also have reached the client: a
            # duplicate (same seq and ts) is dropped by receivers
            try:
                client.publish_event(event.model_copy(update={"device_id": device_id}))
            except AgentError as exc:
                log.warning("early_event_not_sent", step=event.step, reason=str(exc))
        self._early_events.clear()
        client.start()
        self.telemetry = client
        if self.update_client is not None:
            self.update_client.event_acks = client
        # A loop that failed before MQTT came up (at start-up, before enrollment) is said now.
        for name, status in self.loop_health().items():
            if status.health == "failed":
                slot = self.served.get(name).slot if name in self.served.names() else None
                version = (slot.version or None) if slot is not None else None
                self.bus.emit("loop_failed", model=name, version=version, reason=status.error)

    def _rollback_command(self, command: Any) -> None:
        model = str(command.model)
        if model not in self.served.names():
            log.warning("rollback_command_ignored", model=model, reason="no such model")
            return
        # Off the network thread: a rollback reloads a session.
        threading.Thread(
            target=self._rollback, args=(model,), name=f"rollback-{model}", daemon=True
        ).start()

    def _rollback(self, model: str) -> None:
        """The control plane's abort: back to the previous version, on probation or committed.
        The activator's ``rolled_back`` event wakes the update client, which reports it."""
        try:
            version = self.served.get(model).rollback("requested by the control plane")
        except AgentError as exc:
            log.error("rollback_command_failed", model=model, reason=str(exc))
            return
        log.info("rollback_command_done", model=model, version=version)

    def _slot_identities(self) -> list[SlotIdentity]:
        out = []
        for name in self.served.names():
            current = self.served.get(name).slot.current
            if current is None:
                out.append(SlotIdentity(name=name))
                continue
            entry = current.variant.file(current.variant.entrypoint)
            out.append(
                SlotIdentity(
                    name=name,
                    version=current.version,
                    variant_id=current.variant.id,
                    backend=current.backend,
                    device=current.device,
                    choice=current.choice,
                    digest=entry.sha256,
                )
            )
        return out

    def _model_stats(self) -> list[ModelTelemetry]:
        """Each loop's last closed window, once (the telemetry tick may outpace the window)."""
        out = []
        for name, (loop, counting) in list(self._loops.items()):
            window = loop.latest
            if window is None or self._reported_windows.get(name) == window.window_start:
                continue
            self._reported_windows[name] = window.window_start
            current = counting.slot.current
            out.append(
                ModelTelemetry(
                    name=name,
                    version=current.version if current else None,
                    variant_id=current.variant.id if current else None,
                    backend=current.backend if current else None,
                    window_s=max(window.window_s, 1e-3),
                    count=window.count + window.failed,
                    failed=window.failed,
                    dropped=window.dropped,
                    throughput_per_s=window.throughput_hz,
                    latency_p50_ms=window.latency_p50_ms,
                    latency_p95_ms=window.latency_p95_ms,
                    latency_p99_ms=window.latency_p99_ms,
                    latency_sketch=window.latency_sketch,
                    shadow=self.shadows.take_window(name),
                )
            )
        return out

    def check_now(self) -> None:
        """Ask the update client to poll now (the MQTT ``check-update`` command)."""
        if self.update_client is not None:
            self.update_client.check_now()

    # --- loops -------------------------------------------------------------------------------

    def _supervise(self) -> None:
        said: str | None = None
        while not self._stop.wait(self._supervise_s):
            try:
                self._check_loops()
                problem = self._enrollment_problem()
                if problem != said:  # STATUS= says when the device falls off the fleet
                    said = problem
                    self._notifier.status(self.status_line())
            except Exception:  # the supervisor must outlive any bug in one check
                log.exception("loop_check_crashed")

    def _enrollment_problem(self) -> str | None:
        client = self.update_client
        return None if client is None else client.enrollment_problem

    def _check_loops(self) -> None:
        """Start, watch and rebuild each configured model's loop; keep its health current."""
        now = time.monotonic()
        for model in self.settings.models:
            if self._stop.is_set():
                return
            name = model.name
            watch = self._watch[name]
            slot = self.served.get(name).slot if name in self.served.names() else None
            if slot is None or slot.current is None:
                installed = bool(self.store.versions(name)) if slot is None else True
                why = NOT_INSTALLED if not installed else "no version of it serves"
                self._set_health(name, "not_installed", why)
                continue
            entry = self._loops.get(name)
            if entry is not None:
                loop, _counting = entry
                if loop.state == "stopped" and not self._stop.is_set():
                    error = loop.error
                    why = f"{type(error).__name__}: {error}" if error else "the loop ended"
                    self._retire_loop(name)
                    self._set_health(name, "failed", f"loop stopped: {why}")
                    watch.retry_at = now + LOOP_RETRY_S
                    continue
                window = loop.latest
                if window is not None and window.window_start != watch.window:
                    watch.window = window.window_start
                    if window.count == 0 and window.failed > 0:
                        why = f"every frame of the last window failed: {loop.last_failure}"
                        self._set_health(name, "failed", why)
                        watch.retry_at = now + LOOP_RETRY_S
                    elif window.count > 0:
                        self._set_health(name, "running", None)
                failed = watch.status is not None and watch.status.health == "failed"
                if failed and (slot.version != watch.version or now >= watch.retry_at):
                    self._retire_loop(name)  # rebuilt below: another version, or a retry
                elif not failed and slot.version != watch.version:
                    if self._declared(name, slot.version) == watch.preprocessing:
                        watch.version = slot.version  # same preprocessing: the loop goes on
                        continue
                    self._retire_loop(name)  # the new version declares other preprocessing
                else:
                    continue
            if now < watch.retry_at:
                continue
            try:
                self._start_loop(name, slot)
            except Exception as exc:  # a source that does not open, frames that do not fit
                self._set_health(name, "failed", f"loop cannot start: {type(exc).__name__}: {exc}")
                watch.retry_at = now + LOOP_RETRY_S
                watch.version = slot.version

    def _check_postprocess(self) -> None:
        """The configured postprocessor must build: a plugin that is not installed or refuses
        its options, or labels that do not fit a serving model's output, is a configuration
        error at start (exit 78), not a loop that fails frame after frame."""
        if self._sinks is None:
            return
        self._sinks.check()
        for name in self.served.names():
            slot = self.served.get(name).slot
            if slot.current is not None:
                try:
                    self._sinks.check(slot.outputs)
                except ConfigError as exc:
                    raise ConfigError(f"model {name}: {exc}") from exc

    def _serving_version(self, name: str) -> str | None:
        """The version ``name`` serves now (None: not served), for the result sinks."""
        if name not in self.served.names():
            return None
        return self.served.get(name).slot.version or None

    def _declared(self, name: str, version: str) -> Preprocessing | None:
        """The preprocessing ``version``'s manifest declares (None: none, or no manifest)."""
        try:
            return self.store.manifest(name, version).preprocessing
        except (AgentError, OSError):
            return None

    def _preprocessing(
        self, name: str, slot: ModelSlot, source: FrameSource
    ) -> Preprocessing | None:
        """The serving version's declared preprocessing (its manifest); a frame source feeding
        a model that declares none gets the default from its input and a warning, once per
        version: a camera-fed detector then sees plain ``x/255`` stretched to its input."""
        declared = self._declared(name, slot.version)
        self._watch[name].preprocessing = declared
        if declared is None and source.yields == "frames":
            key = (name, slot.version)
            if key not in self._warned_preprocessing:
                self._warned_preprocessing.add(key)
                log.warning(
                    "loop_without_preprocessing",
                    model=name,
                    version=slot.version,
                    source=self.settings.loop.source.kind,
                    using="resize to the input, scale 1/255, RGB",
                    hint="declare it with: edgectl models push ... --preprocess resize=HxW,...",
                )
        return declared

    def _start_loop(self, name: str, slot: ModelSlot) -> None:
        counting = _CountingModel(slot)
        source = self._source(slot)
        loop = InferenceLoop(
            counting,
            source,
            preprocessing=self._preprocessing(name, slot, source),
            sink=self._sinks.for_loop(name, slot.outputs) if self._sinks is not None else None,
            name=name,
            rate_hz=self.settings.loop.rate_hz,
            drop_policy=self.settings.loop.drop_policy,
            window_s=self.settings.loop.window_s,
        )
        watch = self._watch[name]
        watch.version = slot.version
        self._progress[name] = 0  # no inference has returned yet
        loop.start()
        self._loops[name] = (loop, counting)
        if watch.status is None or watch.status.health != "failed":
            self._set_health(name, "running", None)  # a failed one stays so until frames pass
        log.info("loop_attached", model=name, version=slot.version)

    def _retire_loop(self, name: str) -> None:
        loop, counting = self._loops.pop(name)
        loop.stop()
        self._watch[name].done.append((loop, counting))

    def _set_health(self, name: str, health: LoopHealth, why: str | None) -> None:
        """Record a loop's health; on a change, say so everywhere at once."""
        status = LoopStatus(health, why)
        watch = self._watch[name]
        with self._watch_lock:
            before = watch.status
            if before == status:
                return
            watch.status = status
        slot = self.served.get(name).slot if name in self.served.names() else None
        version = slot.version or None if slot is not None else None
        if slot is not None:
            slot.problem = why if health == "failed" else None
        if health == "failed":
            log.error("loop_failed", model=name, version=version, reason=why)
            if before is None or before.health != "failed":
                self.bus.emit("loop_failed", model=name, version=version, reason=why)
        elif health == "not_installed":
            log.warning("loop_not_running", model=name, reason=why)
        elif before is not None and before.health == "failed":
            log.info("loop_recovered", model=name, version=version)
            self.bus.emit("loop_recovered", model=name, version=version)
        self._notifier.status(self.status_line())
        if self.update_client is not None:
            self.update_client.notify_changed()

    def loop_health(self) -> dict[str, LoopStatus]:
        """Each configured model's loop health (for the reported state)."""
        with self._watch_lock:
            return {n: w.status for n, w in self._watch.items() if w.status is not None}

    def _source(self, slot: ModelSlot) -> FrameSource:
        return build_source(self.settings.loop.source, slot.inputs, repeat=True, dynamic_size=1)

    def healthy(self) -> bool:
        """For the watchdog: no loop is failed, and every loop finished an inference since the
        last check (a paused loop counts as healthy). A hung runtime call leaves its loop
        "running" but makes no progress, a dead loop stays failed: the pings stop and systemd
        restarts the agent."""
        ok = not any(status.health == "failed" for status in self.loop_health().values())
        for name, (loop, counting) in list(self._loops.items()):
            attempts = counting.attempts
            if loop.state == "paused":
                pass
            elif loop.state != "running" or attempts == self._progress.get(name):
                ok = False
            self._progress[name] = attempts
        return ok

    def status_line(self) -> str:
        """``STATUS=`` for systemd: what each slot serves."""
        parts = []
        for name in self.served.names():
            slot = self.served.get(name).slot
            current = slot.current
            if current is None:
                parts.append(f"{name}: not loaded")
            else:
                parts.append(f"{name} {current.version} on {current.backend}")
        text = "serving " + ", ".join(parts) if parts else "serving no model yet"
        problems = [
            f"{name}: {status.error}"
            for name, status in sorted(self.loop_health().items())
            if status.health != "running" and status.error
        ]
        enrollment = self._enrollment_problem()
        if enrollment is not None:
            problems.insert(0, f"not enrolled: {enrollment}")
        return text + ("; " + "; ".join(problems) if problems else "")

    def _on_event(self, event: UpdateEvent) -> None:
        if event.step in ("swapped", "committed", "rolled_back", "activated"):
            self._notifier.status(self.status_line())
            if self.telemetry is not None:
                self.telemetry.refresh_state()  # the retained birth names the new version

    # --- stop --------------------------------------------------------------------------------

    def wait(self, stop: threading.Event) -> None:
        stop.wait()

    def stop(self) -> dict[str, Any]:
        """Stop everything; returns what each loop did (counts by version, failed, dropped)."""
        self._notifier.stopping()
        self._stop.set()
        if self.update_client is not None:
            self.update_client.check_now()  # wake it so it sees the stop
        summary: dict[str, Any] = {"device_id": self.settings.device_id, "loops": {}}
        for name, watch in self._watch.items():
            ran = [*watch.done, *([self._loops[name]] if name in self._loops else [])]
            if not ran:
                continue
            totals: dict[str, Any] = {"count": 0, "failed": 0, "dropped": 0, "by_version": {}}
            for loop, counting in ran:
                loop.stop()
                with contextlib.suppress(Exception):  # a crashed loop was reported already
                    loop.join(timeout=10)
                stats = loop.latest
                totals["count"] += stats.total_count if stats else 0
                totals["failed"] += stats.total_failed if stats else 0
                totals["dropped"] += stats.total_dropped if stats else 0
                for version, n in counting.by_version.items():
                    totals["by_version"][version] = totals["by_version"].get(version, 0) + n
            summary["loops"][name] = totals
        for thread in self._threads:
            thread.join(timeout=30)
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._api is not None:
            self._api.stop()
        if self.telemetry is not None:
            self.telemetry.stop()
        if self.update_client is not None:
            summary["control_plane_device_id"] = (
                self.update_client.credential.device_id if self.update_client.credential else None
            )
            self.update_client.close()
        self.shadows.close()
        if self._sinks is not None:
            self._sinks.close()
        self.served.close()
        self._notifier.close()
        log.info("daemon_stopped")
        return summary


def _check_state_dir(path: Path) -> None:
    """The state directory must exist (or be creatable) and be writable: say so at once."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"state directory {path} is not usable: {exc.strerror or exc}") from exc


def _check_loop_config(settings: AgentSettings) -> None:
    """A loop source the daemon can never run is a configuration error (exit 78): the callback
    kind, or a kind this build cannot use (OpenCV without GStreamer, no FFmpeg backend). A
    source that exists but fails (no camera plugged in yet, a stream down) is reported while
    running."""
    source = settings.loop.source
    if not settings.models or source.kind == "synthetic":
        return
    if source.kind == "callback":
        raise ConfigError("loop.source kind 'callback' cannot run in the daemon")
    require_source_kind(source.kind, device=False)


def _profile_reader(settings: AgentSettings) -> Callable[[], HardwareProfile]:
    """The device's profile, detected once (board files under ``hardware.root``, this machine's
    runtimes), with the configured pins: what the control plane and the slots both decide on."""
    cached: list[HardwareProfile] = []
    lock = threading.Lock()

    def read() -> HardwareProfile:
        with lock:
            if not cached:
                from agent.hardware import detect_profile, detect_runtimes

                root = settings.hardware.root
                live = root.resolve() == Path("/").resolve()
                profile = detect_profile(root, runtimes=None if live else detect_runtimes())
                cached.append(profile.model_copy(update={"pins": settings.backends.pins()}))
            return cached[0]

    return read

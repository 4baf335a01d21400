"""The agent daemon's composition root: settings in, a running device out.

Builds, in order: the model store (start-up recovery first), one slot and update driver per model
(``ServedModels``, booted from the store's pointers and the update journal), the local inference
API (``agent.api.server.start_api``) when enabled, the update client (``agent.updates.client``)
in its own thread when a control plane is configured, and an inference loop per configured model
once that model serves. Then it tells systemd it is ready and pings the watchdog while the loops
make progress. ``stop()`` reverses it and returns a summary of what the loops did.

Each part owns its behaviour; this module only wires them and owns their lifetimes.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import AgentSettings
from agent.contracts.events import UpdateEvent
from agent.contracts.profile import HardwareProfile
from agent.contracts.telemetry import ModelTelemetry, SlotIdentity
from agent.contracts.tensors import TensorSpec
from agent.errors import AgentError, ConfigError
from agent.events import EventBus
from agent.logs import get_logger
from agent.loop import (
    FrameSource,
    ImageFolderSource,
    InferenceLoop,
    SyntheticSource,
    VideoSource,
)
from agent.models.activation import ModelActivator
from agent.models.probation import Limits, UpdateJournal
from agent.models.slots import ModelSlot, SlotRegistry, load_options_from
from agent.models.store import ModelStore
from agent.systemd import Notifier, WatchdogPinger, watchdog_interval_s

__all__ = ["Daemon", "ServedModels"]

log = get_logger(__name__)

Array = np.ndarray[Any, Any]


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
        self.by_version: collections.Counter[str] = collections.Counter()
        self.attempts = 0  # inferences that returned, successfully or not: the loop's progress

    def infer(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        try:
            computed, outputs = self.slot.infer_versioned(feeds)
        finally:
            self.attempts += 1
        self.by_version[computed.version] += 1
        return outputs


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
        self.bus = EventBus(settings.device_id)
        self.store = ModelStore(
            settings.state_dir, keep_versions=settings.swap.keep_versions, bus=self.bus
        )
        self._profile = profile or _profile_reader(settings)
        self.served = ServedModels(settings, self.store, self.bus, profile=self._profile)
        self._notifier = notifier or Notifier()
        self._supervise_s = supervise_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loops: dict[str, tuple[InferenceLoop, _CountingModel]] = {}
        self._api: Any = None
        self._watchdog: WatchdogPinger | None = None
        self._progress: dict[str, int] = {}
        self._reported_windows: dict[str, object] = {}
        self.update_client: Any = None
        self.telemetry: Any = None

    def start(self) -> None:
        settings = self.settings
        _check_state_dir(settings.state_dir)
        report = self.store.recover()
        for action in report.actions:
            log.warning("store_recovered", action=action)
        self.served.boot()
        if settings.api.enabled:
            from agent.api.server import start_api

            self._api = start_api(self.served.registry, settings.api)
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
        self._start_loops()
        supervisor = threading.Thread(target=self._supervise, name="daemon-supervisor", daemon=True)
        supervisor.start()
        self._threads.append(supervisor)
        self._notifier.ready(self.status_line())
        self.bus.subscribe(self._on_event)
        interval = watchdog_interval_s()
        if interval is not None:
            self._watchdog = WatchdogPinger(self._notifier, interval, self.healthy).start()
        log.info("daemon_started", models=list(self.served.names()))

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
        )
        client.on_command("check-update", lambda _cmd: self.check_now())
        client.on_command("rollback", self._rollback_command)
        self.bus.subscribe(client.publish_event)
        client.start()
        self.telemetry = client

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
        try:
            self.served.get(model).rollback("requested by the control plane")
        except AgentError as exc:
            log.error("rollback_command_failed", model=model, reason=str(exc))

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
                )
            )
        return out

    def check_now(self) -> None:
        """Ask the update client to poll now (the MQTT ``check-update`` command)."""
        if self.update_client is not None:
            self.update_client.check_now()

    # --- loops -------------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stop.wait(self._supervise_s):
            self._start_loops()

    def _start_loops(self) -> None:
        for model in self.settings.models:
            if model.name in self._loops or model.name not in self.served.names():
                continue
            slot = self.served.get(model.name).slot
            if not slot.ready:
                continue
            counting = _CountingModel(slot)
            loop = InferenceLoop(
                counting,
                self._source(slot),
                name=model.name,
                rate_hz=self.settings.loop.rate_hz,
                drop_policy=self.settings.loop.drop_policy,
                window_s=self.settings.loop.window_s,
            )
            self._progress[model.name] = 0  # no inference has returned yet
            loop.start()
            self._loops[model.name] = (loop, counting)
            log.info("loop_attached", model=model.name, version=slot.version)

    def _source(self, slot: ModelSlot) -> FrameSource:
        config = self.settings.loop
        if config.source == "synthetic":
            return SyntheticSource(slot.inputs, dynamic_size=1)
        if config.source == "camera":
            return VideoSource(config.camera_index)
        if config.source_path is None or config.source == "callback":
            raise ConfigError(f"loop.source = {config.source!r} cannot run in the daemon")
        if config.source == "images":
            return ImageFolderSource(config.source_path, repeat=True)
        return VideoSource(config.source_path, repeat=True)

    def healthy(self) -> bool:
        """For the watchdog: every loop finished an inference since the last check (a paused
        loop counts as healthy). A hung runtime call leaves its loop "running" but makes no
        progress: the pings stop and systemd restarts the agent."""
        ok = True
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
        return "serving " + ", ".join(parts) if parts else "serving no model yet"

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
        for name, (loop, counting) in self._loops.items():
            loop.stop()
            stats = loop.join(timeout=10)
            summary["loops"][name] = {
                "count": stats.total_count if stats else 0,
                "failed": stats.total_failed if stats else 0,
                "dropped": stats.total_dropped if stats else 0,
                "by_version": dict(counting.by_version),
            }
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

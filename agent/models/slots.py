"""Model slots: one per served model name, serving one version at a time, and the hot swap.

A ``ModelSlot`` holds the version that serves (a ``LoadedVersion``: a runtime session plus
in-flight count and live health) and swaps in another from the store:

- **availability-preserving** (both in memory): the new version loads beside the old one with
  its runtime threads capped (``SwapConfig.loader_threads``) so the hot path keeps its cores,
  warms up, runs the bundle's golden cases within the variant's tolerance and has its latency
  measured, all on a loader thread with a raised nice value (``loader_nice``); then a single
  reference assignment under the slot lock switches. Requests already running finish on the old
  session, which is closed when the last one leaves. Unless both the hot path
  (``BackendConfig.intra_op_threads``) and the loader run single-threaded, the vetted session is
  reloaded with the hot path's thread count and warmed before the switch ("promote"): runtimes
  fix their thread pools at load time, and pool threads inherit the loader's priority. A
  CUDA-graph session (every node on the device, run by its own runner thread) is not promoted.
  With ``quiet_swap`` (default) the loader's work is timed to the hot loop: the load and each
  warm-up, validation or timing run start just after a serving request ends (waiting at most
  ``gap_wait_s``; at once when the slot is idle), so they fall between frames instead of on top
  of one, loads are background loads (``LoadOptions.background_load``: OpenVINO compiles in a
  child process and only imports here), and retired or replaced sessions are closed on the
  loader thread in a gap, not inside the request that happened to leave them last.
- **resource-preserving** (unload, then load): announced with a ``paused`` event; requests that
  arrive meanwhile wait (up to ``pause_timeout_s``) instead of failing. If the new version does
  not come up, the old one is loaded again.

``auto`` picks availability when free memory (``psutil``) covers about twice the variant's files
plus a reserve. Variant choice is a simple rule (accepted, runtime usable here, pins from
``BackendConfig``), with a ``chooser`` hook where the measured chooser (``agent.backends.choice``)
plugs in. ``SlotRegistry`` is the ``agent.models.serving.ModelRepository`` the API and the loop use.

It leaves files and the active pointer to ``agent.models.store`` and the decision to keep or roll
back a version to ``agent.models.probation`` / ``agent.models.activation``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydantic

from agent._fs import write_file_atomic
from agent.backends import Artifact, LoadOptions, Session, load_first
from agent.backends.choice import Candidate, Choice, choose, golden_from_manifest
from agent.backends.quiet import GATE
from agent.config import BackendConfig, SwapConfig
from agent.contracts.events import EventStep
from agent.contracts.fit import fitting
from agent.contracts.manifest import BundleManifest, Variant
from agent.contracts.profile import HardwareProfile
from agent.contracts.tensors import TensorSpec
from agent.errors import (
    AgentError,
    BackendError,
    InferenceError,
    ModelError,
    ModelLoadError,
    ShadowRefusedError,
    ValidationError,
)
from agent.events import EventBus
from agent.logs import get_logger
from agent.models.bundle import GoldenSet, golden_sets, synthetic_feeds, validate_outputs
from agent.models.loaded import LoadedVersion, return_freed_memory
from agent.models.probation import Health, judged_p99, p99
from agent.models.serving import Computed
from agent.models.store import ModelStore

__all__ = [
    "LoadedVersion",
    "ModelSlot",
    "Plan",
    "ServingRecord",
    "SlotRegistry",
    "SwapReport",
    "describe_choice",
    "load_options_from",
    "read_serving_record",
    "serving_record_path",
]

log = get_logger(__name__)

Array = np.ndarray[Any, Any]
Feeds = Mapping[str, Array]
Policy = Literal["availability", "resources"]

_MEMORY_RESERVE = 64 * 1024 * 1024  # bytes kept free beyond the estimate
_CHOICE_MAX = 1000  # characters of a choice's description (a reported, bounded field)


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


@functools.cache
def _detected_profile() -> HardwareProfile:
    from agent.hardware import detect_profile

    return detect_profile()


def _live_profile() -> HardwareProfile:
    """This machine's profile, detected once per process (runtimes are probed)."""
    return _detected_profile()


def variant_artifact(model: str, variant: Variant, bundle_dir: Path) -> Artifact:
    """What a runtime loads for ``variant`` of an installed bundle, as the agent serves it (the
    entrypoint's digest for cache keys; the reduced float types its gate accepted)."""
    return Artifact(
        bundle_dir / variant.entrypoint,
        format=variant.format,
        precision=variant.precision,
        name=model,
        digest=variant.file(variant.entrypoint).sha256,
        reduced_compute=variant.reduced_compute,
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """The variants of a version to try, in order, and why the first one."""

    order: list[Variant]
    reason: str
    left_out: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def fallback_reason(self, failures: Sequence[str]) -> str:
        text = f"fallback after {'; '.join(failures)} (first choice: {self.reason})"
        return text[:_CHOICE_MAX]


def describe_choice(choice: Choice) -> str:
    """One line for reports: the chosen variant, why, and every candidate's measured p50."""
    parts = []
    for m in choice.measurements:
        label = m.candidate.split(":", 2)[2]
        if m.status == "measured" and m.p50_ms is not None:
            parts.append(f"{label} {m.p50_ms:.3g} ms")
        else:
            parts.append(f"{label} {m.status}")
    text = f"measured: {choice.reason}; " + ", ".join(parts)
    return text[:_CHOICE_MAX]


class ServingRecord(pydantic.BaseModel):
    """What serves a model and why, as the daemon last wrote it."""

    model_config = pydantic.ConfigDict(frozen=True, extra="ignore")

    model: str
    version: str
    variant_id: str
    backend: str
    device: str
    choice: str
    compute: str = ""  # the float type it computes in, where the runtime says (records of 1.x: "")

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


def serving_record_path(choice_dir: Path, model: str) -> Path:
    return choice_dir / f"serving-{model}.json"


def read_serving_record(choice_dir: Path, model: str) -> ServingRecord | None:
    """The record ``ModelSlot`` wrote after its last swap, or ``None`` (never swapped, or
    unreadable: it is only a report)."""
    try:
        return ServingRecord.model_validate_json(
            serving_record_path(choice_dir, model).read_bytes()
        )
    except (OSError, pydantic.ValidationError):
        return None


def load_options_from(config: BackendConfig, cache_dir: Path | None = None) -> LoadOptions:
    """The hot path's load options from the backend section of the configuration."""
    return LoadOptions(
        intra_op_threads=config.intra_op_threads,
        cache_dir=cache_dir,
        openvino_hint=config.openvino_hint,
        openvino_device=config.openvino_device,
        openvino_reduced_float=config.openvino_reduced_float,
        ort_provider_options=config.ort_provider_options,
        ort_disable_providers=config.ort_disable_providers,
        spin_wait=config.spin_wait,
        ort_process=config.ort_process,
        ort_spare_worker=config.ort_spare_worker,
        ort_release_delay_s=config.ort_release_delay_s,
    )


@dataclasses.dataclass(frozen=True)
class SwapReport:
    """How one swap went; times in seconds."""

    model: str
    version: str
    from_version: str | None
    variant_id: str
    choice: str  # why this variant serves
    backend: str
    device: str
    policy: Policy
    load_s: float
    warmup_s: float
    validation_s: float
    promote_s: float  # reload with the hot path's thread count (0 when not needed)
    switch_s: float  # time holding the slot lock for the switch
    pause_s: float  # resource-preserving: how long requests waited
    latency_p50_s: float
    latency_p99_s: float

    @property
    def disk_to_serving_s(self) -> float:
        return self.load_s + self.warmup_s + self.validation_s + self.promote_s + self.switch_s


@dataclasses.dataclass
class _Prepared:
    session: Session
    variant: Variant
    bundle_dir: Path
    load_s: float = 0.0
    warmup_s: float = 0.0
    validation_s: float = 0.0
    p50_s: float = 0.0
    p99_s: float = 0.0


class ModelSlot:
    """The served versions of one model name; an ``agent.models.serving.ServedModel`` that always
    routes to the version currently serving."""

    def __init__(
        self,
        name: str,
        store: ModelStore,
        *,
        swap_config: SwapConfig | None = None,
        backend_config: BackendConfig | None = None,
        load_options: LoadOptions | None = None,
        bus: EventBus | None = None,
        profile: Callable[[], HardwareProfile] | None = None,
        state_dir: Path | None = None,
        available_memory: Callable[[], int] = _available_memory,
        clock: Callable[[], float] = time.perf_counter,
        pause_timeout_s: float = 30.0,
        latency_runs: int = 10,
        loader_nice: int = 10,
        quiet_swap: bool = True,
        gap_wait_s: float = 0.25,
        background_loads: bool = True,
    ) -> None:
        self.name = name
        self.store = store
        self.swap_config = swap_config or SwapConfig()
        self.backend_config = backend_config or BackendConfig()
        self.load_options = load_options or load_options_from(self.backend_config)
        self._bus = bus
        self._profile = profile or _live_profile
        # Measured decisions are cached as ``<state_dir>/choices/<key>.json`` (where
        # ``edge-agent bench`` writes them too), with what serves beside them.
        self.choice_dir = state_dir / "choices" if state_dir is not None else None
        self._state_dir = state_dir
        self._available_memory = available_memory
        self._clock = clock
        self._pause_timeout_s = pause_timeout_s
        self._latency_runs = latency_runs
        self._loader_nice = loader_nice
        self._quiet_swap = quiet_swap
        # Quiet swaps load in the background (``LoadOptions.background_load``) unless told not
        # to (the bench compares both).
        self._background = quiet_swap and background_loads
        self._gap_wait_s = gap_wait_s
        # Between-frames scheduling of the loader's runs: requests that end bump the sequence
        # (only while a candidate is being prepared beside the serving version).
        self._gap_cond = threading.Condition(threading.Lock())
        self._gap_seq = 0
        self._gap_watch = False
        self._gap_watchers = 0  # closes of retired versions waiting for a gap (under _gap_cond)
        self._last_request_end = float("-inf")
        self._cond = threading.Condition(threading.Lock())
        self._current: LoadedVersion | None = None
        self._retired: list[LoadedVersion] = []
        self._swap_lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # ServedModel attributes of the version serving now.
        self.version = ""
        self.variant_id = ""
        self.backend = ""
        self.device = ""
        self.compute = ""
        self.choice = ""
        self.max_batch_size = 0
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        # Called after every successful inference with (feeds, outputs, seconds): a shadow
        # version's evaluator samples from here (``agent.shadow``); it must not block.
        self.observer: Callable[[Feeds, Mapping[str, Array], float], None] | None = None
        # Why this model is not healthy although a version serves (its inference loop failed):
        # set by the daemon; readiness (``/v2/health/ready``) says no while it is set.
        self.problem: str | None = None

    # --- serving -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._current is not None and self.problem is None

    @property
    def current(self) -> LoadedVersion | None:
        return self._current

    def infer(self, feeds: Feeds) -> dict[str, Array]:
        return self.infer_versioned(feeds)[1]

    def infer_versioned(self, feeds: Feeds) -> tuple[Computed, dict[str, Array]]:
        """Run on the version serving now and say which one ran. During a
        resource-preserving swap this waits for the new version instead of failing."""
        with self._cond:
            if self._current is None:
                self._cond.wait_for(lambda: self._current is not None, self._pause_timeout_s)
            current = self._current
            if current is None:
                raise InferenceError(f"{self.name}: no version is serving")
            entered = current._enter()  # under the slot lock: a switch cannot slip between
        assert entered, "the serving version is never closed"
        observer = self.observer
        try:
            start = self._clock() if observer is not None else 0.0
            with GATE.serving():  # a background compile's child stands still meanwhile
                outputs = current._run(feeds)
            if observer is not None:
                try:
                    observer(feeds, outputs, self._clock() - start)
                except Exception as exc:  # an observer never fails the request it watched
                    log.warning("slot_observer_failed", model=self.name, reason=str(exc))
            return current.computed, outputs
        finally:
            current._exit()
            self._last_request_end = self._clock()
            if self._gap_watch or self._gap_watchers:
                with self._gap_cond:
                    self._gap_seq += 1
                    self._gap_cond.notify_all()

    def _await_gap(self, *, watch: bool = False) -> None:
        """Wait (at most ``gap_wait_s``) until a serving request has just ended, so that the
        loader's next piece of work (load, one warm-up or validation run, the close of a
        retired version) falls between the hot loop's frames instead of on top of one. Returns
        at once when the slot is idle. ``watch``: ask for gap signals for this wait alone (a
        close runs after the swap that retired its version has finished watching)."""
        current = self._current
        if not (self._gap_watch or watch) or current is None:
            return
        with self._gap_cond:
            idle = current._inflight == 0 and (
                self._clock() - self._last_request_end >= self._gap_wait_s
            )
            if idle:
                return
            seen = self._gap_seq
            self._gap_watchers += 1
            try:
                self._gap_cond.wait_for(lambda: self._gap_seq != seen, self._gap_wait_s)
            finally:
                self._gap_watchers -= 1

    def loaded_versions(self) -> list[str]:
        with self._cond:
            self._retired = [v for v in self._retired if not v.closed]
            found = [v.version for v in self._retired]
            if self._current is not None:
                found.append(self._current.version)
        return list(dict.fromkeys(found))

    def loaded(self, version: str) -> LoadedVersion:
        with self._cond:
            for v in [self._current, *self._retired]:
                if v is not None and v.version == version and not v.closed:
                    return v
        raise ModelError(f"version {version} is not loaded", model=self.name)

    def health(self) -> Health:
        current = self._current
        return current.health() if current else Health(0, 0, None)

    def baseline_p99(self, min_samples: int = 20) -> float | None:
        """The serving version's live p99 as probation judges it (``judged_p99``), or its
        measured p99 when traffic was light."""
        current = self._current
        if current is None:
            return None
        samples = current.latencies()
        return judged_p99(samples) if len(samples) >= min_samples else current.measured_p99_s

    # --- variant choice ----------------------------------------------------------------------

    def profile(self) -> HardwareProfile:
        """The device's profile with this slot's pins (``backends.pin_*``)."""
        return self._profile().model_copy(update={"pins": self.backend_config.pins()})

    def plan(self, manifest: BundleManifest, bundle_dir: Path, *, beside: bool = False) -> Plan:
        """The variants to try, in order, and why the first: every variant that fits this device
        (``agent.contracts.fit``, the control plane's own rule); with several, the fastest one
        within tolerance by measurement first (``agent.backends.choice``, cached on disk),
        the others in the contract's rank order as fallbacks. ``beside``: a version serves
        now, so measuring runs on the loader thread with its capped runtime threads."""
        fit = fitting(manifest.variants, self.profile())
        if not fit.ranked:
            raise ModelLoadError(
                f"{manifest.version}: no variant fits this device ({fit.reasons()})",
                model=self.name,
            )
        ranked = list(fit.ranked)
        if len(ranked) == 1:
            return Plan(ranked, "the only variant that fits this device", fit.left_out)
        if not self.backend_config.measure or not manifest.golden:
            why = "measuring is off" if manifest.golden else "the bundle has no golden inputs"
            return Plan(ranked, f"first by the variant contract's rank ({why})", fit.left_out)
        contenders = ranked[: self.backend_config.max_candidates]
        try:
            if beside:
                choice = self._loader().submit(self._measure, manifest, contenders, bundle_dir)
                decided = choice.result()
            else:
                decided = self._measure(manifest, contenders, bundle_dir)
        except AgentError as exc:
            log.warning("variant_choice_failed", model=self.name, reason=str(exc))
            return Plan(ranked, f"first by rank: measuring failed ({exc})", fit.left_out)
        chosen_id = decided.chosen.split(":", 2)[2]
        first = next(v for v in ranked if v.id == chosen_id)
        order = [first, *(v for v in ranked if v is not first)]
        return Plan(order, describe_choice(decided), fit.left_out)

    def _measure(
        self, manifest: BundleManifest, variants: Sequence[Variant], bundle_dir: Path
    ) -> Choice:
        candidates = [
            Candidate(
                v.runtime,
                variant_artifact(self.name, v, bundle_dir),
                v.tolerance,
                v.target,
                label=v.id,
            )
            for v in variants
        ]
        inputs, refs = golden_from_manifest(manifest, bundle_dir)
        options = self.load_options
        if self._current is not None:
            options = dataclasses.replace(options, intra_op_threads=self.swap_config.loader_threads)
        return choose(
            candidates,
            self.profile(),
            inputs,
            config=self.backend_config,
            state_dir=self._state_dir,
            reference_outputs=refs,
            options=options,
            model=self.name,
        )

    # --- a shadow beside the serving version -------------------------------------------------

    def load_shadow(self, version: str) -> tuple[LoadedVersion, BundleManifest]:
        """Load an installed ``version`` beside the serving one, to run as a shadow: the
        variant this device would serve, prepared like a swap's candidate (loader thread,
        capped runtime threads, warm-up and golden validation between frames) but never made
        to serve. ``ShadowRefusedError`` when memory cannot hold it beside the serving version
        (the swap policy's estimate), ``ModelError`` when it does not load or validate."""
        if self._current is None:
            raise ShadowRefusedError(f"{version}: nothing serves to shadow", model=self.name)
        manifest = self.store.verify(self.name, version, deep=False)
        bundle_dir = self.store.path(self.name, version)
        plan = self.plan(manifest, bundle_dir, beside=True)
        variant = plan.order[0]
        if self._policy(variant) == "resources":
            need = 2 * sum(f.size for f in variant.files) + _MEMORY_RESERVE
            raise ShadowRefusedError(
                f"{version}: memory is tight (available {self._available_memory()} bytes, "
                f"{need} needed beside the serving version)",
                model=self.name,
            )
        capped = dataclasses.replace(
            self.load_options, intra_op_threads=self.swap_config.loader_threads
        )
        golden = golden_sets(bundle_dir, manifest)
        self._gap_watch = self._quiet_swap
        try:
            prepared = (
                self._loader().submit(self._prepare, version, variant, bundle_dir, golden, capped)
            ).result()
        finally:
            self._gap_watch = False
        return self._wrap(version, prepared, choice=f"shadow: {plan.reason}"), manifest

    # --- start and swap ----------------------------------------------------------------------

    def start(self, version: str) -> SwapReport:
        """Load ``version`` when nothing serves yet (boot), with the hot path's options."""
        return self.swap(version)

    def swap_in_background(
        self, version: str, *, validate: bool = True, policy: Policy | None = None
    ) -> concurrent.futures.Future[SwapReport]:
        """``swap`` on a thread of its own; the future holds the report or the error."""
        thread_result: concurrent.futures.Future[SwapReport] = concurrent.futures.Future()

        def run() -> None:
            try:
                thread_result.set_result(self.swap(version, validate=validate, policy=policy))
            except BaseException as exc:
                thread_result.set_exception(exc)

        threading.Thread(target=run, name=f"swap-{self.name}", daemon=True).start()
        return thread_result

    def _loader(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that loads, warms and validates candidates at a lower CPU priority."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"loader-{self.name}",
                initializer=_lower_thread_priority,
                initargs=(self._loader_nice,),
            )
        return self._executor

    def settle(self, timeout_s: float | None = None) -> bool:
        """Wait until the loader thread has done the work queued so far: with quiet swaps, the
        release of a retired version comes after ``swap`` returns. Whether it was done within
        ``timeout_s`` (each release step waits for a frame gap, at most ``gap_wait_s``)."""
        executor = self._executor
        if executor is None:
            return True
        try:
            executor.submit(lambda: None).result(timeout_s)
        except concurrent.futures.TimeoutError:
            return False
        except RuntimeError:  # shut down: nothing is left to do
            return True
        return True

    def swap(
        self, version: str, *, validate: bool = True, policy: Policy | None = None
    ) -> SwapReport:
        """Make ``version`` serve. Raises ``ModelError`` (load, validation), ``BundleError``
        or ``StoreError``; on any failure the version serving before keeps serving."""
        with self._swap_lock:
            try:
                return self._swap_locked(version, validate=validate, policy=policy)
            finally:
                self._return_memory()

    def _swap_locked(self, version: str, *, validate: bool, policy: Policy | None) -> SwapReport:
        from_version = self._current.version if self._current else None
        try:
            manifest = self.store.verify(self.name, version, deep=False)
            bundle_dir = self.store.path(self.name, version)
            plan = self.plan(manifest, bundle_dir, beside=self._current is not None)
            golden = golden_sets(bundle_dir, manifest) if validate else []
            report = self._swap_first_that_serves(version, plan, bundle_dir, golden, policy)
            report = dataclasses.replace(report, from_version=from_version)
        except AgentError as exc:
            log.warning("slot_swap_failed", model=self.name, version=version, reason=str(exc))
            self._emit("failed", version=version, from_version=from_version, reason=str(exc))
            raise
        self._emit(
            "swapped",
            version=version,
            from_version=from_version,
            variant_id=report.variant_id,
            choice=report.choice,
            policy=report.policy,
            backend=report.backend,
            load_s=report.load_s,
            warmup_s=report.warmup_s,
            validation_s=report.validation_s,
            promote_s=report.promote_s,
            pause_s=report.pause_s,
        )
        log.info(
            "slot_swapped",
            model=self.name,
            version=version,
            from_version=from_version,
            policy=report.policy,
            variant_id=report.variant_id,
            choice=report.choice,
            disk_to_serving_s=round(report.disk_to_serving_s, 4),
        )
        self._record_serving()
        return report

    def _swap_first_that_serves(
        self,
        version: str,
        plan: Plan,
        bundle_dir: Path,
        golden: Sequence[GoldenSet],
        policy: Policy | None,
    ) -> SwapReport:
        """Swap to the plan's first variant; when it fails to load or validate, to the next,
        saying why in the served version's ``choice``. The last failure is raised."""
        failures: list[str] = []
        for index, variant in enumerate(plan.order):
            choice = plan.reason if variant is plan.order[0] else plan.fallback_reason(failures)
            chosen = policy or self._policy(variant)
            try:
                if self._current is None or chosen == "resources":
                    return self._swap_in_place(
                        version, variant, bundle_dir, golden, chosen, choice=choice
                    )
                return self._swap_beside(version, variant, bundle_dir, golden, choice=choice)
            except (ModelLoadError, ValidationError) as exc:
                failures.append(f"{variant.id}: {exc}")
                log.warning(
                    "variant_failed",
                    model=self.name,
                    version=version,
                    variant_id=variant.id,
                    reason=str(exc),
                    fallback=plan.order[index + 1].id if index + 1 < len(plan.order) else None,
                )
                if index + 1 == len(plan.order):
                    if len(failures) == 1:
                        raise
                    raise ModelLoadError(
                        f"{version}: no variant could serve ({'; '.join(failures)})",
                        model=self.name,
                    ) from exc
        raise ModelLoadError(f"{version}: no variant to try", model=self.name)

    def _record_serving(self) -> None:
        """What serves and why, under ``choice_dir`` for ``edge-agent models list`` (a process
        of its own that cannot ask the daemon). Best effort: the swap has happened."""
        current = self._current
        if self.choice_dir is None or current is None:
            return
        record = ServingRecord(
            model=self.name,
            version=current.version,
            variant_id=current.variant_id,
            backend=current.backend,
            device=current.device,
            choice=current.choice,
            compute=current.compute,
        )
        try:
            self.choice_dir.mkdir(parents=True, exist_ok=True)
            write_file_atomic(serving_record_path(self.choice_dir, self.name), record.to_json())
        except OSError as exc:
            log.warning("serving_record_unwritten", model=self.name, reason=str(exc))

    def _policy(self, variant: Variant) -> Policy:
        configured = self.swap_config.policy
        if configured != "auto":
            return configured
        need = 2 * sum(f.size for f in variant.files) + _MEMORY_RESERVE
        available = self._available_memory()
        if available >= need:
            return "availability"
        log.warning("slot_memory_tight", model=self.name, available=available, needed=need)
        return "resources"

    def _swap_beside(
        self,
        version: str,
        variant: Variant,
        bundle_dir: Path,
        golden: Sequence[GoldenSet],
        *,
        choice: str = "",
    ) -> SwapReport:
        capped = dataclasses.replace(
            self.load_options,
            intra_op_threads=self.swap_config.loader_threads,
            background_load=self._background,
            between_frames=self._await_gap if self._background else None,
        )
        self._gap_watch = self._quiet_swap
        try:
            return self._swap_beside_watched(
                version, variant, bundle_dir, golden, capped, choice=choice
            )
        finally:
            self._gap_watch = False

    def _swap_beside_watched(
        self,
        version: str,
        variant: Variant,
        bundle_dir: Path,
        golden: Sequence[GoldenSet],
        capped: LoadOptions,
        *,
        choice: str,
    ) -> SwapReport:
        prepared = (
            self._loader().submit(self._prepare, version, variant, bundle_dir, golden, capped)
        ).result()
        promote_s = 0.0
        # The candidate serves as is only when it has no runtime thread pool of its own: pool
        # threads would have inherited the loader thread's lower priority. A CUDA-graph session
        # runs every node on the device, from a runner thread that takes the process's own
        # priority back, and a session in a worker process takes it back itself: reloading
        # either would only repeat the load, the captures and a release.
        single = self.load_options.intra_op_threads == self.swap_config.loader_threads == 1
        if not (single or getattr(prepared.session, "serves_as_loaded", False) is True):
            start = self._clock()
            options = dataclasses.replace(
                self.load_options,
                background_load=self._background,
                between_frames=self._await_gap if self._background else None,
            )
            try:
                self._await_gap()
                serving = self._load(variant, bundle_dir, options)
                try:
                    self._warm(serving, golden)
                except BaseException:
                    serving.close()
                    raise
            finally:
                # The vetted session's release holds the GIL too (milliseconds on a GPU session).
                self._await_gap()
                prepared.session.close()
            prepared.session = serving
            promote_s = self._clock() - start
        new = self._wrap(version, prepared, choice=choice)
        switch_s = self._switch(new)
        return self._report(
            version,
            prepared=prepared,
            new=new,
            policy="availability",
            promote_s=promote_s,
            switch_s=switch_s,
            pause_s=0.0,
        )

    def _swap_in_place(
        self,
        version: str,
        variant: Variant,
        bundle_dir: Path,
        golden: Sequence[GoldenSet],
        policy: Policy,
        *,
        choice: str = "",
    ) -> SwapReport:
        paused_at = self._clock()
        old = self._unload_current(version)
        try:
            prepared = self._prepare(version, variant, bundle_dir, golden, self.load_options)
        except BaseException:
            if old is not None:
                self._restore(old)
            raise
        new = self._wrap(version, prepared, choice=choice)
        switch_s = self._switch(new)
        pause_s = self._clock() - paused_at if old is not None else 0.0
        return self._report(
            version,
            prepared=prepared,
            new=new,
            policy=policy,
            promote_s=0.0,
            switch_s=switch_s,
            pause_s=pause_s,
        )

    def _unload_current(self, version: str) -> LoadedVersion | None:
        with self._cond:
            old, self._current = self._current, None
        if old is None:
            return None
        self._emit(
            "paused",
            version=old.version,
            reason=f"resource-preserving swap to {version}: requests wait until it serves",
        )
        log.warning("slot_paused", model=self.name, version=old.version, to_version=version)
        old.retire()
        old.wait_closed(self._pause_timeout_s)
        return old

    def _restore(self, old: LoadedVersion) -> None:
        try:
            prepared = self._prepare(
                old.version, old.variant, old.bundle_dir, [], self.load_options
            )
        except AgentError as exc:
            log.error("slot_restore_failed", model=self.name, version=old.version, reason=str(exc))
            with self._cond:
                self._cond.notify_all()
            return
        self._switch(self._wrap(old.version, prepared, choice=old.choice))
        log.info("slot_restored", model=self.name, version=old.version)

    def _prepare(
        self,
        version: str,
        variant: Variant,
        bundle_dir: Path,
        golden: Sequence[GoldenSet],
        options: LoadOptions,
    ) -> _Prepared:
        self._await_gap()
        start = self._clock()
        session = self._load(variant, bundle_dir, options)
        prepared = _Prepared(session, variant, bundle_dir, load_s=self._clock() - start)
        self._emit(
            "loaded",
            version=version,
            variant_id=variant.id,
            backend=session.backend,
            device=session.device,
            load_s=prepared.load_s,
        )
        try:
            start = self._clock()
            self._warm(session, golden)
            prepared.warmup_s = self._clock() - start
            self._emit("warmed", version=version, warmup_s=prepared.warmup_s)
            if golden:
                start = self._clock()
                validate_outputs(
                    _checked_run(session, self.name, before=self._await_gap),
                    golden,
                    variant.tolerance,
                    model=self.name,
                )
                prepared.validation_s = self._clock() - start
                self._emit(
                    "validated",
                    version=version,
                    cases=len(golden),
                    validation_s=prepared.validation_s,
                )
            feeds = golden[0].inputs if golden else synthetic_feeds(session.inputs)
            samples = []
            for _ in range(self._latency_runs):
                self._await_gap()
                start = self._clock()
                session.run(feeds)
                samples.append(self._clock() - start)
            prepared.p50_s = float(np.median(samples)) if samples else 0.0
            prepared.p99_s = p99(samples) or 0.0
        except BaseException as exc:
            session.close()
            if isinstance(exc, InferenceError):
                raise ValidationError(f"{version}: {exc}", model=self.name) from exc
            raise
        return prepared

    def _load(self, variant: Variant, bundle_dir: Path, options: LoadOptions) -> Session:
        try:
            return load_first(
                variant_artifact(self.name, variant, bundle_dir), options, order=(variant.runtime,)
            )
        except BackendError as exc:
            raise ModelLoadError(f"variant {variant.id}: {exc}", model=self.name) from exc

    def _warm(self, session: Session, golden: Sequence[GoldenSet]) -> None:
        feeds_list = [g.inputs for g in golden] or [synthetic_feeds(session.inputs)]
        for i in range(self.swap_config.warmup_runs):
            self._await_gap()
            session.run(feeds_list[i % len(feeds_list)])

    def _wrap(self, version: str, prepared: _Prepared, *, choice: str) -> LoadedVersion:
        return LoadedVersion(
            self.name,
            version,
            prepared.variant,
            prepared.session,
            bundle_dir=prepared.bundle_dir,
            measured_p99_s=prepared.p99_s,
            choice=choice,
            clock=self._clock,
            closer=self._close_off_path,
        )

    def _close_off_path(self, steps: Sequence[Callable[[], None]]) -> bool:
        """Run a retired version's close on the loader thread, not on the request thread that
        happened to leave it last, each step just after a serving request ends: closing takes
        milliseconds with the GIL held (OpenVINO's compiled model; 13-20 ms for ONNX Runtime's
        CUDA session), and handing the memory back holds the allocator's locks, either of which
        would stall a frame in flight."""
        executor = self._executor
        if executor is None or not self._quiet_swap:
            return False

        def between_frames() -> None:
            for step in steps:
                self._await_gap(watch=True)
                step()

        try:
            executor.submit(between_frames)
        except RuntimeError:  # shut down: the caller closes inline
            return False
        return True

    def _return_memory(self) -> None:
        """After a swap, served or failed: hand back to the OS the heap that its loads freed
        (the choice's measured candidates, a vetted session reloaded to serve, a variant that
        failed). glibc keeps that memory in its arenas, so without this a device that measured
        the FP32 variant and serves the INT4 one kept most of the FP32 model's pages. Between
        frames, on the loader thread, like a retired version's close."""
        if not self._close_off_path((return_freed_memory,)):
            return_freed_memory()

    def _switch(self, new: LoadedVersion) -> float:
        start = self._clock()
        with self._cond:
            old, self._current = self._current, new
            self.version, self.variant_id = new.version, new.variant_id
            self.backend, self.device, self.choice = new.backend, new.device, new.choice
            self.compute = new.compute
            self.inputs, self.outputs = new.inputs, new.outputs
            self.max_batch_size = new.max_batch_size
            self._retired = [v for v in self._retired if not v.closed]
            if old is not None:
                self._retired.append(old)
            self._cond.notify_all()
        held = self._clock() - start
        if old is not None:
            old.retire()  # closes now, or when its last request finishes
        return held

    def _report(
        self,
        version: str,
        *,
        prepared: _Prepared,
        new: LoadedVersion,
        policy: Policy,
        promote_s: float,
        switch_s: float,
        pause_s: float,
    ) -> SwapReport:
        return SwapReport(
            model=self.name,
            version=version,
            from_version=None,  # filled in by swap()
            variant_id=prepared.variant.id,
            choice=new.choice,
            backend=new.backend,
            device=new.device,
            policy=policy,
            load_s=prepared.load_s,
            warmup_s=prepared.warmup_s,
            validation_s=prepared.validation_s,
            promote_s=promote_s,
            switch_s=switch_s,
            pause_s=pause_s,
            latency_p50_s=prepared.p50_s,
            latency_p99_s=prepared.p99_s,
        )

    def close(self) -> None:
        """Stop serving and unload (requests in flight finish first)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._cond:
            current, self._current = self._current, None
            retired, self._retired = self._retired, []
            self.version = ""
        for v in [*retired, *([current] if current else [])]:
            v.retire()

    def _emit(self, step: EventStep, *, version: str | None = None, **fields: Any) -> None:
        if self._bus is not None:
            self._bus.emit(step, model=self.name, version=version, **fields)


def _lower_thread_priority(nice: int) -> None:
    """Raise this thread's nice value (Linux: per thread) so the hot path wins the CPU while a
    candidate loads, warms up and validates. Needs no privilege; failure only costs latency."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (OSError, AttributeError) as exc:
        log.warning("loader_priority_unchanged", reason=str(exc))


def _checked_run(
    session: Session, model: str, *, before: Callable[[], None] | None = None
) -> Callable[[Feeds], Mapping[str, Array]]:
    def run(feeds: Feeds) -> Mapping[str, Array]:
        if before is not None:
            before()
        try:
            return session.run(feeds)
        except InferenceError as exc:
            raise ValidationError(f"golden input failed to run: {exc}", model=model) from exc

    return run


class SlotRegistry:
    """The served models by name: the ``agent.models.serving.ModelRepository`` of the agent."""

    def __init__(self, slots: Iterable[ModelSlot] = ()) -> None:
        self._slots: dict[str, ModelSlot] = {s.name: s for s in slots}
        self._lock = threading.Lock()

    def add(self, slot: ModelSlot) -> None:
        with self._lock:
            self._slots[slot.name] = slot

    def slot(self, name: str) -> ModelSlot:
        try:
            return self._slots[name]
        except KeyError as exc:
            raise ModelError("unknown model", model=name) from exc

    def names(self) -> Sequence[str]:
        return sorted(self._slots)

    def versions(self, name: str) -> Sequence[str]:
        return self.slot(name).loaded_versions()

    def get(self, name: str, version: str | None = None) -> ModelSlot | LoadedVersion:
        slot = self.slot(name)
        if version is None or version == slot.version:
            return slot
        return slot.loaded(version)

    def close(self) -> None:
        for slot in list(self._slots.values()):
            slot.close()


if TYPE_CHECKING:  # both sides of agent.models.serving's protocols, checked by mypy
    from agent.models.serving import ModelRepository, ServedModel

    def _conforms(registry: SlotRegistry, slot: ModelSlot, loaded: LoadedVersion) -> None:
        _repository: ModelRepository = registry
        _slot: ServedModel = slot
        _loaded: ServedModel = loaded

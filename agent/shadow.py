"""Shadow evaluation: a candidate version runs beside the serving one on a sample of the live
inferences, never answering, and is compared with it in the model's task terms.

Owns the sampling (a share of the serving inferences, every ``1 / share``-th, deterministic),
the busy budget (the shadow's run time at most ``max_busy_share`` of the wall-clock time), the
comparison (``agent.contracts.accuracy.score_task`` with the model's task: top-1 agreement, box
F1 after DB decoding, mask IoU, cosine / retrieval, relative L2) and the per-window figures
(``ShadowTelemetry``). The serving path only copies the sampled inputs and outputs and hands them
to a worker thread of lower priority; it never waits for the shadow: a sample due while the
previous one still runs is skipped and counted.

Downloading and installing the shadow version are the update client's (``agent.updates``);
loading it beside the serving version, with the memory check that may refuse it, is the slot's
(``agent.models.slots.ModelSlot.load_shadow``); publishing the window is the daemon's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from agent.contracts.accuracy import METRICS, Task, is_classifier, score_task
from agent.contracts.manifest import BundleManifest
from agent.contracts.state import DesiredShadow, ReportedShadow, ShadowPhase, bounded_text
from agent.contracts.telemetry import ShadowTelemetry
from agent.errors import AgentError, ShadowRefusedError
from agent.logs import get_logger
from agent.models.slots import ModelSlot, _lower_thread_priority
from agent.telemetry.window import percentile

__all__ = ["ShadowEvaluator", "ShadowHost", "ShadowRunner", "model_task"]

log = get_logger(__name__)

Array = np.ndarray[Any, Any]
Feeds = Mapping[str, Array]
MAX_KEPT_LATENCIES = 4096  # per window, per version


class ShadowRunner(Protocol):
    """What the evaluator runs the shadow on: a loaded version that never serves."""

    version: str
    variant_id: str

    def infer(self, feeds: Feeds) -> dict[str, Array]: ...

    def retire(self) -> None: ...


def model_task(manifest: BundleManifest) -> Task | None:
    """The task the model's variants were gated on (``edgectl models push --task``), if any."""
    for variant in manifest.variants:
        if variant.accuracy is not None and variant.accuracy.task is not None:
            return variant.accuracy.task
    return None


class ShadowEvaluator:
    """One shadow version of one model: ``offer`` from the serving path, ``take_window`` from
    the telemetry tick, ``close`` when the shadow ends."""

    def __init__(
        self,
        model: str,
        runner: ShadowRunner,
        *,
        task: Task | None,
        sample_share: float,
        max_busy_share: float,
        clock: Callable[[], float] = time.perf_counter,
        nice: int = 10,
    ) -> None:
        self.model = model
        self.version = runner.version
        self._runner = runner
        self._task: Task | None = task
        self._share = sample_share
        self._busy_cap = max_busy_share
        self._clock = clock
        self._nice = nice
        self._credit = 0.0
        self._lock = threading.Condition(threading.Lock())
        self._pending: tuple[dict[str, Array], dict[str, Array], float] | None = None
        self._stopping = False
        self._window_start = clock()
        self._reset()
        self._thread = threading.Thread(
            target=self._work, name=f"shadow-{model}-{runner.version}", daemon=True
        )
        self._thread.start()

    def _reset(self) -> None:
        self._samples = 0
        self._skipped = 0
        self._failed = 0
        self._value_sum = 0.0
        self._delta_sum = 0.0
        self._metric: str | None = None
        self._busy_s = 0.0
        self._latencies: list[float] = []
        self._serving_latencies: list[float] = []

    # -- the serving path ----------------------------------------------------------------

    def offer(self, feeds: Feeds, outputs: Mapping[str, Array], serving_s: float) -> None:
        """Called after every serving inference; cheap unless this one is sampled."""
        self._credit += self._share
        if self._credit < 1.0:
            return
        self._credit -= 1.0
        now = self._clock()
        with self._lock:
            elapsed = max(now - self._window_start, 1.0)
            if self._pending is not None or self._busy_s > self._busy_cap * elapsed:
                self._skipped += 1
                return
            # Copies: the loop reuses its frame buffers and a runtime may reuse its outputs.
            self._pending = (
                {k: np.array(v, copy=True) for k, v in feeds.items()},
                {k: np.array(v, copy=True) for k, v in outputs.items()},
                serving_s,
            )
            self._lock.notify()

    # -- the worker ----------------------------------------------------------------------

    def _work(self) -> None:
        _lower_thread_priority(self._nice)
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._pending is not None or self._stopping)
                if self._stopping:
                    return
                assert self._pending is not None
                feeds, reference, serving_s = self._pending
            start = self._clock()
            try:
                produced = self._runner.infer(feeds)
            except Exception as exc:  # a shadow that fails is a figure, never a crash
                took = self._clock() - start
                with self._lock:
                    self._failed += 1
                    self._busy_s += took
                    self._pending = None
                log.warning(
                    "shadow_run_failed", model=self.model, version=self.version, reason=str(exc)
                )
                continue
            took = self._clock() - start
            metric, value, delta = self._compare(reference, produced)
            # A batch of the API's dynamic batching weighs as many samples as it holds.
            n = _batch_of(reference)
            with self._lock:
                self._samples += n
                self._busy_s += took
                self._metric = metric
                self._value_sum += value * n
                self._delta_sum += delta * n
                if len(self._latencies) < MAX_KEPT_LATENCIES:
                    self._latencies.append(took)
                    self._serving_latencies.append(serving_s)
                self._pending = None

    def _compare(
        self, reference: Mapping[str, Array], produced: Mapping[str, Array]
    ) -> tuple[str, float, float]:
        """(metric, value, points lost) of one sample; outputs that cannot be compared (other
        names or shapes) lose everything."""
        names = list(reference)
        task = self._task or ("classification" if is_classifier(reference[names[0]]) else "generic")
        if any(n not in produced or produced[n].shape != reference[n].shape for n in names):
            return ("rel_l2" if task == "generic" else _DEFAULT_METRIC[task]), 0.0, 100.0
        try:
            score = score_task(
                task,
                [np.asarray(reference[n], dtype=np.float32) for n in names],
                [np.asarray(produced[n], dtype=np.float32) for n in names],
            )
        except (ValueError, IndexError) as exc:
            log.warning("shadow_compare_failed", model=self.model, reason=str(exc))
            return _DEFAULT_METRIC[task], 0.0, 100.0
        delta = max(0.0, min(score.delta, 100.0 if score.metric != "rel_l2" else score.delta))
        return score.metric, float(score.value), float(delta)

    # -- the telemetry tick --------------------------------------------------------------

    def take_window(self) -> ShadowTelemetry:
        """The figures since the last call, and a new window."""
        now = self._clock()
        with self._lock:
            elapsed = max(now - self._window_start, 1e-3)
            n = self._samples
            lat = sorted(self._latencies)
            serving = sorted(self._serving_latencies)
            task = self._task or "generic"
            out = ShadowTelemetry(
                version=self.version,
                variant_id=self._runner.variant_id,
                task=task,
                metric=self._metric or _DEFAULT_METRIC[task],
                samples=n,
                skipped=self._skipped,
                failed=self._failed,
                value=self._value_sum / n if n else None,
                delta=self._delta_sum / n if n else None,
                latency_p50_ms=1000.0 * percentile(lat, 50) if lat else None,
                latency_p99_ms=1000.0 * percentile(lat, 99) if lat else None,
                serving_p99_ms=1000.0 * percentile(serving, 99) if serving else None,
                busy_share=self._busy_s / elapsed,
            )
            self._window_start = now
            self._reset()
        return out

    def close(self, *, retire: bool = True) -> None:
        """Stop the worker; ``retire``: unload the shadow version too."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout=30.0)
        if retire:
            self._runner.retire()


def _batch_of(outputs: Mapping[str, Array]) -> int:
    first = next(iter(outputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 and first.shape[0] else 1


_DEFAULT_METRIC: dict[str, str] = {
    "classification": "agreement",
    "detection": "box_f1",
    "segmentation": "mask_iou",
    "embedding": "cosine",
    "generic": "rel_l2",
}
assert set(_DEFAULT_METRIC.values()) <= set(METRICS)


class ShadowHost:
    """The shadows of one agent, by model name, and what to report about each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._evaluators: dict[str, ShadowEvaluator] = {}
        self._slots: dict[str, ModelSlot] = {}
        self._status: dict[str, tuple[ReportedShadow, DesiredShadow | None]] = {}

    def evaluator(self, name: str) -> ShadowEvaluator | None:
        return self._evaluators.get(name)

    def wanted(self, name: str, desired: DesiredShadow) -> bool:
        """True unless this exact shadow already runs, or already failed or was refused (it is
        tried again only when the control plane offers it anew)."""
        status = self._status.get(name)
        return status is None or status[1] != desired

    def report(self, name: str) -> ReportedShadow | None:
        status = self._status.get(name)
        return status[0] if status is not None else None

    def set_phase(
        self, name: str, desired: DesiredShadow, phase: ShadowPhase, reason: str | None = None
    ) -> None:
        report = ReportedShadow(
            version=desired.version,
            phase=phase,
            reason=bounded_text(reason) if reason else None,
        )
        with self._lock:
            self._status[name] = (report, desired)

    def forget(self, name: str) -> None:
        """Drop what is known of ``name``'s shadow attempt, so the next poll tries again."""
        with self._lock:
            if name not in self._evaluators:
                self._status.pop(name, None)

    def start(self, name: str, slot: ModelSlot, desired: DesiredShadow) -> None:
        """Load ``desired``'s version beside ``slot``'s serving version and sample its
        inferences from now on; a refusal or a failure is recorded for the report."""
        self.stop(name)
        self.set_phase(name, desired, "loading")
        try:
            loaded, manifest = slot.load_shadow(desired.version)
        except ShadowRefusedError as exc:
            self.set_phase(name, desired, "refused", str(exc))
            log.warning("shadow_refused", model=name, version=desired.version, reason=str(exc))
            return
        except AgentError as exc:
            self.set_phase(name, desired, "failed", str(exc))
            log.warning("shadow_failed", model=name, version=desired.version, reason=str(exc))
            return
        evaluator = ShadowEvaluator(
            name,
            loaded,
            task=model_task(manifest),
            sample_share=desired.sample_share,
            max_busy_share=desired.max_busy_share,
        )
        with self._lock:
            self._evaluators[name] = evaluator
            self._slots[name] = slot
        slot.observer = evaluator.offer
        self.set_phase(name, desired, "running")
        log.info(
            "shadow_started",
            model=name,
            version=desired.version,
            sample_share=desired.sample_share,
            max_busy_share=desired.max_busy_share,
        )

    def stop(self, name: str) -> None:
        with self._lock:
            evaluator = self._evaluators.pop(name, None)
            slot = self._slots.pop(name, None)
            self._status.pop(name, None)
        if slot is not None and evaluator is not None and slot.observer == evaluator.offer:
            slot.observer = None
        if evaluator is not None:
            evaluator.close()
            log.info("shadow_stopped", model=name, version=evaluator.version)

    def names(self) -> list[str]:
        return sorted(set(self._status) | set(self._evaluators))

    def take_window(self, name: str) -> ShadowTelemetry | None:
        evaluator = self._evaluators.get(name)
        return evaluator.take_window() if evaluator is not None else None

    def close(self) -> None:
        for name in list(self._evaluators):
            self.stop(name)

"""Dynamic batching: requests from different clients for one model stacked on axis 0.

``plan_batch`` is the pure decision (how many queued requests to run now, or wait); the
``Batcher`` is the thin driver around it: a queue and one worker thread per model, which
concatenates the inputs, runs the model once and splits the outputs back per request.

Requests are checked by the caller (``agent.api.service``) before they are queued, so a bad
request never joins a batch; if a batched run still fails, every request of that batch is run
alone, so each gets its own result or its own error and none waits forever. A batch only holds
requests for the same loaded version (the ``ServedModel`` each was accepted on); a version swap
closes the current batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import InferenceError
from agent.logs import get_logger
from agent.models.serving import Computed, ServedModel

__all__ = ["BatchPolicy", "Batcher", "RunResult", "plan_batch"]

log = get_logger(__name__)

Array = np.ndarray[Any, Any]
Feeds = dict[str, Array]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """How one model's requests are batched."""

    max_batch_size: int
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RunResult:
    """The outputs of one request, with where its time went (seconds)."""

    outputs: dict[str, Array]
    computed: Computed  # the version and variant that ran it
    queue_s: float
    compute_s: float
    batch_size: int  # requests in the batch it ran in (1: alone)
    counts_execution: bool = True  # False for all but one request of a batch


def plan_batch(
    sizes: Sequence[int], policy: BatchPolicy, *, waited_s: float, closed: bool = False
) -> int | None:
    """How many of the queued requests (their batch sizes, oldest first) to run now.

    ``None`` means wait for more. ``waited_s`` is how long the oldest has waited; ``closed``
    says no further request can join (the queue holds a different version next, or shutdown).
    """
    if not sizes:
        return None
    count, total = 0, 0
    prefix_totals: list[int] = []
    for size in sizes:
        if count and total + size > policy.max_batch_size:
            return count  # the next request would overflow: this batch is full
        count += 1
        total += size
        prefix_totals.append(total)
    if total >= policy.max_batch_size:
        return count
    preferred = [p for p in policy.preferred_batch_sizes if p <= policy.max_batch_size]
    if preferred and total >= max(preferred):
        return _largest_preferred_prefix(prefix_totals, preferred) or count
    if closed or waited_s >= policy.max_queue_delay_s:
        if preferred:
            return _largest_preferred_prefix(prefix_totals, preferred) or count
        return count
    return None


def _largest_preferred_prefix(prefix_totals: list[int], preferred: list[int]) -> int:
    wanted = set(preferred)
    for i in range(len(prefix_totals) - 1, -1, -1):
        if prefix_totals[i] in wanted:
            return i + 1
    return 0


@dataclass(slots=True)
class _Pending:
    served: ServedModel
    feeds: Feeds
    size: int
    enqueued: float
    future: Future[RunResult]
    key: tuple[Any, ...]  # requests with equal keys can share a batch


class Batcher:
    """The queue and worker thread of one model; ``submit`` returns at once with a future."""

    def __init__(
        self,
        model: str,
        policy: BatchPolicy,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if policy.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.model = model
        self.policy = policy
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=f"batcher-{model}", daemon=True)
        self._thread.start()

    def submit(self, served: ServedModel, feeds: Feeds, size: int) -> Future[RunResult]:
        """Queue checked ``feeds`` whose first dimension is ``size`` (<= max_batch_size)."""
        future: Future[RunResult] = Future()
        with self._cond:
            if self._stopping:
                raise InferenceError(f"{self.model}: the inference server is stopping")
            key = (id(served), *sorted((n, a.shape[1:], a.dtype.str) for n, a in feeds.items()))
            self._queue.append(_Pending(served, feeds, size, self._clock(), future, key))
            self._cond.notify()
        return future

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _next_batch(self) -> list[_Pending] | None:
        with self._cond:
            while True:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = self._queue[0]
                # Same version and same per-request shapes as the oldest request, in order.
                group = [item for item in self._queue if item.key == head.key]
                closed = self._stopping or any(i.served is not head.served for i in self._queue)
                waited = self._clock() - head.enqueued
                count = plan_batch(
                    [item.size for item in group], self.policy, waited_s=waited, closed=closed
                )
                if count is not None:
                    chosen = group[:count]
                    taken = {id(item) for item in chosen}
                    self._queue = deque(i for i in self._queue if id(i) not in taken)
                    return chosen
                self._cond.wait(max(self.policy.max_queue_delay_s - waited, 0.0))

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as exc:  # never leave a caller waiting
                log.exception("batch_failed", model=self.model, size=len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(InferenceError(f"{self.model}: {exc}"))

    def _run(self, batch: list[_Pending]) -> None:
        start = self._clock()
        if len(batch) == 1:
            self._run_alone(batch[0], start)
            return
        served = batch[0].served
        try:
            feeds = {
                name: np.concatenate([item.feeds[name] for item in batch], axis=0)
                for name in batch[0].feeds
            }
            computed, outputs = served.infer_versioned(feeds)
        except Exception as exc:
            log.warning("batch_retried_alone", model=self.model, size=len(batch), error=str(exc))
            for item in batch:
                self._run_alone(item, self._clock())
            return
        compute = self._clock() - start
        total = sum(item.size for item in batch)
        if any(out.ndim == 0 or out.shape[0] != total for out in outputs.values()):
            # An output without the batch dimension cannot be split back: run each alone.
            log.warning("batch_unsplittable", model=self.model, size=len(batch))
            for item in batch:
                self._run_alone(item, self._clock())
            return
        offset = 0
        for index, item in enumerate(batch):
            part = {name: out[offset : offset + item.size] for name, out in outputs.items()}
            offset += item.size
            item.future.set_result(
                RunResult(part, computed, start - item.enqueued, compute, len(batch), index == 0)
            )

    def _run_alone(self, item: _Pending, start: float) -> None:
        try:
            computed, outputs = item.served.infer_versioned(item.feeds)
        except Exception as exc:
            item.future.set_exception(exc)
            return
        compute = self._clock() - start
        item.future.set_result(RunResult(outputs, computed, start - item.enqueued, compute, 1))

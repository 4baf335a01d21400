"""The local inference loop: frames from a source, through the manifest's preprocessing, into a
model, at a target rate, with per-window latency percentiles and results to a sink.

It owns pacing (target rate, skip or catch-up when late), the per-window statistics
(``LatencySampler`` and the ``WindowStats`` snapshot that telemetry publishes), the sink hook
(``ResultSink``: each successful result's outputs, timed as ``postprocess_ms``; the library
sinks JSON lines of raw digests and callback) and pause/resume/stop from other threads. It
leaves decoding to ``agent._sources``, pixel arithmetic to ``agent._preprocess``, postprocessing
and the configured sinks (``[loop.postprocess]``, ``[[loop.sinks]]``) to ``agent.sinks``, and
running the model to whatever it is handed: a served model (``infer(feeds)``,
``agent.models.serving.ServedModel``) or a backend session (``run(feeds)``,
``agent.backends.Session``).

The hot path is written for a model that runs in ~15 us: locals only, no allocation, no logging,
no pydantic object and no percentile per inference. A bad frame (decode, preprocessing, shape,
runtime or sink error) is counted as failed, logged at most once a second, and skipped.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from agent._preprocess import FramePreprocessor, default_preprocessing
from agent._sources import (
    CallbackSource,
    FrameSource,
    ImageFolderSource,
    SyntheticSource,
    VideoSource,
    synthetic_feeds,
)
from agent.contracts.manifest import Preprocessing
from agent.contracts.sketch import LatencySketch, sketch_of
from agent.contracts.tensors import TensorSpec
from agent.errors import AgentError, ConfigError
from agent.logs import get_logger

__all__ = [
    "CallbackSink",
    "CallbackSource",
    "DropPolicy",
    "FramePreprocessor",
    "FrameSource",
    "ImageFolderSource",
    "InferenceLoop",
    "JsonLinesSink",
    "LatencySampler",
    "LoopState",
    "ResultRecord",
    "ResultSink",
    "SyntheticSource",
    "VideoSource",
    "WindowStats",
    "default_preprocessing",
    "runner_of",
]

log = get_logger(__name__)

# Longest a wait (pacing, pause) on the main thread blocks before looking at the stop flag again:
# what a stop from a signal handler, which sets flags only, may take to be noticed. Seconds.
_POLL_S = 0.1

Feeds = Mapping[str, np.ndarray[Any, Any]]
Outputs = dict[str, np.ndarray[Any, Any]]
Runner = Callable[[Feeds], Outputs]
DropPolicy = Literal["skip", "catch_up"]
LoopState = Literal["idle", "running", "paused", "stopped"]

_FAILURE_LOG_INTERVAL_NS = 1_000_000_000
_BACKOFF_AFTER_FAILURES = 10  # consecutive failures before the loop starts to back off
_BACKOFF_MAX_S = 1.0
_MIN_COUNT_FOR_RATE = 64  # a window this busy predicts the next one's count
_MAX_AGES = 65536  # frame ages kept per window (a live source delivers far fewer)


def _log_safely(level: str, event: str, **fields: Any) -> None:
    """Log from inside the running loop: a broken log stream must not stop inference."""
    with suppress(Exception):
        getattr(log, level)(event, **fields)


def runner_of(model: Any) -> Runner:
    """The bound ``infer`` (served model) or ``run`` (backend session) of ``model``."""
    infer = getattr(model, "infer", None)
    if callable(infer):
        return infer  # type: ignore[no-any-return]
    run = getattr(model, "run", None)
    if callable(run):
        return run  # type: ignore[no-any-return]
    raise ConfigError(f"{type(model).__name__} has neither infer(feeds) nor run(feeds)")


class WindowStats(BaseModel):
    """One closed statistics window of a loop; the payload of latency telemetry.

    ``count`` is successful inferences, ``failed`` frames that errored at any stage (read,
    preprocessing, inference, sink), ``dropped`` frames skipped because the loop was late.
    Percentiles are ``None`` for a window without a successful inference.
    """

    model_config = ConfigDict(frozen=True)

    model: str
    state: LoopState
    window_start: datetime
    window_s: float
    count: int
    failed: int
    dropped: int
    throughput_hz: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    latency_samples: int
    # The window's latencies as a mergeable sketch (the kept sample, each standing for its
    # share of the window's count); None without a successful inference.
    latency_sketch: LatencySketch | None = None
    total_count: int
    total_failed: int
    total_dropped: int
    # Where a successful frame's time went, mean ms per frame over the window: waiting for and
    # decoding the frame, preprocessing, the model, the sink (postprocessing and sinks). ``None``
    # without a frame (and on the unthrottled synthetic path, which times inference only).
    capture_ms: float | None = None
    preprocess_ms: float | None = None
    infer_ms: float | None = None
    postprocess_ms: float | None = None
    # Capture time to inference start, for sources that stamp their frames (live streams).
    frame_age_p50_ms: float | None = None
    frame_age_p99_ms: float | None = None
    # A live stream's reconnections and seconds down, in this window and since the start.
    reconnects: int = 0
    stream_down_s: float = 0.0
    total_reconnects: int = 0


class ResultRecord(BaseModel):
    """One line of ``JsonLinesSink`` (documented here; the sink writes plain dicts for speed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    class Output(BaseModel):
        model_config = ConfigDict(frozen=True, extra="forbid")
        shape: list[int]
        argmax: int | None = None  # flat index of the largest value
        max: float | None = None

    seq: int
    ts: float  # seconds since the epoch, UTC
    latency_ms: float
    outputs: dict[str, Output]


class LatencySampler:
    """Bounded latency sample of one window, for its percentiles.

    A fixed list of ``capacity`` slots keeps every ``stride``-th latency; when it fills, every
    other kept sample is dropped and the stride doubles. The sample therefore spans the whole
    window evenly (systematic sampling) in constant memory, whatever the rate. Percentiles are
    computed only when asked, at window end. The loop inlines ``record`` on its hot path.
    """

    __slots__ = ("capacity", "count", "kept", "next_keep", "samples", "stride")

    def __init__(self, capacity: int = 8192) -> None:
        if capacity < 2 or capacity & (capacity - 1):
            raise ConfigError(f"sample capacity must be a power of two >= 2, got {capacity}")
        self.capacity = capacity
        self.samples: list[int] = [0] * capacity
        self.count = 0
        self.kept = 0
        self.next_keep = 0
        self.stride = 1

    def reset(self, *, expected: int = 0) -> None:
        """Empty the sample for a new window of about ``expected`` latencies (0: unknown)."""
        self.count = self.kept = self.next_keep = 0
        self.stride = 1 << max(0, (expected // self.capacity).bit_length() - 1)

    def record(self, latency_ns: int) -> None:
        if self.count >= self.next_keep:
            self.samples[self.kept] = latency_ns
            self.kept += 1
            self.next_keep += self.stride
            if self.kept == self.capacity:
                self.compact()
        self.count += 1

    def compact(self) -> None:
        """Keep every other sample and double the stride (called when the list is full)."""
        half = self.capacity // 2
        self.samples[:half] = self.samples[0 : self.capacity : 2]
        self.kept = half
        self.stride *= 2

    def kept_samples(self) -> list[int]:
        return self.samples[: self.kept]

    def percentiles_ms(
        self, quantiles: tuple[float, ...] = (50.0, 95.0, 99.0)
    ) -> tuple[float | None, ...]:
        """Linear-interpolated percentiles of the kept samples, in milliseconds."""
        if self.kept == 0:
            return tuple(None for _ in quantiles)
        values = np.percentile(np.asarray(self.samples[: self.kept], dtype=np.float64), quantiles)
        return tuple(float(v) / 1e6 for v in values)


class ResultSink(Protocol):
    """Receives each successful result: frame sequence number, wall time, latency, outputs."""

    def __call__(self, seq: int, ts: float, latency_ns: int, outputs: Outputs) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class CallbackSink:
    """Hands each result to a function (in the loop's thread: keep it short)."""

    def __init__(self, fn: Callable[[int, float, int, Outputs], None]) -> None:
        self._fn = fn

    def __call__(self, seq: int, ts: float, latency_ns: int, outputs: Outputs) -> None:
        self._fn(seq, ts, latency_ns, outputs)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _output_digest(arr: np.ndarray[Any, Any], digest: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"shape": list(arr.shape)}
    if digest and arr.size and arr.dtype.kind in "biuf":
        idx = int(arr.argmax())
        top = float(arr.flat[idx])
        entry["argmax"] = idx
        entry["max"] = top if math.isfinite(top) else None
    return entry


class JsonLinesSink:
    """Appends one JSON object per result (``ResultRecord``) to a file.

    ``digest=False`` writes output shapes only; ``every=N`` keeps one result in N. The file is
    opened at the first result, so a run that fails before producing one leaves no file. Lines
    are buffered and flushed at each window end and on close; a crash can lose at most the
    current window's lines and leave the last line partial.
    """

    def __init__(self, path: Path, *, digest: bool = True, every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"sink every must be >= 1, got {every}")
        if not path.parent.is_dir():
            raise ConfigError(f"sink directory does not exist: {path.parent}")
        if path.is_dir():
            raise ConfigError(f"sink path is a directory: {path}")
        self.path = path
        self._digest = digest
        self._every = every
        self._file: IO[str] | None = None

    def __call__(self, seq: int, ts: float, latency_ns: int, outputs: Outputs) -> None:
        if seq % self._every:
            return
        record = {
            "seq": seq,
            "ts": round(ts, 6),
            "latency_ms": round(latency_ns / 1e6, 4),
            "outputs": {k: _output_digest(v, self._digest) for k, v in outputs.items()},
        }
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()


class InferenceLoop:
    """Runs ``model`` over ``source`` until the source ends, ``max_frames`` frames were read, or
    ``stop()``; ``pause()``/``resume()``/``stop()`` are safe from any thread.

    ``rate_hz=None`` runs unthrottled (benchmarks). When late by whole periods, ``"skip"`` drops
    those frames (counted in ``dropped``; file sources skip ahead) and ``"catch_up"`` runs them
    back to back. ``clock_ns`` (monotonic ns), ``wall`` (epoch s) and ``sleep`` (s) are
    injectable; the default sleep wakes early on pause/stop. A paused loop blocks on an event.
    """

    def __init__(
        self,
        model: Any,
        source: FrameSource,
        *,
        name: str | None = None,
        preprocessing: Preprocessing | None = None,
        rate_hz: float | None = None,
        drop_policy: DropPolicy = "skip",
        window_s: float = 10.0,
        sink: ResultSink | None = None,
        on_window: Callable[[WindowStats], None] | None = None,
        max_frames: int | None = None,
        sample_capacity: int = 8192,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        self._infer = runner_of(model)
        self.name = name or str(getattr(model, "name", "") or "model")
        if rate_hz is not None and not (math.isfinite(rate_hz) and rate_hz > 0):
            raise ConfigError(f"rate_hz must be a positive number or None, got {rate_hz}")
        if drop_policy not in ("skip", "catch_up"):
            raise ConfigError(f"drop_policy must be 'skip' or 'catch_up', got {drop_policy!r}")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ConfigError(f"window_s must be positive, got {window_s}")
        if max_frames is not None and max_frames < 0:
            raise ConfigError(f"max_frames must be >= 0, got {max_frames}")
        self.rate_hz = rate_hz
        self.drop_policy: DropPolicy = drop_policy
        self._source = source
        self._preprocess: FramePreprocessor | None = None
        self._first_input = ""
        self._extra_feeds: dict[str, np.ndarray[Any, Any]] = {}
        if source.yields == "frames":
            specs: tuple[TensorSpec, ...] = tuple(getattr(model, "inputs", ()))
            if not specs:
                raise ConfigError(f"{self.name}: a frame source needs the model's input specs")
            self._preprocess = FramePreprocessor(specs[0], preprocessing)
            self._first_input = specs[0].name
            self._extra_feeds = synthetic_feeds(specs[1:])  # other inputs get fixed tensors
        self._period_ns = round(1e9 / rate_hz) if rate_hz else 0
        self._window_ns = round(window_s * 1e9)
        self._sink = sink
        self._on_window = on_window
        self._max_frames = max_frames
        self._sampler = LatencySampler(sample_capacity)
        self._clock = clock_ns
        self._wall = wall
        self._sleep = sleep if sleep is not None else self._wake_or_timeout
        # Control: ``_halt`` is the one flag the hot path reads; it is set by pause and stop.
        self._lock = threading.Lock()
        self._halt = False
        self._stop_requested = False
        self._pause_requested = False
        self._resumed = threading.Event()
        self._resumed.set()
        self._wake = threading.Event()
        self._state: LoopState = "idle"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        # Windows and totals.
        self._latest: WindowStats | None = None
        self._window_start_ns = 0
        self._window_start_wall = 0.0
        self._total_count = self._total_failed = self._total_dropped = 0
        self._total_reconnects = 0
        self._total_down_s = 0.0
        # Per-window sums of capture/preprocess/infer/sink ns, and frame ages (s); the paced
        # loop fills them, the window close turns them into means and percentiles.
        self._split: list[int] | None = None
        self._ages: list[float] = []
        self._open_activity = False
        # Failure logging, rate-limited.
        self._fail_log_at = -_FAILURE_LOG_INTERVAL_NS
        self._fail_suppressed = 0
        self._fail_streak = 0
        self._fail_streak_mark = -1
        self._last_exc: Exception | None = None  # the latest frame's error, for health reports

    # -- control, from any thread --------------------------------------------------------

    @property
    def state(self) -> LoopState:
        return self._state

    @property
    def latest(self) -> WindowStats | None:
        """The last closed window (``None`` before the first one closes)."""
        return self._latest

    def pause(self) -> None:
        with self._lock:
            if self._stop_requested:
                return
            self._pause_requested = True
            self._resumed.clear()
            self._halt = True
            self._wake.set()

    def resume(self) -> None:
        with self._lock:
            self._pause_requested = False
            self._halt = self._stop_requested
            if self._stop_requested:  # stop() takes no lock: never lose one that raced us
                self._halt = True
            self._resumed.set()

    def stop(self) -> None:
        """Ask the loop to finish the current inference and return, waking it at once."""
        self.request_stop()
        self._resumed.set()
        self._wake.set()

    def request_stop(self) -> None:
        """``stop`` for a signal handler: plain flag writes, no lock. A handler that took an
        ``Event``'s lock could deadlock on the very lock its own thread was holding when the
        signal arrived; the loop's waits are bounded, so it notices within ``_POLL_S``."""
        self._stop_requested = True
        self._halt = True

    def start(self) -> None:
        """Run in a background thread; ``join()`` waits for it and re-raises a crash."""
        if self._thread is not None:
            raise AgentError(f"{self.name}: loop already started")
        self._thread = threading.Thread(target=self._run_in_thread, name=f"loop-{self.name}")
        self._thread.daemon = True
        self._thread.start()

    @property
    def last_failure(self) -> str | None:
        """The latest failed frame's error (read, preprocessing, inference or sink)."""
        exc = self._last_exc
        return None if exc is None else f"{type(exc).__name__}: {exc}"

    @property
    def error(self) -> BaseException | None:
        """What ended the loop's thread, if it crashed (``join()`` re-raises it)."""
        return self._error

    def join(self, timeout: float | None = None) -> WindowStats | None:
        if self._thread is not None:
            self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return self._latest

    def _run_in_thread(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # handed to join(); the thread itself must not print
            self._error = exc

    def _stopping(self) -> bool:
        return self._stop_requested

    @staticmethod
    def _poll_s() -> float | None:
        """How long a wait may block before looking at the flags: bounded only on the main
        thread, the one a signal handler (``request_stop``) runs on; elsewhere ``stop()`` wakes
        the waits, and a paused loop sleeps without waking."""
        return _POLL_S if threading.current_thread() is threading.main_thread() else None

    def _wake_or_timeout(self, seconds: float) -> None:
        poll = self._poll_s()
        if poll is None:
            self._wake.wait(seconds)
            return
        end = time.monotonic() + seconds
        while not self._halt and (left := end - time.monotonic()) > 0:
            if self._wake.wait(min(left, poll)):
                return

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> WindowStats | None:
        """Run in this thread until the end; returns the last window's stats."""
        with self._lock:
            if self._state != "idle":
                raise AgentError(f"{self.name}: a loop runs once; build a new one")
            self._state = "running"
        source = self._source
        try:
            source.open()
            _log_safely(
                "info",
                "loop_started",
                model=self.name,
                source=type(source).__name__,
                rate_hz=self.rate_hz,
                drop_policy=self.drop_policy,
            )
            static = source.static_feeds
            if static is not None and not self._period_ns and self._sink is None:
                self._run_static(static)
            else:
                self._run_paced()
        finally:
            self._state = "stopped"
            source.close()
            if self._sink is not None:
                self._sink.close()
        _log_safely(
            "info",
            "loop_stopped",
            model=self.name,
            count=self._total_count,
            failed=self._total_failed,
            dropped=self._total_dropped,
        )
        return self._latest

    def _run_static(self, feeds: Feeds) -> None:
        """Unthrottled over the same feeds with no sink: the benchmark and saturation path.

        Only the inferences the sampler keeps are timed (two clock reads); the others cost a
        flag test, a compare and an increment. The window end is checked on timed inferences,
        which come at least every ``stride`` inferences.
        """
        infer = self._infer
        clock = self._clock
        sampler = self._sampler
        samples = sampler.samples
        capacity = sampler.capacity
        window_ns = self._window_ns
        limit = self._max_frames
        frames = repeat(None) if limit is None else repeat(None, limit)
        n = failed = kept = keep_at = 0
        t = clock()
        stride = self._open_window(t)
        window_end = t + window_ns
        error: Exception
        for _ in frames:
            if self._halt:
                if self._pause_point(n, failed, 0, kept, clock()):
                    break
                n = failed = kept = keep_at = 0
                t = clock()
                stride = self._open_window(t)
                window_end = t + window_ns
            if n != keep_at:
                try:
                    infer(feeds)
                    n += 1
                    continue
                except Exception as exc:
                    error = exc
            else:
                t0 = clock()
                try:
                    infer(feeds)
                except Exception as exc:
                    error = exc
                else:
                    t = clock()
                    samples[kept] = t - t0  # LatencySampler.record, inlined
                    kept += 1
                    keep_at += stride
                    if kept == capacity:
                        sampler.kept, sampler.stride = kept, stride
                        sampler.compact()
                        kept, stride = sampler.kept, sampler.stride
                    n += 1
                    if t >= window_end:
                        self._close_window(n, failed, 0, kept, t, state="running")
                        n = failed = kept = keep_at = 0
                        stride = sampler.stride
                        window_end = t + window_ns
                    continue
            failed += 1
            t = clock()
            self._failed(error, t, n)
            if t >= window_end:
                self._close_window(n, failed, 0, kept, t, state="running")
                n = failed = kept = keep_at = 0
                stride = sampler.stride
                window_end = t + window_ns
        self._finish(n, failed, 0, kept, clock())

    def _run_paced(self) -> None:
        """The general loop: read, preprocess, infer, sink, at the target rate if any."""
        infer = self._infer
        clock = self._clock
        sleep = self._sleep
        source = self._source
        stamped = hasattr(source, "frame_ts")
        split = self._split = [0, 0, 0, 0]
        ages = self._ages = []
        read = self._source.read
        skip = self._source.skip
        pre = self._preprocess
        first = self._first_input
        frame_feeds: dict[str, np.ndarray[Any, Any]] = dict(self._extra_feeds)
        sink = self._sink
        period = self._period_ns
        catch_up = self.drop_policy == "catch_up"
        sampler = self._sampler
        samples = sampler.samples
        capacity = sampler.capacity
        window_ns = self._window_ns
        limit = self._max_frames
        left = -1 if limit is None else limit
        seq = 0
        n = failed = dropped = kept = keep_at = 0
        t = clock()
        wall_offset = self._wall() - t / 1e9
        stride = self._open_window(t)
        window_end = t + window_ns
        due = t
        while left:
            if self._halt:
                if self._pause_point(n, failed, dropped, kept, clock()):
                    break
                n = failed = dropped = kept = keep_at = 0
                t = due = clock()
                wall_offset = self._wall() - t / 1e9
                stride = self._open_window(t)
                window_end = t + window_ns
            if period:
                now = clock()
                if now < due:
                    sleep((due - now) / 1e9)
                    if self._halt:
                        continue
                elif not catch_up and now - due >= period:
                    missed = (now - due) // period
                    dropped += missed
                    skip(missed)
                    due += missed * period
                due += period
            left -= 1
            try:
                t_read = clock()
                frame = read()
                if frame is None:
                    break
                seq += 1
                t_start = clock()
                if pre is not None:
                    frame_feeds[first] = pre(frame)
                    t_pre = clock()
                    outputs = infer(frame_feeds)
                else:
                    t_pre = t_start
                    outputs = infer(frame)
                t = clock()
            except Exception as exc:
                t = clock()
                failed += 1
                self._failed(exc, t, n)
                if t >= window_end:
                    self._close_window(n, failed, dropped, kept, t, state="running")
                    n = failed = dropped = kept = keep_at = 0
                    stride = sampler.stride
                    window_end = t + window_ns
                continue
            if n >= keep_at:  # LatencySampler.record, inlined
                samples[kept] = t - t_start
                kept += 1
                keep_at += stride
                if kept == capacity:
                    sampler.kept, sampler.stride = kept, stride
                    sampler.compact()
                    kept, stride = sampler.kept, sampler.stride
            n += 1
            split[0] += t_start - t_read
            split[1] += t_pre - t_start
            split[2] += t - t_pre
            if stamped and len(ages) < _MAX_AGES:
                frame_ts = source.frame_ts  # type: ignore[attr-defined]
                if frame_ts is not None:
                    ages.append(wall_offset + t_pre / 1e9 - frame_ts)
            if sink is not None:
                try:
                    sink(seq, wall_offset + t / 1e9, t - t_start, outputs)
                except Exception as exc:
                    failed += 1
                    self._failed(exc, t, n)
                split[3] += clock() - t
            if t >= window_end:
                self._close_window(n, failed, dropped, kept, t, state="running")
                n = failed = dropped = kept = keep_at = 0
                stride = sampler.stride
                window_end = t + window_ns
        self._finish(n, failed, dropped, kept, clock())

    # -- off the hot path ----------------------------------------------------------------

    def _open_window(self, t_ns: int) -> int:
        """Start a window; returns the sampler's starting stride, sized from the last window's
        throughput so a fast model's sample still spans the whole window."""
        self._window_start_ns = t_ns
        self._window_start_wall = self._wall()
        last = self._latest
        expected = 0
        if last is not None and last.count >= _MIN_COUNT_FOR_RATE:
            expected = int(last.throughput_hz * self._window_ns / 1e9)
        self._sampler.reset(expected=expected)
        return self._sampler.stride

    def _close_window(
        self, n: int, failed: int, dropped: int, kept: int, t_ns: int, *, state: LoopState
    ) -> WindowStats:
        sampler = self._sampler
        sampler.kept = kept
        sampler.count = n
        p50, p95, p99 = sampler.percentiles_ms()
        sketch = (
            sketch_of((ns / 1e6 for ns in sampler.kept_samples()), weight=n / kept)
            if kept and n
            else None
        )
        span_s = max((t_ns - self._window_start_ns) / 1e9, 1e-9)
        self._total_count += n
        self._total_failed += failed
        self._total_dropped += dropped
        split, ages = self._split, self._ages
        means: list[float | None] = [None] * 4  # the static path times inference only
        if split is not None and n:
            means = [v / n / 1e6 for v in split]
        age50 = age99 = None
        if ages:
            a50, a99 = np.percentile(np.asarray(ages, dtype=np.float64), (50.0, 99.0))
            age50, age99 = float(a50) * 1e3, float(a99) * 1e3
        reconnects = 0
        down_s = 0.0
        source = self._source
        if hasattr(source, "reconnects"):
            total_reconnects = int(source.reconnects)
            total_down = float(getattr(source, "down_s", 0.0))
            reconnects = total_reconnects - self._total_reconnects
            down_s = max(0.0, total_down - self._total_down_s)
            self._total_reconnects, self._total_down_s = total_reconnects, total_down
        stats = WindowStats(
            model=self.name,
            state=state,
            window_start=datetime.fromtimestamp(self._window_start_wall, timezone.utc),
            window_s=span_s,
            count=n,
            failed=failed,
            dropped=dropped,
            throughput_hz=n / span_s,
            latency_p50_ms=p50,
            latency_p95_ms=p95,
            latency_p99_ms=p99,
            latency_samples=kept,
            latency_sketch=sketch,
            total_count=self._total_count,
            total_failed=self._total_failed,
            total_dropped=self._total_dropped,
            capture_ms=means[0],
            preprocess_ms=means[1],
            infer_ms=means[2],
            postprocess_ms=means[3],
            frame_age_p50_ms=age50,
            frame_age_p99_ms=age99,
            reconnects=reconnects,
            stream_down_s=round(down_s, 3),
            total_reconnects=self._total_reconnects,
        )
        if split is not None:
            split[:] = (0, 0, 0, 0)
        ages.clear()
        self._latest = stats
        self._open_window(t_ns)
        if self._sink is not None:
            try:
                self._sink.flush()
            except Exception as exc:
                _log_safely("warning", "sink_flush_failed", model=self.name, error=str(exc))
        if self._on_window is not None:
            try:
                self._on_window(stats)
            except Exception as exc:
                _log_safely("warning", "window_callback_failed", model=self.name, error=str(exc))
        return stats

    def _finish(self, n: int, failed: int, dropped: int, kept: int, t_ns: int) -> None:
        """Close the last, partial window: the final snapshot says the loop stopped."""
        self._close_window(n, failed, dropped, kept, t_ns, state="stopped")

    def _pause_point(self, n: int, failed: int, dropped: int, kept: int, t_ns: int) -> bool:
        """Handle a raised halt flag; True when the loop must stop. A pause closes the current
        window, blocks until resumed or stopped, and the caller then opens a new window."""
        if self._stop_requested:
            return True
        self._state = "paused"
        self._close_window(n, failed, dropped, kept, t_ns, state="paused")
        _log_safely("info", "loop_paused", model=self.name)
        poll = self._poll_s()
        while not self._resumed.wait(poll) and not self._stop_requested:
            pass
        with self._lock:
            self._wake.clear()
            if self._stopping():  # stop() may have come while paused
                return True
            self._state = "running"
        _log_safely("info", "loop_resumed", model=self.name)
        return False

    def _failed(self, exc: Exception, t_ns: int, successes: int) -> None:
        """Count toward back-off and log at most once a second, with how many were not logged."""
        self._last_exc = exc
        if successes == self._fail_streak_mark:
            self._fail_streak += 1
        else:
            self._fail_streak = 1
            self._fail_streak_mark = successes
        if t_ns - self._fail_log_at >= _FAILURE_LOG_INTERVAL_NS:
            _log_safely(
                "warning",
                "frame_failed",
                model=self.name,
                error=f"{type(exc).__name__}: {exc}",
                not_logged=self._fail_suppressed,
            )
            self._fail_log_at = t_ns
            self._fail_suppressed = 0
        else:
            self._fail_suppressed += 1
        if self._fail_streak >= _BACKOFF_AFTER_FAILURES:
            # Something keeps failing (camera unplugged, model broken): stop burning a core.
            excess = self._fail_streak - _BACKOFF_AFTER_FAILURES + 1
            self._sleep(min(_BACKOFF_MAX_S, 0.001 * excess))

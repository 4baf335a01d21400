"""Inference loop figures, measured side by side in one run.

(a) Loop overhead: per-inference time of ``InferenceLoop`` (unthrottled, same session, same input)
    over a bare ``session.run`` in a Python ``for`` loop, p50 and p99, for the PP-OCR detector
    (1x3x640x640) and the digits CNN. Both variants call the same stamped wrapper around the
    session, which records the entry time of each call; the per-inference time is the interval
    between consecutive entries, so everything the loop does between two inferences counts.
    The variants alternate in rounds (order flipped every round) on the same session; the loop
    is one long-lived loop, paused between its rounds.
(b) Idle agent: a loop running at 30 Hz is paused; process CPU time over a few seconds, as a
    percentage of one core (goal < 1%).

Run: .venv/bin/python bench/bench_loop.py   (EDGEFLEET_BENCH_QUICK=1 for a short run)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import psutil

from agent.backends import Artifact, LoadOptions, load_first
from agent.contracts.tensors import TensorSpec
from agent.logs import configure_logging
from agent.loop import InferenceLoop, SyntheticSource
from agent.samples import digits_cnn, ppocr_detector

QUICK = os.environ.get("EDGEFLEET_BENCH_QUICK") == "1"


class Stamped:
    """The session as the loop sees it, recording the entry time of every ``run``; after
    ``target`` calls it calls ``on_target`` (the loop variant pauses the loop there)."""

    def __init__(self, session: Any, target: int) -> None:
        self._run = session.run
        self.inputs = session.inputs
        self.name = "bench"
        self.stamps = [0] * (target + 1)
        self.calls = 0
        self.target = target
        self.on_target: Any = None
        self._clock = time.perf_counter_ns

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        i = self.calls
        self.stamps[i] = self._clock()
        self.calls = i + 1
        if i + 1 == self.target and self.on_target is not None:
            self.on_target()
        return self._run(feeds)

    def take(self) -> np.ndarray[Any, Any]:
        """Intervals between consecutive calls since the last take."""
        out = np.diff(np.asarray(self.stamps[: self.calls], dtype=np.int64))
        self.calls = 0
        return out


def overhead(
    name: str, path: Any, shape: tuple[int, ...], *, rounds: int, per_round: int
) -> dict[str, Any]:
    """Bare rounds run in this thread; loop rounds resume one long-lived loop (default 10 s
    windows, as in production) in its thread and it pauses itself after ``per_round`` calls."""
    session = load_first(Artifact(path, name=name), LoadOptions())
    first = session.inputs[0].name
    source = SyntheticSource(session.inputs, shapes={first: shape})
    feeds = source.feeds
    stamped = Stamped(session, per_round)
    loop = InferenceLoop(stamped, source, rate_hz=None)
    reached = threading.Event()

    def pause_loop() -> None:
        loop.pause()
        reached.set()

    for _ in range(max(3, per_round // 10)):  # warm-up
        session.run(feeds)
    loop.pause()
    loop.start()
    times: dict[str, list[np.ndarray[Any, Any]]] = {"bare": [], "loop": []}
    for r in range(rounds):
        order = ("bare", "loop") if r % 2 == 0 else ("loop", "bare")
        for variant in order:
            if variant == "bare":
                stamped.on_target = None
                run = stamped.run
                for _ in range(per_round):
                    run(feeds)
            else:
                reached.clear()
                stamped.on_target = pause_loop
                loop.resume()
                reached.wait()
                while loop.state != "paused":
                    time.sleep(0.001)
            times[variant].append(stamped.take())
    loop.stop()
    loop.join()
    session.close()
    b = np.concatenate(times["bare"]) / 1e6
    lo = np.concatenate(times["loop"]) / 1e6
    bp50, bp99 = np.percentile(b, [50, 99])
    lp50, lp99 = np.percentile(lo, [50, 99])
    # Paired per-round p50 ratios: robust to a neighbour slowing the machine for a while.
    paired = np.median(
        [np.median(x) / np.median(y) for x, y in zip(times["loop"], times["bare"], strict=True)]
    )
    return {
        "model": name,
        "shape": "x".join(map(str, shape)),
        "n": len(b),
        "bare": (bp50, bp99),
        "loop": (lp50, lp99),
        "ratio": (lp50 / bp50, lp99 / bp99),
        "paired": float(paired),
    }


class NoOp:
    """A model that does nothing: what is left is the loop's own cost per inference."""

    name = "no-op"

    def __init__(self, inputs: Any) -> None:
        self.inputs = inputs

    def run(self, feeds: Any) -> None:
        return None


def loop_cost_ns(inputs: Any, n: int, rounds: int) -> tuple[float, float]:
    """(bare ns per call, loop ns per inference) with a no-op model, median over rounds."""
    model = NoOp(inputs)
    source = SyntheticSource(inputs)
    feeds = source.feeds
    bare_ns, loop_ns = [], []
    for _ in range(rounds):
        run = model.run
        t = time.perf_counter_ns()
        for _ in range(n):
            run(feeds)
        bare_ns.append((time.perf_counter_ns() - t) / n)
        loop = InferenceLoop(model, source, max_frames=n)
        t = time.perf_counter_ns()
        loop.run()
        loop_ns.append((time.perf_counter_ns() - t) / n)
    return float(np.median(bare_ns)), float(np.median(loop_ns))


def idle_cpu(path: Any, seconds: float) -> tuple[float, float]:
    """(% of one core while running at 30 Hz, % of one core while paused)."""
    session = load_first(Artifact(path, name="digits"), LoadOptions())
    loop = InferenceLoop(session, SyntheticSource(session.inputs), rate_hz=30.0, window_s=1.0)
    proc = psutil.Process()

    def cpu() -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    loop.start()
    time.sleep(0.5)
    c0, w0 = cpu(), time.monotonic()
    time.sleep(seconds)
    running = (cpu() - c0) / (time.monotonic() - w0) * 100
    loop.pause()
    time.sleep(0.5)  # let the runtime's worker threads stop spinning
    c0, w0 = cpu(), time.monotonic()
    time.sleep(seconds)
    paused = (cpu() - c0) / (time.monotonic() - w0) * 100
    assert loop.state == "paused"
    loop.stop()
    loop.join()
    session.close()
    return running, paused


def main() -> None:
    configure_logging("error", json=True)
    results = [
        overhead(
            "ppocr-det",
            ppocr_detector(),
            (1, 3, 640, 640),
            # short rounds: a busy neighbour changes this model's speed within seconds
            rounds=4 if QUICK else 30,
            per_round=3,
        ),
        overhead(
            "digits-cnn",
            digits_cnn(),
            (1, 1, 8, 8),
            rounds=6 if QUICK else 320,
            per_round=500 if QUICK else 250,
        ),
    ]
    print("\n(a) loop overhead: per-inference time, loop (unthrottled) vs bare session.run")
    print(
        f"{'model':<11} {'input':<12} {'n':>6} {'bare p50':>10} {'loop p50':>10} {'ratio':>7}"
        f" {'paired':>7} {'bare p99':>10} {'loop p99':>10} {'ratio':>7}"
    )
    for r in results:
        print(
            f"{r['model']:<11} {r['shape']:<12} {r['n']:>6} {r['bare'][0]:>8.3f}ms"
            f" {r['loop'][0]:>8.3f}ms {r['ratio'][0]:>7.3f} {r['paired']:>7.3f}"
            f" {r['bare'][1]:>8.3f}ms {r['loop'][1]:>8.3f}ms {r['ratio'][1]:>7.3f}"
        )
    print("goal: ratio <= 1.02 at p50 (paired: median of per-round p50 ratios)")
    bare_ns, loop_ns = loop_cost_ns(
        (TensorSpec(name="input", datatype="FP32", shape=(1, 1, 8, 8)),), 200_000, 5
    )
    print(
        f"loop's own cost, no-op model: bare call {bare_ns:.0f} ns, loop {loop_ns:.0f} ns"
        f" per inference -> {loop_ns - bare_ns:.0f} ns of overhead"
    )
    running, paused = idle_cpu(digits_cnn(), 2.0 if QUICK else 5.0)
    print("\n(b) idle agent: process CPU, % of one core")
    print(f"{'loop running at 30 Hz (digits)':<34} {running:>6.2f}%")
    print(f"{'loop paused':<34} {paused:>6.2f}%   goal < 1%")


if __name__ == "__main__":
    main()

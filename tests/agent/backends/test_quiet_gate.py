"""``ChildGate`` on real child processes: a background child stands still while a request is
served, runs between requests, and is never held past ``max_hold_s`` (a saturated server still
finishes its swap)."""

from __future__ import annotations

import itertools
import sys
import threading
import time

from agent.backends.quiet import ChildGate

# prints CLOCK_MONOTONIC (system-wide on Linux, the same clock as time.monotonic here) every 5 ms
TICKER = (
    "import time\n"
    "for _ in range(120):\n"
    "    print(time.monotonic(), flush=True)\n"
    "    time.sleep(0.005)\n"
)


def _run(gate: ChildGate, out: list[float]) -> threading.Thread:
    def target() -> None:
        done = gate.run([sys.executable, "-c", TICKER], timeout=30)
        out.extend(float(line) for line in done.stdout.split())

    thread = threading.Thread(target=target)
    thread.start()
    return thread


def _started(gate: ChildGate) -> None:
    deadline = time.monotonic() + 10
    while not gate._children:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.15)  # Python has started and ticks


def test_a_child_stands_still_while_a_request_is_served() -> None:
    gate = ChildGate(max_hold_s=10.0)
    ticks: list[float] = []
    thread = _run(gate, ticks)
    _started(gate)
    with gate.serving():
        start = time.monotonic()
        time.sleep(0.3)
        end = time.monotonic()
    thread.join(30)
    during = [t for t in ticks if start + 0.02 < t < end]
    assert during == []  # stopped within a few ms of the request's start
    assert len(ticks) == 120  # and finished its work after it
    assert any(t > end for t in ticks)


def test_a_child_is_never_held_past_max_hold() -> None:
    gate = ChildGate(max_hold_s=0.05, min_run_s=0.05)
    ticks: list[float] = []
    thread = _run(gate, ticks)
    _started(gate)
    with gate.serving():  # one request that never ends, as on a saturated server
        start = time.monotonic()
        time.sleep(0.6)
        end = time.monotonic()
    thread.join(30)
    during = [t for t in ticks if start < t < end]
    assert len(during) >= 10  # it ran about half the time
    assert len(during) < 0.6 / 0.005 * 0.8  # and was held the rest
    gaps = [b - a for a, b in itertools.pairwise(during)]
    assert max(gaps) < 0.25  # never held for long past max_hold_s (0.05 s)


def test_without_children_serving_costs_nothing_and_holds_nothing() -> None:
    gate = ChildGate()
    with gate.serving():
        assert gate._busy == 0

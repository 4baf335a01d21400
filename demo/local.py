"""``python -m demo.local`` (``make demo``): the agent running real models with a live latency
table.

Loads the PP-OCR text detector shipped in the ``rapidocr-onnxruntime`` wheel and the digits CNN
(trained on first use), then runs the inference loop on each for a few seconds: PP-OCR on a
synthetic 1x3x640x640 tensor as fast as it goes, the digits CNN on real 8x8 digit images through
the frame preprocessing at a 500 Hz target, checking its answers against the labels. Needs the
``dev`` extra for the sample models. ``EDGEFLEET_DEMO_SECONDS`` sets the time per model.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

from agent.backends import Artifact, LoadOptions, load_first
from agent.cli._run import backend_label, stats_table
from agent.errors import AgentError
from agent.logs import configure_logging
from agent.loop import CallbackSink, CallbackSource, InferenceLoop, SyntheticSource, WindowStats
from agent.samples import digits_cnn, digits_data, ppocr_detector

__all__ = ["main"]


class _Table:
    """Rows of the live table, re-rendered at every closed window."""

    def __init__(self, live: Any) -> None:
        self.live = live
        self.rows: list[tuple[str, str, float | None, WindowStats | None]] = []

    def add(self, name: str, backend: str, rate: float | None) -> int:
        self.rows.append((name, backend, rate, None))
        self.render()
        return len(self.rows) - 1

    def set(self, row: int, stats: WindowStats) -> None:
        name, backend, rate, _ = self.rows[row]
        self.rows[row] = (name, backend, rate, stats)
        self.render()

    def render(self) -> None:
        self.live.update(stats_table(self.rows), refresh=True)


def _run_ppocr(table: _Table, seconds: float) -> None:
    session = load_first(Artifact(ppocr_detector(), name="ppocr-det"), LoadOptions())
    try:
        source = SyntheticSource(session.inputs, shapes={session.inputs[0].name: (1, 3, 640, 640)})
        row = table.add("ppocr-det", backend_label(session), None)
        loop = InferenceLoop(
            session,
            source,
            name="ppocr-det",
            window_s=1.0,
            on_window=lambda stats: table.set(row, stats),
        )
        _run_for(loop, seconds)
    finally:
        session.close()


def _run_digits(table: _Table, seconds: float) -> float:
    """Returns the share of digit images classified correctly."""
    data = digits_data()
    # Real images as a camera would hand them over: 8x8 uint8 grey.
    frames = np.rint(data.x_test[:, 0] * 255).astype(np.uint8)
    labels = data.y_test
    state = {"next": 0, "right": 0, "seen": 0}

    def next_frame() -> np.ndarray[Any, Any]:
        i = state["next"]
        state["next"] = (i + 1) % len(frames)
        frame: np.ndarray[Any, Any] = frames[i]
        return frame

    def check(seq: int, ts: float, latency_ns: int, outputs: dict[str, Any]) -> None:
        state["seen"] += 1
        state["right"] += int(outputs["logits"].argmax() == labels[(seq - 1) % len(labels)])

    session = load_first(Artifact(digits_cnn(), name="digits-cnn"), LoadOptions())
    rate = 500.0
    try:
        row = table.add("digits-cnn", backend_label(session), rate)
        loop = InferenceLoop(
            session,
            CallbackSource(next_frame),
            name="digits-cnn",
            rate_hz=rate,
            window_s=1.0,
            sink=CallbackSink(check),
            on_window=lambda stats: table.set(row, stats),
        )
        _run_for(loop, seconds)
    finally:
        session.close()
    return state["right"] / max(1, state["seen"])


def _run_for(loop: InferenceLoop, seconds: float) -> None:
    loop.start()
    try:
        loop.join(timeout=seconds)
    finally:
        loop.stop()
        loop.join()


def main(seconds: float | None = None) -> int:
    from rich.console import Console
    from rich.live import Live

    if seconds is None:
        seconds = float(os.environ.get("EDGEFLEET_DEMO_SECONDS", "10"))
    configure_logging("warning")
    console = Console()
    if not console.is_terminal:  # a pipe or a CI log: room for the whole table
        console = Console(width=120)
    try:
        with Live(console=console, auto_refresh=False) as live:
            table = _Table(live)
            _run_ppocr(table, seconds)
            accuracy = _run_digits(table, seconds)
    except AgentError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    console.print()
    console.print(f"digits-cnn accuracy on the real images it saw: {accuracy:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

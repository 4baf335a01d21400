"""Fixtures of the inference loop tests: a real digits session and an injectable clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog

from agent.backends import Artifact, LoadOptions, Session, load_first


class FakeClock:
    """Monotonic ns clock that only moves when slept on or advanced."""

    def __init__(self) -> None:
        self.ns = 0
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        return self.ns

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.ns += round(seconds * 1e9)

    def advance_ms(self, ms: float) -> None:
        self.ns += round(ms * 1e6)

    def wall(self) -> float:
        return 1_700_000_000.0 + self.ns / 1e9

    @property
    def ms(self) -> float:
        return self.ns / 1e6


class TimedModel:
    """A real session whose every run also moves the fake clock by ``cost_ms(call_index)``."""

    def __init__(self, session: Session, clock: FakeClock, cost_ms: Callable[[int], float]):
        self._session = session
        self._clock = clock
        self._cost = cost_ms
        self.inputs = session.inputs
        self.name = "digits"
        self.calls = 0

    def run(self, feeds: Any) -> Any:
        out = self._session.run(feeds)
        self._clock.advance_ms(self._cost(self.calls))
        self.calls += 1
        return out


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    """The CLI and the demo configure structlog for the process, bound to the stream pytest
    captured for that test; later tests must not log into that closed stream."""
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def digits_session(digits_path: Path) -> Iterator[Session]:
    session = load_first(
        Artifact(digits_path, name="digits"), LoadOptions(intra_op_threads=1), order=["onnxruntime"]
    )
    yield session
    session.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def digit_frames(digits: Any) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Real 8x8 digit images as uint8 grey frames, with their labels."""
    frames = np.rint(digits.x_test[:, 0] * 255).astype(np.uint8)
    return frames, digits.y_test

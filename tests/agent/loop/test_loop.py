"""The inference loop on a real model: pacing with an injected clock, drop policies, windows,
bad frames, pause/resume/stop from another thread, and the sinks."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from structlog.testing import capture_logs

from agent.backends import Session
from agent.errors import AgentError, ConfigError, InputError
from agent.loop import (
    CallbackSink,
    CallbackSource,
    ImageFolderSource,
    InferenceLoop,
    JsonLinesSink,
    ResultRecord,
    SyntheticSource,
    VideoSource,
    WindowStats,
    runner_of,
)
from tests.agent.loop.conftest import FakeClock, TimedModel
from tests.agent.loop.test_sources import write_video


def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    """Block until ``predicate()`` holds; fail (not hang) after ``timeout``."""
    done = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        done.wait(0.005)
    pytest.fail("condition not reached")


def feeds_source(session: Session, clock: FakeClock | None = None) -> Any:
    """A feeds source that records the (fake) time of each read."""
    feeds = SyntheticSource(session.inputs).feeds
    reads: list[float] = []
    skipped: list[int] = []

    def produce() -> Mapping[str, Any]:
        if clock is not None:
            reads.append(clock.ms)
        return feeds

    source = CallbackSource(produce, yields="feeds", skip=skipped.append)
    return source, reads, skipped


# -- counting and windows ---------------------------------------------------------------------


def test_unthrottled_static_loop_counts_every_inference(digits_session: Session) -> None:
    windows: list[WindowStats] = []
    loop = InferenceLoop(
        digits_session,
        SyntheticSource(digits_session.inputs),
        max_frames=3000,
        on_window=windows.append,
    )
    final = loop.run()
    assert final is not None
    assert (final.total_count, final.total_failed, final.total_dropped) == (3000, 0, 0)
    assert final.state == "stopped"
    assert sum(w.count for w in windows) == 3000
    assert final.latency_p50_ms is not None
    assert 0 < final.latency_p50_ms <= final.latency_p95_ms <= final.latency_p99_ms  # type: ignore[operator]
    assert 0 < final.latency_samples <= 3000
    assert loop.state == "stopped"


def test_windows_and_percentiles_with_an_injected_clock(
    digits_session: Session, clock: FakeClock
) -> None:
    costs = [float(i % 10 + 1) for i in range(1000)]  # 1..10 ms, repeating
    model = TimedModel(digits_session, clock, lambda i: costs[i])
    windows: list[WindowStats] = []
    loop = InferenceLoop(
        model,
        SyntheticSource(model.inputs),
        window_s=1.0,
        max_frames=1000,
        on_window=windows.append,
        clock_ns=clock,
        wall=clock.wall,
        sleep=clock.sleep,
    )
    loop.run()
    # The first window closes at the first inference ending at or after 1000 ms.
    elapsed, first = 0.0, 0
    while elapsed < 1000:
        elapsed += costs[first]
        first += 1
    w0 = windows[0]
    assert (w0.count, w0.state, w0.window_s) == (first, "running", elapsed / 1000)
    expected = np.percentile(costs[:first], [50, 95, 99])
    assert (w0.latency_p50_ms, w0.latency_p95_ms, w0.latency_p99_ms) == pytest.approx(
        tuple(expected)
    )
    assert w0.throughput_hz == pytest.approx(first / (elapsed / 1000))
    assert w0.window_start.timestamp() == pytest.approx(1_700_000_000.0)
    assert sum(w.count for w in windows) == 1000
    assert windows[-1].state == "stopped"
    assert windows[-1].total_count == 1000
    assert clock.sleeps == []  # unthrottled: never sleeps


# -- pacing and drop policy -------------------------------------------------------------------


def test_target_rate_keeps_the_grid_without_real_sleeping(
    digits_session: Session, clock: FakeClock
) -> None:
    model = TimedModel(digits_session, clock, lambda i: 10.0)
    source, reads, _ = feeds_source(digits_session, clock)
    final = InferenceLoop(
        model,
        source,
        rate_hz=10.0,
        max_frames=5,
        clock_ns=clock,
        wall=clock.wall,
        sleep=clock.sleep,
    ).run()
    assert reads == [0, 100, 200, 300, 400]
    assert clock.sleeps == pytest.approx([0.09] * 4)
    assert final is not None
    assert (final.total_count, final.total_dropped) == (5, 0)


@pytest.mark.parametrize(
    ("policy", "starts", "dropped", "skips"),
    [
        ("skip", [0, 100, 200, 300, 550, 600, 700], 1, [1]),
        ("catch_up", [0, 100, 200, 300, 550, 560, 600], 0, []),
    ],
)
def test_drop_policy_when_an_inference_runs_late(
    digits_session: Session,
    clock: FakeClock,
    policy: Any,
    starts: list[float],
    dropped: int,
    skips: list[int],
) -> None:
    # 10 Hz; the 4th inference takes 250 ms, the others 10 ms.
    model = TimedModel(digits_session, clock, lambda i: 250.0 if i == 3 else 10.0)
    source, reads, skipped = feeds_source(digits_session, clock)
    final = InferenceLoop(
        model,
        source,
        rate_hz=10.0,
        drop_policy=policy,
        max_frames=7,
        clock_ns=clock,
        wall=clock.wall,
        sleep=clock.sleep,
    ).run()
    assert reads == starts
    assert skipped == skips  # a file source is told to skip ahead the frames it dropped
    assert final is not None
    assert (final.total_count, final.total_dropped, final.total_failed) == (7, dropped, 0)


# -- bad frames -------------------------------------------------------------------------------


def test_bad_frames_are_counted_logged_once_and_skipped(
    digits_session: Session, digit_frames: Any
) -> None:
    frames, _ = digit_frames
    good = frames[0]
    script: list[Any] = [
        good,
        np.zeros((8, 8), np.float32),  # wrong dtype
        good,
        np.zeros((8,), np.uint8),  # wrong rank
        InputError("cannot decode image x.png"),  # a source that fails one read
        np.zeros((8, 8, 5), np.uint8),  # wrong channels
        good,
        np.zeros((3, 3, 3), np.uint8),  # resized to 8x8 grey by the default preprocessing: fine
        None,
    ]
    items = iter(script)

    def produce() -> Any:
        item = next(items)
        if isinstance(item, Exception):
            raise item
        return item

    with capture_logs() as logs:
        final = InferenceLoop(digits_session, CallbackSource(produce)).run()
    assert final is not None
    assert (final.total_count, final.total_failed) == (4, 4)
    failures = [e for e in logs if e["event"] == "frame_failed"]
    assert len(failures) == 1  # rate-limited: one line a second at most
    assert "uint8" in failures[0]["error"]


def test_runtime_rejections_are_counted_and_the_loop_goes_on(digits_session: Session) -> None:
    good = SyntheticSource(digits_session.inputs).feeds
    script: list[Any] = [
        good,
        {"input": np.zeros((1, 1, 9, 9), np.float32)},  # wrong shape for the runtime
        {"input": np.zeros((1, 1, 8, 8), np.float64)},  # wrong dtype
        {"nope": np.zeros((1, 1, 8, 8), np.float32)},  # wrong name
        good,
        None,
    ]
    items = iter(script)
    seen: list[int] = []
    final = InferenceLoop(
        digits_session,
        CallbackSource(lambda: next(items), yields="feeds"),
        sink=CallbackSink(lambda seq, ts, lat, out: seen.append(seq)),
    ).run()
    assert final is not None
    assert (final.total_count, final.total_failed) == (2, 3)
    assert seen == [1, 5]


def test_a_model_that_always_fails_backs_off_instead_of_spinning(clock: FakeClock) -> None:
    class Broken:
        inputs = ()
        name = "broken"

        def run(self, feeds: Any) -> Any:
            raise RuntimeError("device lost")

    final = InferenceLoop(
        Broken(),
        SyntheticSource([]),
        max_frames=30,
        clock_ns=clock,
        wall=clock.wall,
        sleep=clock.sleep,
    ).run()
    assert final is not None
    assert (final.total_count, final.total_failed) == (0, 30)
    assert len(clock.sleeps) == 21  # from the 10th consecutive failure on
    assert clock.sleeps == sorted(clock.sleeps)


def test_sink_and_window_callback_errors_do_not_stop_the_loop(digits_session: Session) -> None:
    def bad_sink(seq: int, ts: float, lat: int, out: Any) -> None:
        if seq % 2:
            raise OSError("disk full")

    def bad_window(stats: WindowStats) -> None:
        raise ValueError("dashboard down")

    final = InferenceLoop(
        digits_session,
        SyntheticSource(digits_session.inputs, count=10),
        sink=CallbackSink(bad_sink),
        on_window=bad_window,
    ).run()
    assert final is not None
    assert (final.total_count, final.total_failed) == (10, 5)


# -- pause / resume / stop --------------------------------------------------------------------


def test_pause_resume_stop_from_another_thread(digits_session: Session) -> None:
    results: list[int] = []
    windows: list[WindowStats] = []
    loop = InferenceLoop(
        digits_session,
        SyntheticSource(digits_session.inputs),
        rate_hz=200.0,
        sink=CallbackSink(lambda seq, ts, lat, out: results.append(seq)),
        on_window=windows.append,
    )
    loop.start()
    wait_until(lambda: len(results) >= 5)
    loop.pause()
    wait_until(lambda: loop.state == "paused")
    assert windows[-1].state == "paused"  # the partial window is published on pause
    frozen = len(results)
    threading.Event().wait(0.2)
    assert len(results) == frozen  # nothing runs while paused
    loop.resume()
    wait_until(lambda: len(results) > frozen)
    assert loop.state == "running"
    loop.stop()
    final = loop.join(timeout=20)
    assert final is not None
    assert final.state == "stopped"
    assert loop.state == "stopped"
    assert final.total_count == len(results)
    with pytest.raises(AgentError, match="runs once"):
        loop.run()


def test_stop_wakes_a_loop_that_sleeps_or_is_paused(digits_session: Session) -> None:
    slow = InferenceLoop(digits_session, SyntheticSource(digits_session.inputs), rate_hz=0.01)
    slow.start()
    wait_until(lambda: slow.state == "running")
    slow.stop()  # the loop is sleeping ~100 s until its next frame
    slow.join(timeout=20)
    assert slow.state == "stopped"

    paused = InferenceLoop(digits_session, SyntheticSource(digits_session.inputs))
    paused.pause()
    paused.start()
    wait_until(lambda: paused.state == "paused")
    paused.stop()
    final = paused.join(timeout=20)
    assert paused.state == "stopped"
    assert final is not None
    assert final.total_count == 0


# -- sources and sinks end to end -------------------------------------------------------------


def test_image_folder_to_json_lines(
    digits_session: Session, digit_frames: Any, tmp_path: Path
) -> None:
    frames, labels = digit_frames
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(60):
        Image.fromarray(frames[i]).save(folder / f"{i:03d}.png")
    out = tmp_path / "results.jsonl"
    final = InferenceLoop(
        digits_session, ImageFolderSource(folder), sink=JsonLinesSink(out), name="digits"
    ).run()
    assert final is not None
    assert final.total_count == 60
    records = [ResultRecord.model_validate_json(line) for line in out.read_text().splitlines()]
    assert [r.seq for r in records] == list(range(1, 61))
    assert all(r.latency_ms > 0 and r.outputs["logits"].shape == [1, 10] for r in records)
    predicted = np.array([r.outputs["logits"].argmax for r in records])
    assert (predicted == labels[:60]).mean() >= 0.9  # the real model sees real digits


def test_json_lines_options_and_bad_paths(digits_session: Session, tmp_path: Path) -> None:
    out = tmp_path / "shapes.jsonl"
    InferenceLoop(
        digits_session,
        SyntheticSource(digits_session.inputs, count=10),
        sink=JsonLinesSink(out, digest=False, every=2),
    ).run()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in lines] == [2, 4, 6, 8, 10]
    assert lines[0]["outputs"] == {"logits": {"shape": [1, 10]}}
    with pytest.raises(ConfigError, match="does not exist"):
        JsonLinesSink(tmp_path / "missing" / "r.jsonl")
    with pytest.raises(ConfigError, match="directory"):
        JsonLinesSink(tmp_path)


def test_a_run_without_results_leaves_no_sink_file(digits_session: Session, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    InferenceLoop(
        digits_session, SyntheticSource(digits_session.inputs, count=0), sink=JsonLinesSink(out)
    ).run()
    assert not out.exists()


def test_video_file_through_the_loop(digits_session: Session, tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    write_video(video, frames=6)
    final = InferenceLoop(digits_session, VideoSource(video)).run()  # 24x32 colour -> 8x8 grey
    assert final is not None
    assert (final.total_count, final.total_failed) == (6, 0)


def test_a_served_model_plugs_in_through_infer(digits_session: Session) -> None:
    class Served:
        name = "digits"
        version = "1.0.0"
        inputs = digits_session.inputs
        calls = 0

        def infer(self, feeds: Any) -> Any:
            Served.calls += 1
            return digits_session.run(feeds)

    final = InferenceLoop(Served(), SyntheticSource(Served.inputs), max_frames=7).run()
    assert final is not None
    assert final.model == "digits"
    assert Served.calls == 7
    with pytest.raises(ConfigError, match="neither infer"):
        runner_of(object())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate_hz": 0.0}, "rate_hz"),
        ({"rate_hz": -5.0}, "rate_hz"),
        ({"rate_hz": float("nan")}, "rate_hz"),
        ({"window_s": 0.0}, "window_s"),
        ({"drop_policy": "later"}, "drop_policy"),
        ({"max_frames": -1}, "max_frames"),
    ],
)
def test_bad_loop_settings(digits_session: Session, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        InferenceLoop(digits_session, SyntheticSource(digits_session.inputs), **kwargs)


def test_a_frame_source_needs_input_specs() -> None:
    class Bare:
        def run(self, feeds: Any) -> Any:
            return {}

    with pytest.raises(ConfigError, match="input specs"):
        InferenceLoop(Bare(), CallbackSource(lambda: None))


@pytest.mark.parametrize("paused", [False, True])
def test_a_flags_only_stop_is_noticed_on_the_main_thread(
    digits_session: Session, paused: bool
) -> None:
    """``request_stop`` (what a signal handler may call) takes no lock; a loop running on the
    main thread must still notice it mid-wait: here a 0.05 Hz pacing wait of 20 s, or a pause
    with no end. A safety net stops the loop after 10 s and would fail the test."""
    loop = InferenceLoop(digits_session, SyntheticSource(digits_session.inputs), rate_hz=0.05)
    net_fired = threading.Event()

    def safety_net() -> None:
        net_fired.set()
        loop.stop()

    steps = [threading.Timer(0.3, loop.pause)] if paused else []
    steps += [threading.Timer(0.6, loop.request_stop), threading.Timer(10.0, safety_net)]
    for timer in steps:
        timer.start()
    try:
        final = loop.run()  # on the main thread, as in ``edge-agent run``
    finally:
        for timer in steps:
            timer.cancel()
    assert final is not None
    assert final.state == "stopped"
    assert not net_fired.is_set()

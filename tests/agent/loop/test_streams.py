"""Live stream sources against real cameras in other processes: an MJPEG camera served over
HTTP and an RTSP camera (GStreamer's RTSP server, run by the system Python). The stream is cut
mid-run and restarted (the loop reconnects and reports the gap), and a model slower than the
frame period is served the freshest frame (no backlog); plus the ``[loop.source]``
configuration and the kinds this machine cannot use."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent._sources import StreamSource, build_source, source_status
from agent.cli import EX_CONFIG, main
from agent.config import UrlSourceConfig, load_settings
from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, InputError
from agent.loop import InferenceLoop
from tests.agent.loop.mjpeg_server import age_ms, stamp_of
from tests.conftest import ROOT

FPS = 30.0


class Camera:
    """The MJPEG server process; ``cut()`` kills it, ``restart()`` serves the same port."""

    def __init__(self, fps: float = FPS) -> None:
        self.fps = fps
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.agent.loop.mjpeg_server", *self.args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    @property
    def args(self) -> list[str]:
        return ["--port", str(self.port), "--fps", str(self.fps)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/stream"

    def cut(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def restart(self) -> None:
        self.start()


SYSTEM_PYTHON = "/usr/bin/python3"


def _rtsp_usable() -> str | None:
    """Why GStreamer's RTSP server cannot run here, or None."""
    probe = "import gi; gi.require_version('GstRtspServer', '1.0')"
    try:
        done = subprocess.run(
            [SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True, timeout=30
        )
    except OSError as exc:
        return f"{SYSTEM_PYTHON}: {exc}"
    if done.returncode != 0:
        return (
            "GStreamer's RTSP server is not installed for the system Python (Debian: "
            "gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-good; make services)"
        )
    return None


class RtspCamera(Camera):
    """GStreamer's RTSP server (``rtsp_server.py``): MJPEG over RTP, same port on restart."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, "tests/agent/loop/rtsp_server.py", str(self.port), str(int(self.fps))],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().split()[1])

    @property
    def url(self) -> str:
        return f"rtsp://127.0.0.1:{self.port}/cam"


@pytest.fixture
def camera() -> Iterator[Camera]:
    cam = Camera()
    yield cam
    if cam.proc is not None and cam.proc.poll() is None:
        cam.cut()


@pytest.fixture(params=["mjpeg", "rtsp"])
def any_camera(request: pytest.FixtureRequest) -> Iterator[Camera]:
    if request.param == "rtsp" and (why := _rtsp_usable()) is not None:
        pytest.skip(why)
    cam = Camera() if request.param == "mjpeg" else RtspCamera()
    yield cam
    if cam.proc is not None and cam.proc.poll() is None:
        cam.cut()


class StampReader:
    """A model slower than the frame period: reads each frame's capture stamp (raw pixels of a
    96x192 RGB input), notes its age at inference start, then takes ``cost_s``."""

    name = "stamp-reader"

    def __init__(self, cost_s: float) -> None:
        self.inputs = (TensorSpec(name="image", datatype="UINT8", shape=(96, 192, 3)),)
        self.cost_s = cost_s
        self.ages_ms: list[float] = []

    def infer(self, feeds: Any) -> dict[str, np.ndarray[Any, Any]]:
        self.ages_ms.append(age_ms(stamp_of(feeds["image"])))
        time.sleep(self.cost_s)
        return {"age": np.array([self.ages_ms[-1]], np.float32)}


def test_a_slow_model_is_served_the_freshest_frame(camera: Camera) -> None:
    model = StampReader(cost_s=0.1)  # 3 frame periods at 30 fps
    source = build_source(UrlSourceConfig(kind="url", url=camera.url), model.inputs, repeat=False)
    assert isinstance(source, StreamSource)
    loop = InferenceLoop(model, source, rate_hz=None, window_s=10.0, max_frames=25)
    stats = loop.run()
    assert stats is not None
    assert stats.total_count == 25
    ages = model.ages_ms[1:]  # the first frame may predate the grab thread's start
    # A queue would add ~67 ms of age per inference (100 ms model, 33 ms frames): over 2 s
    # by the last one. Served newest-first, every frame is at most about a period old.
    assert max(ages) < 150, ages
    assert np.mean(ages[-5:]) < 100, ages
    assert stats.frame_age_p99_ms is not None
    assert stats.frame_age_p99_ms < 150
    assert stats.infer_ms is not None
    assert stats.infer_ms >= 100
    assert stats.capture_ms is not None
    assert stats.preprocess_ms is not None
    assert stats.postprocess_ms == 0.0  # no sink


def test_stream_cut_mid_run_reconnects_and_reports_the_gap(
    any_camera: Camera, digits_path: Path, tmp_path: Path
) -> None:
    camera = any_camera
    config = tmp_path / "agent.toml"
    config.write_text(
        "[loop]\nrate_hz = 30.0\nwindow_s = 0.5\n\n"
        f'[loop.source]\nkind = "url"\nurl = "{camera.url}"\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 0.4\nstall_timeout_s = 2.0\n"
    )
    # 6 s: room for a slow reconnect under load (two test workers) before the run ends
    run_args = ["--model", str(digits_path), "--duration", "6"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config), *run_args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + 30  # the agent starts (imports, model load), then infers
        while not any('"loop_window"' in line for line in list(lines)):
            assert time.monotonic() < deadline, lines
            assert proc.poll() is None, lines
            time.sleep(0.05)
        camera.cut()
        time.sleep(1.5)
        camera.restart()
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    err = "".join(lines)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    lost = [e for e in events if e.get("event") == "source_lost"]
    back = [e for e in events if e.get("event") == "source_reconnected"]
    assert len(lost) == 1, err
    assert len(back) == 1, err
    assert 1.3 <= back[0]["gap_s"] <= 4.0  # the 1.5 s outage, plus the backoff step
    final = json.loads(out.splitlines()[-1])
    # One entry per window: the final line repeats the last window when it was logged too.
    by_start = {w["window_start"]: w for w in events if w.get("event") == "loop_window"}
    by_start[final["window_start"]] = final
    windows = [by_start[k] for k in sorted(by_start)]
    assert sum(w["reconnects"] for w in windows) == 1
    down = sum(w["stream_down_s"] for w in windows)
    assert down == pytest.approx(back[0]["gap_s"], abs=0.05)
    assert final["total_reconnects"] == 1
    reconnected_at = next(i for i, w in enumerate(windows) if w["reconnects"])
    # inferring again once reconnected (in the window of the reconnect, or after it)
    assert sum(w["count"] for w in windows[reconnected_at:]) > 0
    assert sum(w["failed"] for w in windows) > 0  # the outage, as failures


def test_reads_while_down_say_the_stream_is_down(camera: Camera) -> None:
    source = StreamSource(
        camera.url, label="test camera", reconnect_min_s=5.0, reconnect_max_s=5.0, wait_s=0.2
    )
    source.open()
    try:
        assert source.read() is not None
        camera.cut()
        deadline = time.monotonic() + 5
        while source.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not source.connected
        with contextlib.suppress(InputError):  # a frame from before the cut may be left
            source.read()
        with pytest.raises(InputError, match="test camera is down"):
            source.read()
        assert source.down_s > 0
        assert source.reconnects == 0
    finally:
        source.close()


def test_a_stream_that_is_not_there_is_a_config_error() -> None:
    source = build_source(
        UrlSourceConfig(kind="url", url="http://127.0.0.1:9/none"),
        (TensorSpec(name="x", datatype="UINT8", shape=(8, 8, 3)),),
        repeat=False,
    )
    with pytest.raises(ConfigError, match=r"OpenCV cannot open http://127\.0\.0\.1:9/none"):
        source.open()


# -- configuration --------------------------------------------------------------------------


def test_the_string_form_of_loop_source_still_loads() -> None:
    loop = load_settings(loop={"source": "camera", "camera_index": 2}).loop
    assert loop.source.kind == "v4l2"
    assert loop.source.device == 2
    loop = load_settings(loop={"source": "video", "source_path": "/tmp/x.mp4"}).loop
    assert loop.source.kind == "video"
    assert str(loop.source.path) == "/tmp/x.mp4"
    assert load_settings(loop={"source": "synthetic"}).loop.source.kind == "synthetic"


@pytest.mark.parametrize(
    ("loop", "message"),
    [
        ({"source": "rtsp://cam/1"}, "is not a source; use a \\[loop.source\\] table"),
        (
            {"source": {"kind": "v4l2"}, "camera_index": 1},
            "loop.camera_index belong to the string form",
        ),
        ({"source": {"kind": "url", "url": "ftp://x/y"}}, "loop.source.url.url"),
        ({"source": {"kind": "gstreamer", "pipeline": "videotestsrc"}}, "end in an appsink"),
        ({"source": {"kind": "v4l2", "device": "/etc/passwd"}}, "a path under /dev"),
        ({"source": {"kind": "v4l2", "fourcc": "MJPEG"}}, "fourcc"),
        (
            {
                "source": {
                    "kind": "url",
                    "url": "rtsp://h/x",
                    "reconnect_min_s": 5,
                    "reconnect_max_s": 1,
                }
            },
            "reconnect_max_s must be >= reconnect_min_s",
        ),
        ({"source": {"kind": "webcam"}}, "does not match any of the expected tags"),
    ],
)
def test_bad_source_configs_are_named(loop: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(loop=loop)


def test_a_kind_this_machine_cannot_use_says_why(
    digits_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = {row.kind: row for row in source_status()}
    config = tmp_path / "agent.toml"
    config.write_text(
        '[loop.source]\nkind = "gstreamer"\n'
        'pipeline = "videotestsrc ! videoconvert ! video/x-raw,format=BGR ! appsink"\n'
    )
    code = main(["run", "--config", str(config), "--model", str(digits_path), "--duration", "1"])
    err = capsys.readouterr().err
    if status["gstreamer"].usable:
        pytest.skip("this OpenCV is built with GStreamer")
    assert code == EX_CONFIG
    assert "kind 'gstreamer' cannot be used here" in err
    assert "built without GStreamer" in err
    assert "Traceback" not in err


def test_doctor_lists_the_sources(capsys: pytest.CaptureFixture[str]) -> None:
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "loop sources ([loop.source] kind)" in out
    for kind in ("v4l2", "gstreamer", "url", "video", "images"):
        assert kind in out
    if not list(Path("/dev").glob("video*")):
        assert "no /dev/video* device" in out


# -- the daemon -----------------------------------------------------------------------------


def _daemon(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _results(sink: Path) -> int:
    return len(sink.read_text().splitlines()) if sink.is_file() else 0


def test_the_daemon_loop_rides_out_a_dropped_stream(
    camera: Camera, tmp_path: Path, state_dir: Path, digits_path: Path
) -> None:
    from tests.agent.test_daemon_systemd import _install

    _install(
        state_dir, tmp_path, "digits", digits_path, {"input": np.zeros((1, 1, 8, 8), np.float32)}
    )
    sink = tmp_path / "results.jsonl"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "stream-test"\nstate_dir = "{state_dir}"\nlog_json = true\n'
        '[[models]]\nname = "digits"\n[api]\nenabled = false\n[swap]\nwarmup_runs = 1\n'
        f'[loop]\nrate_hz = 30\nwindow_s = 0.5\nsink_path = "{sink}"\n'
        f'[loop.source]\nkind = "url"\nurl = "{camera.url}"\n'
        "reconnect_min_s = 0.1\nreconnect_max_s = 0.4\nstall_timeout_s = 2.0\n"
    )
    proc = _daemon(config)
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while _results(sink) < 10:
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        camera.cut()
        time.sleep(1.5)
        before = _results(sink)
        camera.restart()
        deadline = time.monotonic() + 30
        while _results(sink) < before + 10:  # inferring again after the reconnect
            assert proc.poll() is None, "".join(lines)[-3000:]
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
        proc.stderr.close()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.count("source_lost") == 1, names
    assert names.count("source_reconnected") == 1, names
    gap = next(e for e in events if e["event"] == "source_reconnected")["gap_s"]
    assert 1.3 <= gap <= 4.0
    # The bundle declares no preprocessing: the daemon said so once.
    warned = [e for e in events if e["event"] == "loop_without_preprocessing"]
    assert len(warned) == 1
    assert warned[0]["source"] == "url"


def test_the_daemon_refuses_a_kind_this_build_cannot_use(tmp_path: Path, state_dir: Path) -> None:
    if next(r for r in source_status() if r.kind == "gstreamer").usable:
        pytest.skip("this OpenCV is built with GStreamer")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'state_dir = "{state_dir}"\n[[models]]\nname = "digits"\n[api]\nenabled = false\n'
        '[loop.source]\nkind = "gstreamer"\npipeline = "videotestsrc ! appsink"\n'
    )
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == EX_CONFIG, res.stderr
    assert "kind 'gstreamer' cannot be used here" in res.stderr.strip().splitlines()[-1]


def test_doctor_json_lists_every_kind() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "doctor", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    doc = json.loads(out)
    kinds = {row["kind"]: row for row in doc["sources"]}
    assert set(kinds) == {
        *("synthetic", "v4l2", "gstreamer", "url", "video", "images", "ros2", "rosbag"),
        "callback",
    }
    assert kinds["url"]["usable"] is True  # the FFmpeg backend the stream tests use
    assert all(row["detail"] for row in kinds.values())
    assert {rt["name"] for rt in doc["runtimes"]} >= {"onnxruntime"}

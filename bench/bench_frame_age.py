"""Frame age at inference, latest-frame grabber against OpenCV's default buffered capture,
side by side in one run.

A camera streams MJPEG over HTTP at 30 fps (``tests.agent.loop.mjpeg_server``, its own
process); each frame carries its capture time drawn in pixels. The same ``InferenceLoop``
(unthrottled) runs the real PP-OCR detector (1x3x640x640, slower than the 33 ms frame period
here) over two sources of that stream:

- grabber: ``[loop.source] kind = "url"`` (``agent._sources.StreamSource``): a grab thread keeps
  only the newest frame;
- buffered: ``cv2.VideoCapture(url).read()`` in the loop's thread, OpenCV's default (every frame
  in order, so the frames the model has no time for queue up in the capture and socket buffers).

Frame age = inference start - the capture time the frame carries. Printed: p50/p99 age per
source, the model's mean time, and the goal (p99 <= one frame period + the model's time).

Run: .venv/bin/python bench/bench_frame_age.py   (EDGEFLEET_BENCH_QUICK=1 for a short run)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent._sources import build_source
from agent.backends import Artifact, LoadOptions, load_first
from agent.config import UrlSourceConfig
from agent.contracts.manifest import Preprocessing
from agent.errors import InputError
from agent.logs import configure_logging
from agent.loop import InferenceLoop
from agent.samples import ppocr_detector
from tests.agent.loop.mjpeg_server import age_ms, stamp_of

QUICK = os.environ.get("EDGEFLEET_BENCH_QUICK") == "1"
FPS = 30.0
RUN_S = 6.0 if QUICK else 15.0
ROOT = Path(__file__).resolve().parent.parent


class Stamps:
    """Wraps a source: notes the capture stamp of each frame it hands out."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.yields = "frames"
        self.static_feeds = None
        self.stamp = 0

    @property
    def frame_ts(self) -> float | None:
        """The wrapped source's own capture time (the grab thread's), for the loop's stats."""
        return getattr(self.source, "frame_ts", None)

    def open(self) -> None:
        self.source.open()

    def read(self) -> Any:
        frame = self.source.read()
        if frame is not None:
            self.stamp = stamp_of(frame)
        return frame

    def skip(self, count: int) -> None:
        self.source.skip(count)

    def close(self) -> None:
        self.source.close()


class Buffered:
    """OpenCV's default capture of a stream: ``read()`` returns the next frame in order."""

    yields = "frames"
    static_feeds = None

    def __init__(self, url: str) -> None:
        self.url = url
        self.cap: Any = None

    def open(self) -> None:
        self.cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG)
        if not self.cap.isOpened():
            raise RuntimeError(f"cannot open {self.url}")

    def read(self) -> Any:
        ok, bgr = self.cap.read()
        if not ok:
            raise InputError("no frame")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def skip(self, count: int) -> None:
        pass

    def close(self) -> None:
        self.cap.release()


class AgeAtInference:
    """The session as the loop sees it: notes the age of the frame at each inference start."""

    def __init__(self, session: Any, stamps: Stamps) -> None:
        self._run = session.run
        self.inputs = session.inputs
        self.name = "ppocr"
        self.stamps = stamps
        self.ages: list[float] = []
        self.run_ms: list[float] = []

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> Any:
        self.ages.append(age_ms(self.stamps.stamp))
        t0 = time.perf_counter()
        out = self._run(feeds)
        self.run_ms.append((time.perf_counter() - t0) * 1e3)
        return out


def measure(session: Any, source: Any) -> tuple[np.ndarray[Any, Any], float, Any]:
    stamps = Stamps(source)
    model = AgeAtInference(session, stamps)
    loop = InferenceLoop(
        model,
        stamps,
        rate_hz=None,
        window_s=RUN_S + 60,
        preprocessing=Preprocessing(resize=(640, 640)),  # its dynamic H/W, at 640x640
    )
    loop.start()
    time.sleep(RUN_S)
    loop.stop()
    stats = loop.join(30)
    ages = np.asarray(model.ages[1:], dtype=np.float64)  # the first may predate the stream
    return ages, float(np.mean(model.run_ms)), stats


def main() -> None:
    configure_logging("warning", json=False)
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.agent.loop.mjpeg_server", "--fps", str(FPS)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = f"http://127.0.0.1:{int(server.stdout.readline())}/stream"
        session = load_first(
            Artifact(ppocr_detector(), name="ppocr"),
            LoadOptions(intra_op_threads=2),
            order=["onnxruntime"],
        )
        rows = []
        for label, make in (
            (
                "grabber",
                lambda: build_source(UrlSourceConfig(kind="url", url=url), (), repeat=False),
            ),
            ("buffered", lambda: Buffered(url)),
        ):
            ages, model_ms, stats = measure(session, make())
            rows.append((label, ages, model_ms, stats))
        session.close()
    finally:
        server.kill()
        server.wait()
    period = 1e3 / FPS
    print(
        f"camera {FPS:g} fps (period {period:.1f} ms), PP-OCR detector 1x3x640x640, "
        f"{RUN_S:g} s per source, unthrottled loop"
    )
    print(
        f"{'source':<10} {'inferences':>10} {'model ms':>9} {'age p50 ms':>11} "
        f"{'age p99 ms':>11} {'age max ms':>11} {'goal p99 <= ms':>15}"
    )
    for label, ages, model_ms, _stats in rows:
        goal = period + model_ms
        print(
            f"{label:<10} {len(ages):>10} {model_ms:>9.1f} {np.percentile(ages, 50):>11.1f} "
            f"{np.percentile(ages, 99):>11.1f} {ages.max():>11.1f} {goal:>15.1f}"
        )
    grab, buf = rows[0][1], rows[1][1]
    print(f"p99 age, buffered / grabber: {np.percentile(buf, 99) / np.percentile(grab, 99):.1f}x")
    grab_stats = rows[0][3]
    if grab_stats is not None and grab_stats.capture_ms is not None:
        print(
            "grabber loop window: capture "
            f"{grab_stats.capture_ms:.1f} ms, preprocess {grab_stats.preprocess_ms:.1f} ms, "
            f"infer {grab_stats.infer_ms:.1f} ms, "
            f"frame_age_p99_ms (grab time to inference) {grab_stats.frame_age_p99_ms:.1f}"
        )


if __name__ == "__main__":
    main()

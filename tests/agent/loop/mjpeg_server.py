"""A live MJPEG camera over HTTP (``multipart/x-mixed-replace``), run as its own process.

Each frame is generated with OpenCV at ``--fps`` and carries its capture time: the low 32 bits
of the epoch milliseconds, drawn as 32 full-height black/white stripes (robust to JPEG), read
back by ``stamp_of``. Every client receives the newest frame at the stream's rate. The first
line on stdout is the port, once the server listens. Used by the stream tests and by
``bench/bench_frame_age.py``::

    python -m tests.agent.loop.mjpeg_server --port 0 --fps 30
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import cv2
import numpy as np

BITS = 32
WIDTH, HEIGHT = 192, 96
CELL = WIDTH // BITS
BOUNDARY = "frame"


def draw_stamp(ms: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray[Any, Any]:
    """An RGB frame whose stripes spell ``ms % 2**32`` (most significant bit left)."""
    frame = np.zeros((height, width, 3), np.uint8)
    cell = width // BITS
    for bit in range(BITS):
        if (ms >> (BITS - 1 - bit)) & 1:
            frame[:, bit * cell : (bit + 1) * cell] = 255
    return frame


def stamp_of(frame: np.ndarray[Any, Any]) -> int:
    """The epoch milliseconds (mod 2**32) a frame drawn by ``draw_stamp`` carries. ``frame`` is
    HxWxC or CxHxW-free HxW; any scale, read as bright (> half of its maximum) or dark."""
    grey = frame.mean(axis=2) if frame.ndim == 3 else frame
    width = grey.shape[1]
    cell = width // BITS
    cols = grey[:, : cell * BITS].reshape(grey.shape[0], BITS, cell).mean(axis=(0, 2))
    threshold = (float(grey.max()) + float(grey.min())) / 2 if grey.max() > grey.min() else 0.5
    value = 0
    for bright in cols > threshold:
        value = (value << 1) | int(bright)
    return value


def age_ms(stamp: int, now_s: float | None = None) -> float:
    """Milliseconds between a frame's stamp and ``now_s`` (default: now), wrap-safe."""
    now = int((time.time() if now_s is None else now_s) * 1000) % (1 << BITS)
    return float((now - stamp) % (1 << BITS))


class Camera:
    """Generates the newest JPEG at ``fps``; clients wait on it."""

    def __init__(self, fps: float) -> None:
        self.period = 1.0 / fps
        self.cond = threading.Condition()
        self.jpeg = b""
        self.seq = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        due = time.monotonic()
        while True:
            ms = int(time.time() * 1000) % (1 << BITS)
            bgr = cv2.cvtColor(draw_stamp(ms), cv2.COLOR_RGB2BGR)
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            with self.cond:
                self.jpeg = buf.tobytes()
                self.seq += 1
                self.cond.notify_all()
            due += self.period
            time.sleep(max(0.0, due - time.monotonic()))


def handler_for(camera: Camera) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            seen = 0
            try:
                while True:
                    with camera.cond:
                        while camera.seq == seen:
                            camera.cond.wait(5)
                        jpeg, seen = camera.jpeg, camera.seq
                    head = (
                        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(jpeg)}\r\n\r\n"
                    ).encode()
                    self.wfile.write(head + jpeg + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                return

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fps", type=float, default=30.0)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(Camera(args.fps)))
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())

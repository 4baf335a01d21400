"""Where the inference loop's frames come from: synthetic tensors, an image folder, a video file
or camera (OpenCV), a ROS 2 image topic or rosbag2 (built by ``agent.ros2.source``), or an
in-process callback.

A source yields either ready *feeds* (a mapping of input name -> array) or *frames* (HxWxC uint8
RGB arrays that ``agent._preprocess`` turns into the first input). ``read()`` returns ``None``
when the source is exhausted and raises ``InputError`` for one unusable frame (the loop counts it
and goes on). ``skip(n)`` lets the loop drop frames it is too late for, so a file source stays in
step with the target rate. Optional decoders (OpenCV, Pillow) are imported lazily and their
absence is a ``ConfigError`` naming the package. Pacing, stats and sinks belong to ``agent.loop``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import numpy as np

from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, InputError
from agent.logs import get_logger

if TYPE_CHECKING:
    from agent.config import SourceConfig

__all__ = [
    "IMAGE_SUFFIXES",
    "CallbackSource",
    "FrameSource",
    "ImageFolderSource",
    "SourceStatus",
    "StreamSource",
    "SyntheticSource",
    "VideoSource",
    "build_source",
    "require_source_kind",
    "source_status",
    "synthetic_feeds",
    "video_devices",
]

Feeds = Mapping[str, np.ndarray[Any, Any]]
SourceKind = Literal["frames", "feeds"]
log = get_logger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _log_safely(level: str, event: str, **fields: Any) -> None:
    """Log from the grab thread: a broken log stream must not stop capture."""
    with suppress(Exception):
        getattr(log, level)(event, **fields)


class FrameSource(Protocol):
    """What the loop reads from. ``static_feeds`` is not ``None`` when every read returns the
    same feeds, which lets the loop take them once instead of calling ``read`` per inference."""

    yields: SourceKind
    static_feeds: Feeds | None

    def open(self) -> None: ...

    def read(self) -> Any:
        """The next frame or feeds; ``None`` at the end; ``InputError`` for a bad frame."""
        ...

    def skip(self, count: int) -> None:
        """Drop up to ``count`` upcoming frames (the loop is late for them)."""
        ...

    def close(self) -> None: ...


def synthetic_feeds(
    specs: Sequence[TensorSpec],
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dynamic_size: int = 64,
    seed: int = 0,
) -> dict[str, np.ndarray[Any, Any]]:
    """One tensor per input spec: uniform [0, 1) floats, small integers, or zeros for bools.

    A dynamic batch dimension becomes 1, any other dynamic dimension ``dynamic_size``; ``shapes``
    overrides the shape of named inputs (it must fit the spec).
    """
    shapes = shapes or {}
    unknown = set(shapes) - {s.name for s in specs}
    if unknown:
        raise ConfigError(f"shape given for unknown input(s) {sorted(unknown)}")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        if spec.name in shapes:
            shape = tuple(int(d) for d in shapes[spec.name])
            if not spec.accepts_shape(shape):
                raise ConfigError(f"shape {shape} does not fit input {spec.name!r} {spec.shape}")
        else:
            shape = tuple(
                d if d >= 0 else (1 if i == 0 else dynamic_size) for i, d in enumerate(spec.shape)
            )
        if spec.datatype == "BYTES":
            raise ConfigError(f"input {spec.name!r} is BYTES: no synthetic data for strings")
        if spec.datatype in ("FP16", "FP32", "FP64"):
            arr = rng.random(shape, dtype=np.float64).astype(spec.dtype)
        elif spec.datatype == "BOOL":
            arr = np.zeros(shape, dtype=np.bool_)
        else:
            arr = rng.integers(0, 8, size=shape).astype(spec.dtype)
        feeds[spec.name] = arr
    return feeds


class SyntheticSource:
    """The same random tensors every read, shaped from the model's input specs (benchmarks,
    smoke runs). ``count=None`` never ends."""

    yields: SourceKind = "feeds"

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        *,
        shapes: Mapping[str, Sequence[int]] | None = None,
        dynamic_size: int = 64,
        seed: int = 0,
        count: int | None = None,
    ) -> None:
        self._feeds = synthetic_feeds(specs, shapes=shapes, dynamic_size=dynamic_size, seed=seed)
        self._count = count
        self._left = count
        # Only an endless source is static: a counted one has to be read to end.
        self.static_feeds: Feeds | None = self._feeds if count is None else None

    @property
    def feeds(self) -> Feeds:
        return self._feeds

    def open(self) -> None:
        self._left = self._count

    def read(self) -> Feeds | None:
        if self._left is not None:
            if self._left <= 0:
                return None
            self._left -= 1
        return self._feeds

    def skip(self, count: int) -> None:
        if self._left is not None:
            self._left = max(0, self._left - count)

    def close(self) -> None:
        pass


class CallbackSource:
    """Frames or feeds from an in-process function; it returns ``None`` to end the run."""

    static_feeds: Feeds | None = None
    read: Callable[[], Any]

    def __init__(
        self,
        produce: Callable[[], Any],
        *,
        yields: SourceKind = "frames",
        skip: Callable[[int], None] | None = None,
    ) -> None:
        self._produce = produce
        self._skip = skip
        self.yields = yields
        self.read = produce  # no wrapper on the hot path

    def open(self) -> None:
        pass

    def skip(self, count: int) -> None:
        if self._skip is not None:
            self._skip(count)

    def close(self) -> None:
        pass


def _decoder() -> Callable[[Path], np.ndarray[Any, Any]]:
    """Decode an image file to HxWx3 uint8 RGB: Pillow, else OpenCV."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        pass
    else:

        def pil_decode(path: Path) -> np.ndarray[Any, Any]:
            try:
                with Image.open(path) as img:
                    return np.asarray(img.convert("RGB"))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise InputError(f"cannot decode image {path.name}: {exc}") from exc

        return pil_decode
    cv2 = _import_cv2("reading an image folder")

    def cv2_decode(path: Path) -> np.ndarray[Any, Any]:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise InputError(f"cannot decode image {path.name}")
        rgb: np.ndarray[Any, Any] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return rgb

    return cv2_decode


def _import_cv2(purpose: str) -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise ConfigError(
            f"{purpose} needs OpenCV: pip install opencv-python-headless ({exc})"
        ) from exc
    return cv2


class ImageFolderSource:
    """Every image file of a folder in name order, decoded to RGB; ``repeat`` cycles forever.

    A file that does not decode is a bad frame (``InputError``), not the end of the run.
    """

    yields: SourceKind = "frames"
    static_feeds: Feeds | None = None

    def __init__(self, folder: Path, *, repeat: bool = False) -> None:
        if not folder.is_dir():
            raise ConfigError(f"image folder not found: {folder}")
        self.files = sorted(
            p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise ConfigError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        self._repeat = repeat
        self._next = 0
        self._decode = _decoder()

    def open(self) -> None:
        self._next = 0

    def read(self) -> np.ndarray[Any, Any] | None:
        if self._next >= len(self.files):
            if not self._repeat:
                return None
            self._next = 0
        path = self.files[self._next]
        self._next += 1
        return self._decode(path)

    def skip(self, count: int) -> None:
        self._next += count
        if self._repeat:
            self._next %= len(self.files)

    def close(self) -> None:
        pass


class VideoSource:
    """Frames of a video file (``Path``) or a camera (``int`` index) through OpenCV, as RGB.

    A file ends at its last frame (or rewinds with ``repeat``); a camera that returns no frame
    raises ``InputError`` for that read so the loop counts it and tries again.
    """

    yields: SourceKind = "frames"
    static_feeds: Feeds | None = None

    def __init__(self, target: Path | int, *, repeat: bool = False) -> None:
        self._cv2 = _import_cv2("a video or camera source")
        self._target = target
        self._camera = isinstance(target, int)
        if isinstance(target, Path) and not target.is_file():
            raise ConfigError(f"video file not found: {target}")
        self._repeat = repeat
        self._cap: Any = None

    def open(self) -> None:
        cv2 = self._cv2
        cap = cv2.VideoCapture(self._target if self._camera else str(self._target))
        if not cap.isOpened():
            cap.release()
            what = f"camera {self._target}" if self._camera else f"video file {self._target}"
            raise ConfigError(f"OpenCV cannot open {what}")
        self._cap = cap

    def read(self) -> np.ndarray[Any, Any] | None:
        ok, bgr = self._cap.read()
        if not ok:
            if self._camera:
                raise InputError(f"camera {self._target} returned no frame")
            if not self._repeat:
                return None
            self._cap.set(self._cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self._cap.read()
            if not ok:
                return None
        rgb: np.ndarray[Any, Any] = self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)
        return rgb

    def skip(self, count: int) -> None:
        if self._camera:  # a camera already hands out its freshest frame
            return
        for _ in range(count):  # grab() advances without decoding
            if not self._cap.grab():
                break

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class StreamSource:
    """A live stream through OpenCV: a V4L2 camera, a GStreamer pipeline or an RTSP/HTTP URL.

    A grab thread reads frames as fast as the stream delivers them and keeps only the newest
    one (no queue of stale frames): ``read`` returns the newest frame not yet handed out,
    waiting for the next one if the loop is faster than the stream. A stream that ends, errors
    or stalls for ``stall_timeout_s`` is released and reopened with exponential backoff; the
    outage is logged (``source_lost``, ``source_reconnected`` with its ``gap_s``) and counted
    in ``reconnects`` / ``down_s``. While it is down, ``read`` raises ``InputError`` saying so.

    ``frame_ts`` is the capture time (epoch seconds) of the frame ``read`` returned last, taken
    when the grab thread received it; ``frame_seq`` counts frames received since ``open``.
    """

    yields: SourceKind = "frames"
    static_feeds: Feeds | None = None

    def __init__(
        self,
        target: str | int,
        *,
        label: str,
        api: int | None = None,
        props: Mapping[int, float] | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 10.0,
        stall_timeout_s: float = 5.0,
        wait_s: float = 0.5,
    ) -> None:
        self._cv2 = _import_cv2(f"the {label} source")
        self._target = target
        self.label = label
        self._api = self._cv2.CAP_ANY if api is None else api
        self._props = dict(props or {})
        self._min_s = reconnect_min_s
        self._max_s = max(reconnect_max_s, reconnect_min_s)
        self._stall_s = stall_timeout_s
        self._wait_s = wait_s
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap: Any = None
        self._frame: Any = None
        self._seq = 0  # frames received
        self._ts = 0.0
        self._taken = 0  # the seq read() returned last
        self._down_since: float | None = None
        self._down_total = 0.0
        self.reconnects = 0
        self.frame_ts: float | None = None
        self.frame_seq = 0

    @property
    def down_s(self) -> float:
        """Seconds the stream has been down since ``open``, the current outage included."""
        with self._cond:
            since = self._down_since
            return self._down_total + (time.monotonic() - since if since is not None else 0.0)

    @property
    def connected(self) -> bool:
        return self._down_since is None and self._thread is not None

    def _connect(self) -> Any:
        cv2 = self._cv2
        if self._api == cv2.CAP_FFMPEG:  # bound the network waits: a stall becomes a drop
            ms = int(self._stall_s * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
            cap = cv2.VideoCapture(self._target, self._api, params)
        else:
            cap = cv2.VideoCapture(self._target, self._api)
        if not cap.isOpened():
            cap.release()
            return None
        for prop, value in self._props.items():
            cap.set(prop, value)
        # A driver-side queue would hand out old frames: ask for the smallest one.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    def open(self) -> None:
        cap = self._connect()
        if cap is None:
            raise ConfigError(f"OpenCV cannot open {self.label}")
        self._cap = cap
        self._stop.clear()
        self._thread = threading.Thread(target=self._grab, name="grab", daemon=True)
        self._thread.start()

    def _grab(self) -> None:
        cap = self._cap
        while not self._stop.is_set():
            try:
                ok, bgr = cap.read() if cap is not None else (False, None)
            except Exception as exc:  # a backend error is a dropped stream, not a dead thread
                _log_safely("warning", "source_read_failed", source=self.label, error=str(exc))
                ok, bgr = False, None
            if ok:
                with self._cond:
                    self._frame = bgr
                    self._seq += 1
                    self._ts = time.time()
                    self._cond.notify_all()
                continue
            if self._stop.is_set():
                break
            cap = self._reconnect(cap)
        if cap is not None:
            cap.release()

    def _reconnect(self, cap: Any) -> Any:
        """Release the dropped stream and reopen it with backoff; None only when stopping."""
        if cap is not None:
            cap.release()
        started = time.monotonic()
        with self._cond:
            self._down_since = started
            self._cond.notify_all()
        _log_safely("warning", "source_lost", source=self.label)
        delay = self._min_s
        attempt = 0
        while not self._stop.wait(delay):
            attempt += 1
            cap = self._connect()
            if cap is not None and self._stop.is_set():
                cap.release()  # connected as the source closed: not a reconnect anyone reads
                return None
            if cap is not None:
                now = time.monotonic()
                with self._cond:
                    self._down_total += now - started
                    self._down_since = None
                    self.reconnects += 1
                _log_safely(
                    "info",
                    "source_reconnected",
                    source=self.label,
                    gap_s=round(now - started, 3),
                    attempts=attempt,
                )
                return cap
            delay = min(self._max_s, delay * 2)
        return None

    def read(self) -> np.ndarray[Any, Any] | None:
        deadline = time.monotonic() + self._wait_s
        with self._cond:
            while self._seq == self._taken:
                left = deadline - time.monotonic()
                if self._down_since is not None:
                    down = time.monotonic() - self._down_since
                    if left <= 0:
                        raise InputError(f"{self.label} is down ({down:.1f} s); reconnecting")
                elif left <= 0:
                    raise InputError(f"no new frame from {self.label} in {self._wait_s:g} s")
                self._cond.wait(left)
            bgr = self._frame
            self._taken = seq = self._seq
            ts = self._ts
        self.frame_seq = seq
        self.frame_ts = ts
        if bgr.ndim == 2:
            return bgr  # type: ignore[no-any-return]
        rgb: np.ndarray[Any, Any] = self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB)
        return rgb

    def skip(self, count: int) -> None:
        pass  # the grab thread already drops every frame but the newest

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=10)
            self._thread = None
        self._cap = None


class SourceStatus(NamedTuple):
    """Whether a source kind can be used on this machine, and why not."""

    kind: str
    usable: bool
    detail: str


def _cv2_or_none() -> Any:
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _has_backend(cv2: Any, api: int) -> bool:
    with suppress(Exception):
        return bool(cv2.videoio_registry.hasBackend(api))
    return False


def _gstreamer_in_build(cv2: Any) -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


def video_devices(dev: Path = Path("/dev")) -> list[str]:
    """The V4L2 device nodes present (``/dev/video*``), in numeric order."""
    found = [p for p in dev.glob("video*") if p.name[5:].isdigit()]
    return [str(p) for p in sorted(found, key=lambda p: int(p.name[5:]))]


_NO_CAMERA = "no camera: no /dev/video* device"


def source_status() -> list[SourceStatus]:
    """Each ``[loop.source]`` kind and whether it can be used here (for ``edge-agent doctor``)."""
    cv2 = _cv2_or_none()
    rows = [SourceStatus("synthetic", True, "random tensors shaped from the model")]
    no_cv2 = "OpenCV is not installed: pip install opencv-python-headless"
    if cv2 is None:
        rows += [SourceStatus(k, False, no_cv2) for k in ("v4l2", "gstreamer", "url", "video")]
    else:
        devices = video_devices()
        if not _has_backend(cv2, cv2.CAP_V4L2):
            rows.append(SourceStatus("v4l2", False, "this OpenCV build has no V4L2 backend"))
        elif not devices:
            rows.append(SourceStatus("v4l2", False, _NO_CAMERA))
        else:
            rows.append(SourceStatus("v4l2", True, ", ".join(devices)))
        if _gstreamer_in_build(cv2):
            rows.append(SourceStatus("gstreamer", True, f"OpenCV {cv2.__version__} with GStreamer"))
        else:
            rows.append(
                SourceStatus(
                    "gstreamer",
                    False,
                    f"OpenCV {cv2.__version__} is built without GStreamer (JetPack's is built "
                    "with it; a pip wheel is not)",
                )
            )
        if _has_backend(cv2, cv2.CAP_FFMPEG):
            rows.append(SourceStatus("url", True, "rtsp/http through OpenCV's FFmpeg backend"))
            rows.append(SourceStatus("video", True, "files through OpenCV's FFmpeg backend"))
        else:
            why = "this OpenCV build has no FFmpeg backend"
            rows += [SourceStatus("url", False, why), SourceStatus("video", False, why)]
    decoder = "Pillow" if _has_module("PIL") else ("OpenCV" if cv2 is not None else None)
    rows.append(
        SourceStatus(
            "images",
            decoder is not None,
            f"decoded by {decoder}" if decoder else "needs Pillow or OpenCV",
        )
    )
    from agent.ros2 import bridge_status

    for kind, (usable, detail) in bridge_status().items():
        rows.append(SourceStatus(kind, usable, detail))
    rows.append(SourceStatus("callback", True, "in-process only (agent.loop.CallbackSource)"))
    return rows


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def require_source_kind(kind: str, *, device: bool = True) -> None:
    """``ConfigError`` naming why ``kind`` cannot be used here, if it cannot. ``device=False``
    asks only whether this build could use it (a camera may be plugged in later)."""
    for row in source_status():
        if row.kind != kind or row.usable:
            continue
        if not device and row.detail == _NO_CAMERA:
            return
        raise ConfigError(f"loop.source kind {kind!r} cannot be used here: {row.detail}")


def build_source(
    config: SourceConfig,
    specs: Sequence[TensorSpec],
    *,
    repeat: bool,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dynamic_size: int = 64,
) -> FrameSource:
    """The source ``[loop.source]`` describes; ``repeat`` is the default for files and folders
    whose config leaves it unset. ``ConfigError`` when the kind cannot be used here."""
    kind = config.kind
    if config.kind == "synthetic":
        return SyntheticSource(specs, shapes=shapes, dynamic_size=dynamic_size)
    if shapes:
        raise ConfigError("--shape applies to the synthetic source only")
    if config.kind == "callback":
        raise ConfigError("the callback source exists only in-process (agent.loop.CallbackSource)")
    if config.kind == "images":
        rep = repeat if config.repeat is None else config.repeat
        return ImageFolderSource(config.path, repeat=rep)
    if config.kind == "video":
        rep = repeat if config.repeat is None else config.repeat
        return VideoSource(config.path, repeat=rep)
    require_source_kind(kind)
    if config.kind == "ros2":
        from agent.ros2.source import Ros2ImageSource
        from agent.ros2.transport import default_domain_id

        domain = config.domain_id if config.domain_id is not None else default_domain_id()
        return Ros2ImageSource(
            config.topic,
            message=config.message,
            domain_id=domain,
            depth=config.qos_depth,
            wait_s=config.wait_s,
        )
    if config.kind == "rosbag":
        from agent.ros2.source import RosbagSource

        rep = repeat if config.repeat is None else config.repeat
        return RosbagSource(
            config.path, config.topic, rate=config.rate, repeat=rep, max_gap_s=config.max_gap_s
        )
    cv2 = _import_cv2(f"the {kind} source")

    def stream(target: str | int, label: str, api: int, props: dict[int, float]) -> StreamSource:
        return StreamSource(
            target,
            label=label,
            api=api,
            props=props,
            reconnect_min_s=config.reconnect_min_s,
            reconnect_max_s=config.reconnect_max_s,
            stall_timeout_s=config.stall_timeout_s,
        )

    if config.kind == "v4l2":
        device = config.device
        if isinstance(device, str) and not Path(device).exists():
            raise ConfigError(f"no camera at {device}")
        props: dict[int, float] = {}
        if config.fourcc is not None:
            props[cv2.CAP_PROP_FOURCC] = float(cv2.VideoWriter_fourcc(*config.fourcc))
        if config.width is not None:
            props[cv2.CAP_PROP_FRAME_WIDTH] = float(config.width)
        if config.height is not None:
            props[cv2.CAP_PROP_FRAME_HEIGHT] = float(config.height)
        if config.fps is not None:
            props[cv2.CAP_PROP_FPS] = float(config.fps)
        label = f"camera {device}"
        return stream(device, label, cv2.CAP_V4L2, props)
    if config.kind == "gstreamer":
        return stream(config.pipeline, "GStreamer pipeline", cv2.CAP_GSTREAMER, {})
    return stream(config.url, _redacted(config.url), cv2.CAP_FFMPEG, {})


def _redacted(url: str) -> str:
    """A URL for logs, without a password (``rtsp://user:pass@host`` -> ``rtsp://user@host``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit(parts._replace(netloc=netloc))

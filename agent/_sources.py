"""Where the inference loop's frames come from: synthetic tensors, an image folder, a video file
or camera (OpenCV), or an in-process callback.

A source yields either ready *feeds* (a mapping of input name -> array) or *frames* (HxWxC uint8
RGB arrays that ``agent._preprocess`` turns into the first input). ``read()`` returns ``None``
when the source is exhausted and raises ``InputError`` for one unusable frame (the loop counts it
and goes on). ``skip(n)`` lets the loop drop frames it is too late for, so a file source stays in
step with the target rate. Optional decoders (OpenCV, Pillow) are imported lazily and their
absence is a ``ConfigError`` naming the package. Pacing, stats and sinks belong to ``agent.loop``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "CallbackSource",
    "FrameSource",
    "ImageFolderSource",
    "SyntheticSource",
    "VideoSource",
    "synthetic_feeds",
]

Feeds = Mapping[str, np.ndarray[Any, Any]]
SourceKind = Literal["frames", "feeds"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


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

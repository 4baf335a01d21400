"""Frame preprocessing for the inference loop: HxWxC uint8 RGB frames -> a model's first input.

Owns the arithmetic declared by ``agent.contracts.manifest.Preprocessing`` (resize by stretch,
letterbox or center crop, grayscale, RGB/BGR order, ``(x * scale - mean) / std``, NCHW/NHWC
layout) and a default derived from an input spec when a
model has no manifest. Constants are folded once at construction (``x * gain - offset`` with
``gain = scale / std`` and ``offset = mean / std``) and the output buffer is reused across frames
of the same size, so a frame costs two vectorized passes and no allocation. Decoding frames is
left to ``agent._sources``; running the model to ``agent.loop``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.contracts.manifest import Preprocessing
from agent.contracts.tensors import TensorSpec
from agent.errors import ConfigError, InputError

__all__ = ["FramePreprocessor", "default_preprocessing"]

# ITU-R BT.601 luma, the weights OpenCV and Pillow use for RGB -> grey.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)
_FLOAT_TYPES = ("FP32", "FP16", "FP64")


def _image_dims(spec: TensorSpec, layout: str) -> tuple[bool, int, int, int]:
    """(has batch dim, channels, height, width) of an image input; -1 where dynamic."""
    rank = len(spec.shape)
    if rank not in (3, 4):
        raise ConfigError(
            f"input {spec.name!r} has shape {spec.shape}: frame preprocessing needs a 3-D or "
            "4-D image input"
        )
    batch = rank == 4
    dims = spec.shape[1:] if batch else spec.shape
    if layout == "NCHW":
        c, h, w = dims
    else:
        h, w, c = dims
    return batch, c, h, w


def default_preprocessing(spec: TensorSpec) -> Preprocessing:
    """What a model with no manifest gets: resize to its static H/W (if any), grey for one
    channel, pixels scaled to [0, 1], NCHW unless the last dimension looks like channels."""
    layout = "NCHW"
    if len(spec.shape) in (3, 4) and spec.shape[-1] in (1, 3) and spec.shape[-3] not in (1, 3):
        layout = "NHWC"
    _, c, h, w = _image_dims(spec, layout)
    channels = 1 if c == 1 else 3
    return Preprocessing(
        resize=(h, w) if h > 0 and w > 0 else None,
        layout=layout,  # type: ignore[arg-type]
        grayscale=channels == 1,
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
    )


class FramePreprocessor:
    """Turns one HxWxC (or HxW) uint8 RGB frame into the tensor for ``spec``.

    Raises ``ConfigError`` at construction when the declaration cannot fit the input, and
    ``InputError`` per frame when a frame cannot be used (the loop counts it as failed).
    The returned array is reused by the next call: consume it before preprocessing again.
    """

    def __init__(self, spec: TensorSpec, preprocessing: Preprocessing | None = None) -> None:
        pre = preprocessing if preprocessing is not None else default_preprocessing(spec)
        if spec.datatype not in (*_FLOAT_TYPES, "UINT8"):
            raise ConfigError(
                f"input {spec.name!r} is {spec.datatype}: frames feed FP32/FP16/FP64/UINT8 inputs"
            )
        self.spec = spec
        self.preprocessing = pre
        self._batch, c, self._h, self._w = _image_dims(spec, pre.layout)
        self._nchw = pre.layout == "NCHW"
        channels = 1 if pre.grayscale else (c if c > 0 else 3)
        if c > 0 and c != channels:  # only grayscale=true can disagree with a static C
            raise ConfigError(
                f"input {spec.name!r} has {c} channel(s) but grayscale preprocessing yields 1"
            )
        self._channels = channels
        if pre.resize is not None:
            rh, rw = pre.resize
            if rh <= 0 or rw <= 0:
                raise ConfigError(f"resize must be positive, got {pre.resize}")
            if (self._h > 0 and rh != self._h) or (self._w > 0 and rw != self._w):
                raise ConfigError(
                    f"resize {pre.resize} does not match input {spec.name!r} shape {spec.shape}"
                )
        self._resize = pre.resize
        self._fit = pre.fit
        self._pad = pre.pad
        self._bgr = pre.color == "bgr"
        mean = np.asarray(pre.mean, dtype=np.float64)
        std = np.asarray(pre.std, dtype=np.float64)
        if channels == 1:  # grey with the RGB defaults left in place: one value is meant
            mean = mean[:1] if np.all(mean == mean[0]) else mean
            std = std[:1] if np.all(std == std[0]) else std
        for label, vec in (("mean", mean), ("std", std)):
            if vec.size not in (1, channels):
                raise ConfigError(
                    f"preprocessing {label} has {vec.size} values for {channels} channel(s)"
                )
        if np.any(std == 0):
            raise ConfigError("preprocessing std must not contain zeros")
        gain = np.broadcast_to(pre.scale / std, (channels,))
        offset = np.broadcast_to(mean / std, (channels,))
        self._raw = spec.datatype == "UINT8"  # uint8 models take pixels as they are
        self._dtype = spec.dtype
        # Shaped to broadcast against the channel axis of the destination.
        shape = (channels, 1, 1) if self._nchw else (channels,)
        self._gain = gain.astype(np.float32).reshape(shape)
        self._offset = offset.astype(np.float32).reshape(shape)
        # Grey with the gain folded into the luma weights: one matmul pass.
        self._luma_gain = (_LUMA * gain[0]).astype(np.float32)
        self._luma = _LUMA.astype(np.float32)
        self._buf_hw: tuple[int, int] = (-1, -1)
        self._buf: np.ndarray[Any, Any] = np.empty(0, dtype=np.float32)
        self._out: np.ndarray[Any, Any] = self._buf
        self._resizer: Any = None

    def _buffers(self, h: int, w: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(work view without batch dim, whole tensor), allocated once per frame size."""
        if self._buf_hw != (h, w):
            c = self._channels
            inner = (c, h, w) if self._nchw else (h, w, c)
            work_dtype = np.uint8 if self._raw else np.float32
            full = np.empty(((1, *inner) if self._batch else inner), dtype=work_dtype)
            self._buf = full[0] if self._batch else full
            self._out = full
            self._buf_hw = (h, w)
        return self._buf, self._out

    def _resize_frame(self, frame: np.ndarray[Any, Any], h: int, w: int) -> np.ndarray[Any, Any]:
        if self._resizer is None:
            self._resizer = _resizer()
        out: np.ndarray[Any, Any] = self._resizer(frame, h, w)
        return out if out.ndim == 3 else out[:, :, None]

    def _fitted(self, frame: np.ndarray[Any, Any], h: int, w: int) -> np.ndarray[Any, Any]:
        """``frame`` fitted to ``h`` x ``w``: stretched, letterboxed (aspect kept, centred on
        ``pad``) or center-cropped (aspect kept, the middle of the scaled frame)."""
        if self._fit == "stretch":
            return self._resize_frame(frame, h, w)
        fh, fw = frame.shape[:2]
        if self._fit == "letterbox":
            s = min(h / fh, w / fw)
            nh, nw = max(1, min(h, round(fh * s))), max(1, min(w, round(fw * s)))
            scaled = self._resize_frame(frame, nh, nw) if (nh, nw) != (fh, fw) else frame
            if scaled.ndim == 2:
                scaled = scaled[:, :, None]
            canvas = np.full((h, w, scaled.shape[2]), self._pad, dtype=np.uint8)
            top, left = (h - nh) // 2, (w - nw) // 2
            canvas[top : top + nh, left : left + nw] = scaled
            return canvas
        s = max(h / fh, w / fw)
        nh, nw = max(h, round(fh * s)), max(w, round(fw * s))
        scaled = self._resize_frame(frame, nh, nw) if (nh, nw) != (fh, fw) else frame
        if scaled.ndim == 2:
            scaled = scaled[:, :, None]
        top, left = (nh - h) // 2, (nw - w) // 2
        return scaled[top : top + h, left : left + w]

    def __call__(self, frame: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
            got = frame.dtype if isinstance(frame, np.ndarray) else type(frame).__name__
            raise InputError(f"frame must be a uint8 array, got {got}")
        if frame.ndim == 2:
            frame = frame[:, :, None]
        elif frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
            raise InputError(f"frame must be HxW, HxWx1, HxWx3 or HxWx4, got {frame.shape}")
        if self._resize is not None and frame.shape[:2] != self._resize:
            frame = self._fitted(frame, *self._resize)
        h, w, fc = frame.shape
        if (self._h > 0 and h != self._h) or (self._w > 0 and w != self._w):
            raise InputError(
                f"frame is {h}x{w} where input {self.spec.name!r} needs "
                f"{self._h}x{self._w}; declare a resize"
            )
        buf, out = self._buffers(h, w)
        c = self._channels
        if c == 1 and fc != 1:  # RGB(A) -> grey in one matmul pass, the gain folded in
            dst = buf[0] if self._nchw else buf[:, :, 0]
            if self._raw:
                dst[...] = np.rint(frame[:, :, :3] @ self._luma)
            else:
                np.matmul(frame[:, :, :3], self._luma_gain, out=dst)
                np.subtract(buf, self._offset, out=buf)
        else:
            if fc == 4 and c == 3:
                frame = frame[:, :, :3]
            elif fc != c:
                raise InputError(f"frame has {fc} channel(s) where {c} are expected")
            if self._bgr and c == 3:
                frame = frame[:, :, ::-1]
            self._normalize(frame, buf)
        return out if self._dtype == out.dtype else out.astype(self._dtype)

    def _normalize(self, frame: np.ndarray[Any, Any], buf: np.ndarray[Any, Any]) -> None:
        src = frame.transpose(2, 0, 1) if self._nchw else frame
        if self._raw:
            buf[...] = src
            return
        np.multiply(src, self._gain, out=buf)
        np.subtract(buf, self._offset, out=buf)


def _resizer() -> Any:
    """Bilinear resize through OpenCV, else Pillow; ``ConfigError`` if neither is installed."""
    try:
        import cv2
    except ImportError:
        pass
    else:

        def cv2_resize(frame: np.ndarray[Any, Any], h: int, w: int) -> np.ndarray[Any, Any]:
            out: np.ndarray[Any, Any] = cv2.resize(frame, (w, h), interpolation=cv2.INTER_LINEAR)
            return out

        return cv2_resize
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError(
            "resizing frames needs OpenCV or Pillow (pip install opencv-python-headless)"
        ) from exc

    def pil_resize(frame: np.ndarray[Any, Any], h: int, w: int) -> np.ndarray[Any, Any]:
        img = Image.fromarray(frame[:, :, 0] if frame.shape[2] == 1 else frame)
        return np.asarray(img.resize((w, h), Image.Resampling.BILINEAR))

    return pil_resize

"""CUDA plumbing through cuda-python's runtime bindings (``cuda.bindings.runtime``).

Owns device buffers, pinned (page-locked) host buffers, streams, events, asynchronous copies, a
small size-class pool that reuses freed buffers, and the per-tensor staging (``IoBuffers``) that
native GPU runtimes need around an execution: host -> pinned -> device before it, device ->
pinned -> host after it. Every resource is a context manager and is also freed when collected.
CUDA errors become ``BackendError``; a missing cuda-python or GPU becomes
``BackendUnavailableError`` with the reason. Leaves what runs on the stream (TensorRT's
``execute_async_v3``, ONNX Runtime's CUDA provider) to the backends, and GPU telemetry to
``agent.gpu_metrics``.

cuda-python is imported on first use, so importing this module costs nothing on a CPU-only board.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from agent.errors import BackendError, BackendUnavailableError

__all__ = [
    "CAPTURE_GATE",
    "BufferPool",
    "CaptureGate",
    "DeviceBuffer",
    "Event",
    "GpuInfo",
    "HostBuffer",
    "IoBuffers",
    "Stream",
    "call",
    "compute_capability",
    "cudart",
    "device_count",
    "device_info",
    "gpu_timer",
    "memory_info",
    "require_device",
]

_BACKEND = "cuda"
_lock = threading.Lock()
_module: Any = None


def cudart() -> Any:
    """The cuda-python runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6).

    Raises ``BackendUnavailableError`` when cuda-python is not installed.
    """
    global _module  # noqa: PLW0603 - one lazily imported module per process
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                from cuda.bindings import runtime as rt
            except ImportError:
                try:
                    from cuda import cudart as rt  # cuda-python < 12.6
                except ImportError as exc:
                    raise BackendUnavailableError(
                        _BACKEND, f"cuda-python is not installed (tensorrt extra): {exc}"
                    ) from exc
            _module = rt
    return _module


def _error_name(rt: Any, err: Any) -> str:
    try:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        return f"{name.decode()} ({text.decode()})"
    except Exception:  # the name is only decoration: never hide the original failure
        return str(err)


def call(name: str, *args: Any) -> Any:
    """Call ``cudart.<name>(*args)``, raise ``BackendError`` on failure, return its value(s)."""
    rt = cudart()
    result = getattr(rt, name)(*args)
    err = result[0] if isinstance(result, tuple) else result
    if err != rt.cudaError_t.cudaSuccess:
        raise BackendError(f"cuda: {name} failed: {_error_name(rt, err)}")
    if not isinstance(result, tuple) or len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


# ---------------------------------------------------------------------------------------------
# graph capture


class CaptureGate:
    """Keeps every other CUDA call of this process out of a CUDA graph capture.

    ONNX Runtime captures in ``cudaStreamCaptureModeGlobal``: an "unsafe" call from any other
    thread during a capture (``cudaMalloc``, a synchronous ``cudaMemcpy``, a stream synchronise)
    invalidates it and fails both calls (CUDA error 900/901). A capturing run takes the gate
    ``exclusive()``; every other GPU run, load and close takes it ``shared()``, so they go on
    together and only wait for the few milliseconds of a capture. Waiting captures go first.
    Not re-entrant: never take it while holding it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._capturing = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._capturing or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._capturing or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._capturing = True
        try:
            yield
        finally:
            with self._cond:
                self._capturing = False
                self._cond.notify_all()


CAPTURE_GATE = CaptureGate()


# ---------------------------------------------------------------------------------------------
# devices


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One CUDA device as the runtime reports it."""

    index: int
    name: str
    compute_capability: str  # "major.minor", e.g. "8.7" on Orin, "9.0" on H100
    total_memory_bytes: int


_UNAVAILABLE = {
    "cudaErrorNoDevice": "no CUDA device",
    "cudaErrorInsufficientDriver": "no NVIDIA driver, or one older than the CUDA runtime",
    "cudaErrorDevicesUnavailable": "the CUDA devices are busy or unavailable",
    "cudaErrorInitializationError": "the CUDA driver failed to initialise",
}


def device_count() -> int:
    """How many CUDA devices are usable; 0 when there is no driver or no device."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        return 0
    return int(count)


def require_device(index: int = 0) -> None:
    """Raise ``BackendUnavailableError`` with the reason unless CUDA device ``index`` is usable."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1].decode()
        raise BackendUnavailableError(_BACKEND, _UNAVAILABLE.get(name, _error_name(rt, err)))
    if index >= count:
        raise BackendUnavailableError(_BACKEND, f"no CUDA device {index} ({count} found)")


def _attribute(attr: str, index: int) -> int:
    rt = cudart()
    return int(call("cudaDeviceGetAttribute", getattr(rt.cudaDeviceAttr, attr), index))


def compute_capability(index: int = 0) -> str:
    """``"major.minor"`` of device ``index``: part of every engine cache key."""
    major = _attribute("cudaDevAttrComputeCapabilityMajor", index)
    minor = _attribute("cudaDevAttrComputeCapabilityMinor", index)
    return f"{major}.{minor}"


def device_info(index: int = 0) -> GpuInfo:
    require_device(index)
    props = call("cudaGetDeviceProperties", index)
    raw = props.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return GpuInfo(
        index=index,
        name=name,
        compute_capability=compute_capability(index),
        total_memory_bytes=int(props.totalGlobalMem),
    )


def memory_info(index: int = 0) -> tuple[int, int]:
    """``(free, total)`` bytes of device memory, as the CUDA runtime sees it."""
    call("cudaSetDevice", index)
    free, total = call("cudaMemGetInfo")
    return int(free), int(total)


# ---------------------------------------------------------------------------------------------
# resources


class _Resource:
    """Something CUDA allocated: freed by ``close()``, by ``with``, or when collected."""

    _finalizer: weakref.finalize[Any, Any]

    def _own(self, free: str, handle: Any) -> None:
        self._finalizer = weakref.finalize(self, _release, free, handle)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> _Resource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _release(free: str, handle: Any) -> None:
    # Called from close() or the garbage collector: a failure here has nowhere useful to go.
    rt = _module
    if rt is not None:
        getattr(rt, free)(handle)


class Stream(_Resource):
    """A non-blocking CUDA stream; ``handle`` is what ``execute_async_v3`` and copies take."""

    def __init__(self, *, device: int = 0) -> None:
        rt = cudart()
        call("cudaSetDevice", device)
        self.stream = call("cudaStreamCreateWithFlags", rt.cudaStreamNonBlocking)
        self.handle = int(self.stream)
        self._own("cudaStreamDestroy", self.stream)

    def synchronize(self) -> None:
        call("cudaStreamSynchronize", self.stream)

    def __enter__(self) -> Stream:
        return self


class Event(_Resource):
    """A CUDA event, for ordering work between streams and timing it on the GPU."""

    def __init__(self, *, timing: bool = True) -> None:
        rt = cudart()
        flags = rt.cudaEventDefault if timing else rt.cudaEventDisableTiming
        self.event = call("cudaEventCreateWithFlags", flags)
        self._own("cudaEventDestroy", self.event)

    def record(self, stream: Stream) -> None:
        call("cudaEventRecord", self.event, stream.stream)

    def synchronize(self) -> None:
        call("cudaEventSynchronize", self.event)

    def wait_on(self, stream: Stream) -> None:
        """Make ``stream`` wait for this event without blocking the host."""
        call("cudaStreamWaitEvent", stream.stream, self.event, 0)

    def elapsed_ms(self, since: Event) -> float:
        """GPU time between ``since`` and this event (both recorded, this one completed)."""
        return float(call("cudaEventElapsedTime", since.event, self.event))

    def __enter__(self) -> Event:
        return self


def _host_array(ptr: int, nbytes: int, dtype: Any, shape: tuple[int, ...]) -> Any:
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dt.itemsize > nbytes:
        raise BackendError(f"cuda: {count * dt.itemsize} bytes do not fit a {nbytes}-byte buffer")
    raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8).view(dt)[:count].reshape(shape)


class HostBuffer(_Resource):
    """Page-locked host memory: the only kind a copy can overlap with GPU work from."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise BackendError(f"cuda: cannot allocate {nbytes} bytes")
        self.nbytes = nbytes
        self.ptr = int(call("cudaMallocHost", nbytes))
        self._own("cudaFreeHost", self.ptr)

    def array(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        """A numpy view of the first bytes of this buffer (valid until the buffer is closed)."""
        if self.closed:
            raise BackendError("cuda: host buffer is closed")
        arr: np.ndarray[Any, Any] = _host_array(self.ptr, self.nbytes, dtype, shape)
        return arr

    def __enter__(self) -> HostBuffer:
        return self


class DeviceBuffer(_Resource):
    """Device memory from ``cudaMalloc``; ``ptr`` is what tensor bindings take."""

    def __init__(self, nbytes: int, *, device: int = 0) -> None:
        if nbytes <= 0:
            raise BackendError(f"cuda: cannot allocate {nbytes} bytes")
        call("cudaSetDevice", device)
        self.nbytes = nbytes
        self.device = device
        self.ptr = int(call("cudaMalloc", nbytes))
        self._own("cudaFree", self.ptr)

    def _check(self, nbytes: int) -> None:
        if self.closed:
            raise BackendError("cuda: device buffer is closed")
        if nbytes > self.nbytes:
            raise BackendError(f"cuda: {nbytes} bytes do not fit a {self.nbytes}-byte buffer")

    def upload(self, src: np.ndarray[Any, Any] | HostBuffer, stream: Stream | None = None) -> None:
        """Copy host memory into this buffer; asynchronous on ``stream`` when ``src`` is pinned."""
        rt = cudart()
        ptr, nbytes = _host_span(src)
        self._check(nbytes)
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        if stream is None:
            call("cudaMemcpy", self.ptr, ptr, nbytes, kind)
        else:
            call("cudaMemcpyAsync", self.ptr, ptr, nbytes, kind, stream.stream)

    def download(
        self, dst: np.ndarray[Any, Any] | HostBuffer, stream: Stream | None = None
    ) -> None:
        """Copy the start of this buffer into ``dst``; synchronise ``stream`` before reading."""
        rt = cudart()
        ptr, nbytes = _host_span(dst)
        self._check(nbytes)
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if stream is None:
            call("cudaMemcpy", ptr, self.ptr, nbytes, kind)
        else:
            call("cudaMemcpyAsync", ptr, self.ptr, nbytes, kind, stream.stream)

    def fill(self, byte: int, stream: Stream | None = None) -> None:
        if self.closed:
            raise BackendError("cuda: device buffer is closed")
        if stream is None:
            call("cudaMemset", self.ptr, byte, self.nbytes)
        else:
            call("cudaMemsetAsync", self.ptr, byte, self.nbytes, stream.stream)

    def __enter__(self) -> DeviceBuffer:
        return self


def _host_span(obj: np.ndarray[Any, Any] | HostBuffer) -> tuple[int, int]:
    if isinstance(obj, HostBuffer):
        if obj.closed:
            raise BackendError("cuda: host buffer is closed")
        return obj.ptr, obj.nbytes
    if not obj.flags.c_contiguous:
        raise BackendError("cuda: host arrays must be C-contiguous to copy")
    return int(obj.ctypes.data), int(obj.nbytes)


# ---------------------------------------------------------------------------------------------
# pooling and staging


def _size_class(nbytes: int) -> int:
    """Round up to a power of two (at least 256 bytes, CUDA's allocation alignment)."""
    return max(256, 1 << max(0, nbytes - 1).bit_length())


class BufferPool:
    """Reuses freed buffers by power-of-two size class, so a steady loop allocates nothing.

    ``acquire`` hands out a buffer of at least ``nbytes``; ``release`` returns it; ``close`` frees
    every buffer the pool still holds. Idle bytes above ``max_idle_bytes`` are freed at once.
    """

    def __init__(
        self,
        allocate: Callable[[int], DeviceBuffer | HostBuffer],
        *,
        max_idle_bytes: int = 256 << 20,
    ) -> None:
        self._allocate = allocate
        self._idle: dict[int, list[DeviceBuffer | HostBuffer]] = {}
        self._idle_bytes = 0
        self._max_idle_bytes = max_idle_bytes
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def device(cls, *, device: int = 0, max_idle_bytes: int = 256 << 20) -> BufferPool:
        return cls(lambda n: DeviceBuffer(n, device=device), max_idle_bytes=max_idle_bytes)

    @classmethod
    def pinned(cls, *, max_idle_bytes: int = 64 << 20) -> BufferPool:
        return cls(HostBuffer, max_idle_bytes=max_idle_bytes)

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def acquire(self, nbytes: int) -> Any:
        size = _size_class(nbytes)
        with self._lock:
            if self._closed:
                raise BackendError("cuda: buffer pool is closed")
            bucket = self._idle.get(size)
            if bucket:
                self._idle_bytes -= size
                return bucket.pop()
        return self._allocate(size)

    def release(self, buffer: DeviceBuffer | HostBuffer) -> None:
        with self._lock:
            keep = (
                not self._closed
                and not buffer.closed
                and buffer.nbytes == _size_class(buffer.nbytes)
                and self._idle_bytes + buffer.nbytes <= self._max_idle_bytes
            )
            if keep:
                self._idle.setdefault(buffer.nbytes, []).append(buffer)
                self._idle_bytes += buffer.nbytes
        if not keep:
            buffer.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            buffers = [b for bucket in self._idle.values() for b in bucket]
            self._idle.clear()
            self._idle_bytes = 0
        for buffer in buffers:
            buffer.close()


@dataclass(slots=True)
class _Slot:
    device: DeviceBuffer
    host: HostBuffer


class IoBuffers:
    """Per-tensor device + pinned staging buffers for one execution context.

    ``upload(feeds)`` copies each array into its pinned buffer and then to the device on
    ``stream``; ``download(shapes)`` queues device -> pinned copies and, after the stream is
    synchronised, returns fresh numpy arrays. Buffers grow by size class and are reused run after
    run, so the device addresses stay fixed while shapes do (what CUDA graphs and TensorRT's
    ``set_tensor_address`` want). Not thread-safe: one per execution context, under its lock.
    """

    def __init__(self, stream: Stream, *, device: int = 0) -> None:
        self.stream = stream
        self._device = device
        self._device_pool = BufferPool.device(device=device)
        self._host_pool = BufferPool.pinned()
        self._slots: dict[str, _Slot] = {}

    def address(self, name: str, nbytes: int) -> int:
        """The device address for tensor ``name``, with room for at least ``nbytes``."""
        slot = self._slots.get(name)
        if slot is None or slot.device.nbytes < nbytes:
            if slot is not None:
                self._device_pool.release(slot.device)
                self._host_pool.release(slot.host)
            slot = _Slot(self._device_pool.acquire(nbytes), self._host_pool.acquire(nbytes))
            self._slots[name] = slot
        return slot.device.ptr

    def upload(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, int]:
        """Stage every feed on the device; returns the device address of each."""
        addresses = {}
        for name, arr in feeds.items():
            src = np.ascontiguousarray(arr)
            addresses[name] = self.address(name, max(src.nbytes, 1))
            slot = self._slots[name]
            if src.nbytes:
                staged = slot.host.array(src.dtype, src.shape)
                np.copyto(staged, src)
                rt = cudart()
                call(
                    "cudaMemcpyAsync",
                    slot.device.ptr,
                    slot.host.ptr,
                    src.nbytes,
                    rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    self.stream.stream,
                )
        return addresses

    def queue_download(self, outputs: Mapping[str, tuple[Any, tuple[int, ...]]]) -> None:
        """Queue device -> pinned copies of each ``name: (dtype, shape)`` on the stream."""
        rt = cudart()
        for name, (dtype, shape) in outputs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            slot = self._slots[name]
            if nbytes:
                call(
                    "cudaMemcpyAsync",
                    slot.host.ptr,
                    slot.device.ptr,
                    nbytes,
                    rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    self.stream.stream,
                )

    def collect(
        self, outputs: Mapping[str, tuple[Any, tuple[int, ...]]]
    ) -> dict[str, np.ndarray[Any, Any]]:
        """After ``stream.synchronize()``: copies of the pinned outputs the caller may keep."""
        return {
            name: self._slots[name].host.array(dtype, shape).copy()
            for name, (dtype, shape) in outputs.items()
        }

    def download(
        self, outputs: Mapping[str, tuple[Any, tuple[int, ...]]]
    ) -> dict[str, np.ndarray[Any, Any]]:
        self.queue_download(outputs)
        self.stream.synchronize()
        return self.collect(outputs)

    @property
    def device_bytes(self) -> int:
        return sum(s.device.nbytes for s in self._slots.values())

    def close(self) -> None:
        for slot in self._slots.values():
            slot.device.close()
            slot.host.close()
        self._slots.clear()
        self._device_pool.close()
        self._host_pool.close()


@contextmanager
def gpu_timer(stream: Stream) -> Iterator[list[float]]:
    """``with gpu_timer(stream) as ms:`` -> ``ms[0]`` is the GPU time of the work queued inside."""
    start, end = Event(), Event()
    result: list[float] = []
    try:
        start.record(stream)
        yield result
        end.record(stream)
        end.synchronize()
        result.append(end.elapsed_ms(start))
    finally:
        start.close()
        end.close()

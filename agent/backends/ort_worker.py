"""An ONNX Runtime session in a worker process of its own.

Why: creating a CUDA session holds this process's GIL in pieces of up to 8-11 ms, and releasing
one holds it 13-20 ms (ONNX Runtime's Python bindings do both under the GIL; see docs/gpu.md).
While a swap creates the next version's session and releases the old one, every Python thread
of the serving process waits, the one serving frames included. A session in a process of its
own creates, captures its CUDA graphs and is torn down under that process's GIL: the serving
process only waits on a socket (which releases its GIL) for the runs it asks for.

How: the parent (``OrtWorkerSession``) starts ``python -m agent.backends.ort_worker FD`` with
one end of a socket pair. Control messages are pickled through ``multiprocessing.connection``
(both ends are this module, on a private socket pair); tensors go through one shared-memory
region (``memfd_create``) that both map: inputs at its start, outputs after them, written and
read in place, one copy each way. Its file descriptor is handed over with ``SCM_RIGHTS``
(``multiprocessing.reduction.send_handle``), and a larger one replaces it when a run outgrows
it. Object tensors (strings) and outputs that do not fit travel pickled instead.

The worker dies with the parent (``PR_SET_PDEATHSIG``, and an end-of-file on the socket). A
worker that dies or hangs fails the run in flight with ``InferenceError`` without taking the
agent with it, and the next run starts a new worker on the same model.
The worker loads at the priority it was started with (a swap's loader runs lower) and takes the
serving process's priority back before it reports ready, where the system allows it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import mmap
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.base import Artifact, Feeds, LoadOptions, Outputs, validate_feeds
from agent.contracts.manifest import Precision
from agent.contracts.tensors import TensorSpec, numpy_dtype
from agent.errors import (
    AgentError,
    BackendUnavailableError,
    InferenceError,
    InputError,
    ModelLoadError,
)
from agent.logs import get_logger

__all__ = ["MAX_REGION_BYTES", "OrtWorkerSession", "worker_supported"]

log = get_logger(__name__)

ALIGN = 64
MAX_REGION_BYTES = 1 << 31  # 2 GiB: larger runs travel pickled (the API bounds requests anyway)
RUN_TIMEOUT_S = 120.0  # a run that takes longer: the worker is killed and the run fails
LOAD_POLL_S = 0.5  # how often a load checks that the worker is still alive
CLOSE_TIMEOUT_S = 10.0  # a closed worker that has not exited by then is killed
_PR_SET_PDEATHSIG = 1


def worker_supported() -> str | None:
    """Why sessions cannot run in a worker process here, or ``None`` when they can."""
    if not hasattr(os, "memfd_create"):
        return "no memfd_create on this platform"
    return None


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(arrays: Sequence[np.ndarray[Any, Any]], start: int) -> tuple[list[int], int]:
    """Offsets for ``arrays`` packed from ``start``, and the end."""
    offsets = []
    at = start
    for arr in arrays:
        offsets.append(at)
        at = _aligned(at + arr.nbytes)
    return offsets, at


class _Region:
    """A shared-memory region (memfd + mmap) that both processes map."""

    def __init__(self, size: int, fd: int | None = None) -> None:
        self.size = size
        if fd is None:
            fd = os.memfd_create("edgefleet-ort", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
        self.fd = fd
        self.map = mmap.mmap(fd, size)

    def view(self, dtype: str, shape: Sequence[int], offset: int) -> np.ndarray[Any, Any]:
        view: np.ndarray[Any, Any] = np.ndarray(
            tuple(shape), dtype=np.dtype(dtype), buffer=self.map, offset=offset
        )
        return view

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):  # a view still alive: GC unmaps it
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


_ERRORS: dict[str, type[AgentError]] = {
    "input": InputError,
    "inference": InferenceError,
}


def _error_reply(exc: BaseException) -> tuple[str, str, str]:
    if isinstance(exc, InputError):
        return ("error", "input", str(exc))
    if isinstance(exc, BackendUnavailableError):
        return ("error", "unavailable", exc.reason)
    if isinstance(exc, ModelLoadError):  # the parent names the model again
        message = str(exc)
        prefix = f"{exc.model}: "
        return ("error", "load", message[len(prefix) :] if message.startswith(prefix) else message)
    return ("error", "inference", f"{type(exc).__name__}: {exc}")


class OrtWorkerSession:
    """A ``Session`` whose ONNX Runtime session lives in a worker process."""

    backend = "onnxruntime"
    serves_as_loaded = True  # the worker takes the serving priority back itself: no reload
    memory_elsewhere = True  # closing frees nothing here worth a heap trim: the worker exits

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        conn: Connection,
        *,
        artifact: Artifact,
        options: LoadOptions,
        ready: dict[str, Any],
    ) -> None:
        self._process = process
        self._conn = conn
        self._artifact = artifact
        self._options = options
        self._name = artifact.name
        self.precision: Precision = artifact.precision
        self._dead = False  # the worker died: the next run starts another
        self.device: str = ready["device"]
        self.inputs: tuple[TensorSpec, ...] = tuple(ready["inputs"])
        self.outputs: tuple[TensorSpec, ...] = tuple(ready["outputs"])
        self.cuda_graph: bool = bool(ready["cuda_graph"])
        self._input_names = [s.name for s in self.inputs]
        self._lock = threading.Lock()
        self._region: _Region | None = None
        self._closed = False
        self._reaper: threading.Thread | None = None
        # Lets the worker go: on close() or a restart, or when the session is dropped unclosed.
        self._abandoned = weakref.finalize(self, _abandon, process, conn)

    @property
    def pid(self) -> int:
        return self._process.pid

    # -- starting ------------------------------------------------------------------------

    @classmethod
    def start(cls, artifact: Artifact, options: LoadOptions) -> OrtWorkerSession:
        """Start a worker, have it load ``artifact``, and return once it can serve. A load that
        fails in the worker raises here as the same class of error."""
        process, conn, ready = _spawn(artifact, options)
        return cls(process, conn, artifact=artifact, options=options, ready=ready)

    # -- running -------------------------------------------------------------------------

    def run(self, feeds: Feeds) -> Outputs:
        try:
            arrays = [np.ascontiguousarray(feeds[n]) for n in self._input_names]
        except (KeyError, TypeError, AttributeError):
            validate_feeds(self._name, self.inputs, feeds)  # raises InputError naming the tensor
            raise
        if len(feeds) != len(arrays):
            validate_feeds(self._name, self.inputs, feeds)
        with self._lock:
            if self._closed:
                raise InferenceError(f"{self._name}: session is closed")
            if self._dead:
                self._restart()
            try:
                if any(a.dtype.hasobject for a in arrays):
                    inline = dict(zip(self._input_names, arrays, strict=True))
                    self._conn.send(("run-inline", inline))
                else:
                    self._send_run(arrays)
                reply = _await_reply(self._conn, self._process, timeout=RUN_TIMEOUT_S, what="run")
            except (InferenceError, OSError) as exc:  # it died or hung (and was killed)
                self._dead = True
                log.warning("ort_worker_lost", model=self._name, pid=self.pid, reason=str(exc))
                if isinstance(exc, InferenceError):
                    raise
                code = self._process.poll()
                raise InferenceError(
                    f"onnxruntime worker {self.pid} is gone (code {code}): {exc}"
                ) from exc
            return self._outputs(reply)

    def _restart(self) -> None:
        """Replace a dead worker with a new one that loads the same model (under the lock)."""
        self._let_go()
        try:
            process, conn, _ = _spawn(self._artifact, self._options)
        except Exception as exc:
            raise InferenceError(f"{self._name}: worker restart failed: {exc}") from exc
        self._process, self._conn, self._dead = process, conn, False
        self._abandoned = weakref.finalize(self, _abandon, process, conn)
        log.warning("ort_worker_restarted", model=self._name, pid=process.pid)

    def _send_run(self, arrays: list[np.ndarray[Any, Any]]) -> None:
        offsets, end = _layout(arrays, 0)
        region = self._region
        if region is None or end > region.size:
            estimate = _aligned(end + max(end, self._static_output_bytes()))
            self._replace_region(min(max(estimate, 1 << 16), MAX_REGION_BYTES), need=end)
            region = self._region
        if region is None or end > region.size:  # larger than any region: pickled
            self._conn.send(("run-inline", dict(zip(self._input_names, arrays, strict=True))))
            return
        header = []
        for name, arr, offset in zip(self._input_names, arrays, offsets, strict=True):
            region.view(arr.dtype.str, arr.shape, offset)[...] = arr
            header.append((name, arr.dtype.str, arr.shape, offset))
        self._conn.send(("run", header, end))

    def _outputs(self, reply: tuple[Any, ...]) -> Outputs:
        kind = reply[0]
        if kind == "error":
            _, error, message = reply
            raise _ERRORS.get(error, InferenceError)(message)
        if kind == "inline":  # did not fit: the next run gets a region that holds them
            outputs: Outputs = reply[1]
            need = reply[2]
            size = 0 if self._region is None else self._region.size
            if need is not None and size < need <= MAX_REGION_BYTES:
                self._replace_region(min(_aligned(need * 5 // 4), MAX_REGION_BYTES), need=need)
            return outputs
        region = self._region
        assert region is not None
        return {name: region.view(dt, shape, off).copy() for name, dt, shape, off in reply[1]}

    def _static_output_bytes(self) -> int:
        total = 0
        for spec in self.outputs:
            if any(d < 0 for d in spec.shape):
                return 0
            total += _aligned(int(np.prod(spec.shape)) * _itemsize(spec.datatype))
        return total

    def _replace_region(self, size: int, *, need: int) -> None:
        if size < need:
            return
        region = _Region(size)
        self._conn.send(("region", size))
        send_handle(self._conn, region.fd, self._process.pid)
        old, self._region = self._region, region
        if old is not None:
            old.close()

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Ask the worker to exit and return at once: its teardown (device memory, handles)
        runs in its own process; a reaper kills it if it has not exited in time."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._reaper = self._let_go()

    def _let_go(self) -> threading.Thread | None:
        """Tell the current worker to exit, close its socket and region, and reap it in the
        background (the reaper thread); under the lock."""
        reaper: threading.Thread | None = self._abandoned()  # runs ``_abandon`` once
        if self._region is not None:
            self._region.close()
            self._region = None
        return reaper

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """After ``close``: wait until the worker has exited (its device memory is back), and
        return its exit code (``None`` if it still runs)."""
        if self._reaper is not None:
            self._reaper.join(timeout)
        return self._process.poll()


def _spawn(
    artifact: Artifact, options: LoadOptions
) -> tuple[subprocess.Popen[bytes], Connection, dict[str, Any]]:
    """A worker that has loaded ``artifact``: its process, its end of the socket, and what it
    reported (provider, tensor specs, whether CUDA graphs are captured)."""
    ours, theirs = _socketpair()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding ``agent``
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.backends.ort_worker", str(theirs)],
            pass_fds=(theirs,),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except OSError as exc:
        os.close(ours)
        raise BackendUnavailableError("onnxruntime", f"cannot start a worker: {exc}") from exc
    finally:
        os.close(theirs)
    conn = Connection(ours)
    worker_options = dataclasses.replace(
        options, ort_process="never", ort_graph_runner=False, between_frames=None
    )
    try:
        # Fields rather than the frozen, slotted dataclass: plain values unpickle on any Python.
        fields = (artifact.path, artifact.format, artifact.precision, artifact.name)
        conn.send(("load", (*fields, artifact.digest), worker_options, _serving_nice()))
        # Not held still while requests are served (``agent.backends.quiet``): on the GPU
        # machine that put 33 slow frames in the loads of 6 quiet swaps, against 3 ungated.
        reply = _await_reply(conn, process, timeout=None, what="load")
    except BaseException:
        conn.close()
        _reap(process, timeout=0)
        raise
    if reply[0] == "error":
        conn.close()
        _reap(process, timeout=CLOSE_TIMEOUT_S)
        _, kind, message = reply
        if kind == "unavailable":
            raise BackendUnavailableError("onnxruntime", message)
        raise ModelLoadError(message, model=artifact.name)
    ready: dict[str, Any] = reply[1]
    log.debug(
        "ort_worker_ready",
        model=artifact.name,
        pid=process.pid,
        provider=ready["device"],
        cuda_graph=ready["cuda_graph"],
    )
    return process, conn, ready


def _itemsize(datatype: str) -> int:
    if datatype == "BYTES":
        return 0
    return int(numpy_dtype(datatype).itemsize)


def _socketpair() -> tuple[int, int]:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours, theirs = a.detach(), b.detach()
    os.set_inheritable(theirs, True)
    return ours, theirs


def _serving_nice() -> int | None:
    """The serving process's own priority (its main thread's), for the worker to take back."""
    try:
        return os.getpriority(os.PRIO_PROCESS, os.getpid())
    except OSError:
        return None


def _await_reply(
    conn: Connection, process: subprocess.Popen[bytes], *, timeout: float | None, what: str
) -> tuple[Any, ...]:
    """The worker's answer; ``InferenceError`` when it dies first or (with ``timeout``) hangs,
    in which case it is killed."""
    waited = 0.0
    while timeout is None or waited < timeout:
        step = LOAD_POLL_S if timeout is None else min(LOAD_POLL_S, timeout - waited)
        try:
            if conn.poll(step):
                reply: tuple[Any, ...] = conn.recv()
                return reply
        except (EOFError, OSError):  # its end closed: it exited or is exiting
            try:
                code = process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                break
            raise InferenceError(
                f"onnxruntime worker {process.pid} exited (code {code}) during a {what}"
            ) from None
        waited += step
        if process.poll() is not None:
            continue  # its last words may still be in the socket: the next poll reads them
    process.kill()
    process.wait()
    raise InferenceError(f"onnxruntime worker {process.pid} did not answer a {what} in time")


def _abandon(process: subprocess.Popen[bytes], conn: Connection) -> threading.Thread:
    """Ask a worker to exit, close our end of its socket, and reap it in a thread (returned)."""
    with contextlib.suppress(OSError, ValueError):
        conn.send(("close",))
    conn.close()
    reaper = threading.Thread(
        target=_reap, args=(process, CLOSE_TIMEOUT_S), name="ort-worker-reap", daemon=True
    )
    reaper.start()
    return reaper


def _reap(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the worker's side -------------------------------------------------------------------


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _take_priority(nice: int | None) -> None:
    if nice is None:
        return
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, 0) > nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def serve(conn: Connection) -> None:
    """The worker's loop: one load, then runs until told to close or the parent goes away."""
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    try:
        _, fields, options, nice = conn.recv()
    except (EOFError, OSError):
        return
    artifact = Artifact(*fields)
    try:
        session = OnnxRuntimeBackend().load(artifact, options)
    except Exception as exc:
        conn.send(_error_reply(exc))
        return
    _take_priority(nice)
    conn.send(
        (
            "ready",
            {
                "device": session.device,
                "inputs": list(session.inputs),
                "outputs": list(session.outputs),
                "cuda_graph": bool(getattr(session, "cuda_graph", False)),
            },
        )
    )
    region: _Region | None = None
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "close":
                return
            if kind == "region":
                fd = recv_handle(conn)
                if region is not None:
                    region.close()
                region = _Region(message[1], fd)
                continue
            try:
                if kind == "run-inline":
                    outputs = session.run(message[1])
                else:
                    assert region is not None
                    feeds = {n: region.view(dt, shape, off) for n, dt, shape, off in message[1]}
                    outputs = session.run(feeds)
                    del feeds
            except Exception as exc:
                conn.send(_error_reply(exc))
                continue
            conn.send(_output_reply(outputs, region, message[2] if kind == "run" else None))
    finally:
        session.close()
        if region is not None:
            region.close()


def _output_reply(outputs: Outputs, region: _Region | None, start: int | None) -> tuple[Any, ...]:
    arrays = list(outputs.values())
    offsets, end = _layout(arrays, start or 0)
    if start is None:  # the inputs came pickled: so do the outputs
        return ("inline", outputs, None)
    if region is None or any(a.dtype.hasobject for a in arrays) or end > region.size:
        return ("inline", outputs, end)
    header = []
    for (name, out), offset in zip(outputs.items(), offsets, strict=True):
        arr = np.ascontiguousarray(out)
        region.view(arr.dtype.str, arr.shape, offset)[...] = arr
        header.append((name, arr.dtype.str, arr.shape, offset))
    return ("ok", header)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this one stops
    from agent.logs import configure_logging

    configure_logging(os.environ.get("EDGEFLEET_LOG_LEVEL", "warning"))
    conn = Connection(int(args[0]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()

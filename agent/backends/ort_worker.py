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
The worker loads at the priority of the thread that asked for the load (a swap's loader runs
lower) and takes the serving process's priority back before it reports ready, where the system
allows it.

A closed session's worker releases its model and is kept as the spare (one at most,
``LoadOptions.ort_spare_worker``): the next load runs in it, so a swap neither creates nor tears
down a CUDA context beside the one that serves. Workers are started from one long-lived thread:
the parent-death signal follows the thread that started a process, and a loader or request
thread may end while its worker serves on.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import gc
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

import numpy as np

from agent.backends.base import Artifact, Feeds, LoadOptions, Outputs, Session, validate_feeds
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

__all__ = ["MAX_REGION_BYTES", "OrtWorkerSession", "spare_pids", "worker_supported"]

log = get_logger(__name__)

ALIGN = 64
MAX_REGION_BYTES = 1 << 31  # 2 GiB: larger runs travel pickled (the API bounds requests anyway)
RUN_TIMEOUT_S = 120.0  # a run that takes longer: the worker is killed and the run fails
LOAD_POLL_S = 0.5  # how often a load checks that the worker is still alive
CLOSE_TIMEOUT_S = 10.0  # a closed worker that has not exited (or released its model) is killed
MAX_SPARES = 1  # idle workers kept for the next load
SPARE_WAIT_S = 5.0  # a load waits this long for a worker still releasing its model
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


@dataclasses.dataclass(eq=False)
class _Worker:
    """A worker process and our end of its socket."""

    process: subprocess.Popen[bytes]
    conn: Connection
    healthy: bool = True  # false once it died or hung: never kept as the spare


class OrtWorkerSession:
    """A ``Session`` whose ONNX Runtime session lives in a worker process."""

    backend = "onnxruntime"
    serves_as_loaded = True  # the worker takes the serving priority back itself: no reload
    memory_elsewhere = True  # closing frees nothing here worth a heap trim: the worker's memory

    def __init__(
        self,
        worker: _Worker,
        *,
        artifact: Artifact,
        options: LoadOptions,
        ready: dict[str, Any],
    ) -> None:
        self._worker = worker
        self._artifact = artifact
        self._options = options
        self._name = artifact.name
        self.precision: Precision = artifact.precision
        self.device: str = ready["device"]
        self.inputs: tuple[TensorSpec, ...] = tuple(ready["inputs"])
        self.outputs: tuple[TensorSpec, ...] = tuple(ready["outputs"])
        self.cuda_graph: bool = bool(ready["cuda_graph"])
        self._input_names = [s.name for s in self.inputs]
        self._lock = threading.Lock()
        self._region: _Region | None = None
        self._closed = False
        self._releaser: threading.Thread | None = None
        # Lets the worker go: on close() or a restart, or when the session is dropped unclosed.
        self._abandoned = weakref.finalize(
            self, _let_go, worker, options.ort_spare_worker, options.ort_release_delay_s
        )

    @property
    def pid(self) -> int:
        return self._worker.process.pid

    @property
    def _process(self) -> subprocess.Popen[bytes]:
        return self._worker.process

    # -- starting ------------------------------------------------------------------------

    @classmethod
    def start(cls, artifact: Artifact, options: LoadOptions) -> OrtWorkerSession:
        """Have a worker (the spare, or a new one) load ``artifact``, and return once it can
        serve. A load that fails in the worker raises here as the same class of error."""
        worker, ready = _worker_with(artifact, options)
        return cls(worker, artifact=artifact, options=options, ready=ready)

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
            worker = self._worker
            if not worker.healthy:
                worker = self._restart()
            try:
                if any(a.dtype.hasobject for a in arrays):
                    inline = dict(zip(self._input_names, arrays, strict=True))
                    worker.conn.send(("run-inline", inline))
                else:
                    self._send_run(arrays)
                reply = _await_reply(worker, timeout=RUN_TIMEOUT_S, what="run")
            except (InferenceError, OSError) as exc:  # it died or hung (and was killed)
                worker.healthy = False
                log.warning("ort_worker_lost", model=self._name, pid=self.pid, reason=str(exc))
                if isinstance(exc, InferenceError):
                    raise
                # The request could not be sent: its end is closed, so it exited or is exiting
                # (said as _await_reply says it, whichever of the two noticed first).
                try:
                    code: int | None = worker.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                raise InferenceError(
                    f"onnxruntime worker {self.pid} exited (code {code}) during a run: {exc}"
                ) from exc
            return self._outputs(reply)

    def _restart(self) -> _Worker:
        """Replace a dead worker with one that loads the same model (under the lock)."""
        self._let_go()
        try:
            worker, _ = _worker_with(self._artifact, self._options)
        except Exception as exc:
            raise InferenceError(f"{self._name}: worker restart failed: {exc}") from exc
        self._worker = worker
        self._abandoned = weakref.finalize(
            self,
            _let_go,
            worker,
            self._options.ort_spare_worker,
            self._options.ort_release_delay_s,
        )
        log.warning("ort_worker_restarted", model=self._name, pid=worker.process.pid)
        return worker

    def _send_run(self, arrays: list[np.ndarray[Any, Any]]) -> None:
        offsets, end = _layout(arrays, 0)
        region = self._region
        if region is None or end > region.size:
            estimate = _aligned(end + max(end, self._static_output_bytes()))
            self._replace_region(min(max(estimate, 1 << 16), MAX_REGION_BYTES), need=end)
            region = self._region
        if region is None or end > region.size:  # larger than any region: pickled
            inline = dict(zip(self._input_names, arrays, strict=True))
            self._worker.conn.send(("run-inline", inline))
            return
        header = []
        for name, arr, offset in zip(self._input_names, arrays, offsets, strict=True):
            region.view(arr.dtype.str, arr.shape, offset)[...] = arr
            header.append((name, arr.dtype.str, arr.shape, offset))
        self._worker.conn.send(("run", header, end))

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
        self._worker.conn.send(("region", size))
        send_handle(self._worker.conn, region.fd, self._worker.process.pid)
        old, self._region = self._region, region
        if old is not None:
            old.close()

    # -- closing -------------------------------------------------------------------------

    def close(self) -> None:
        """Let the worker go and return at once: it releases the model in its own process
        (device memory, handles) and stays as the spare, or exits; a thread in the background
        waits for that and kills a worker that takes too long."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._releaser = self._let_go()

    def _let_go(self) -> threading.Thread | None:
        """Let the current worker go (the finalizer's ``_let_go``), and close our region;
        under the lock."""
        releaser: threading.Thread | None = self._abandoned()  # runs ``_let_go`` once
        if self._region is not None:
            self._region.close()
            self._region = None
        return releaser

    def wait_released(self, timeout: float | None = None) -> bool:
        """After ``close``: wait until the worker has let the model go (its device memory is
        back), kept as the spare or exited. Whether it has."""
        if self._releaser is not None:
            self._releaser.join(timeout)
            return not self._releaser.is_alive()
        return self._closed

    def wait_exit(self, timeout: float | None = None) -> int | None:
        """After ``close`` of a session whose worker is not kept: wait until the worker has
        exited, and return its exit code (``None`` if it still runs or was kept)."""
        self.wait_released(timeout)
        return self._worker.process.poll()


class _Spares:
    """Idle workers, their model released, kept for the next load (``MAX_SPARES`` at most),
    and the count of workers releasing a model on their way to becoming one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._releasing = 0

    def take(self, wait_s: float) -> _Worker | None:
        """An idle worker; while none is idle but one is releasing its model, wait for it up
        to ``wait_s`` (a release takes tens of milliseconds, a new worker a second or more)."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.process.poll() is None:
                        return worker
                    worker.conn.close()  # it died while idle
                left = deadline - time.monotonic()
                if self._releasing == 0 or left <= 0:
                    return None
                self._cond.wait(left)

    def releasing(self) -> None:
        with self._cond:
            self._releasing += 1

    def released(self, worker: _Worker | None) -> bool:
        """A release is over: ``worker`` (when it released its model) becomes a spare if
        there is room. Whether it did."""
        with self._cond:
            self._releasing -= 1
            kept = worker is not None and len(self._idle) < MAX_SPARES
            if kept:
                assert worker is not None
                self._idle.append(worker)
            self._cond.notify_all()
            return kept

    def pids(self) -> list[int]:
        with self._cond:
            return [w.process.pid for w in self._idle]

    def close(self) -> None:
        """At exit: tell the idle workers to exit, and reap them."""
        with self._cond:
            idle, self._idle = self._idle, []
        for worker in idle:
            _close(worker, timeout=1.0)


_SPARES = _Spares()
atexit.register(_SPARES.close)


def spare_pids() -> list[int]:
    """The process ids of the idle workers kept for the next load."""
    return _SPARES.pids()


def _worker_with(artifact: Artifact, options: LoadOptions) -> tuple[_Worker, dict[str, Any]]:
    """A worker that has loaded ``artifact`` (the spare when there is one), and what it
    reported: provider, tensor specs, whether CUDA graphs are captured."""
    if options.ort_spare_worker:
        spare = _SPARES.take(wait_s=SPARE_WAIT_S)
        if spare is not None:
            try:
                return spare, _load_in(spare, artifact, options)
            except (InferenceError, ModelLoadError, BackendUnavailableError) as exc:
                # It died, or could not load: a new worker tries, so that a spare whose
                # runtime state went bad (a CUDA context after a fault) fails no good model.
                log.info("ort_spare_failed", model=artifact.name, reason=str(exc))
    worker = _start_worker()
    return worker, _load_in(worker, artifact, options)


def _load_in(worker: _Worker, artifact: Artifact, options: LoadOptions) -> dict[str, Any]:
    """Have ``worker`` load ``artifact``. On any failure the worker is gone (it exits after a
    load it could not do) and the error is raised as its own class."""
    worker_options = dataclasses.replace(
        options, ort_process="never", ort_graph_runner=False, between_frames=None
    )
    try:
        # Fields rather than the frozen, slotted dataclass: plain values unpickle on any Python.
        fields = (artifact.path, artifact.format, artifact.precision, artifact.name)
        load_nice = _thread_nice()
        worker.conn.send(
            ("load", (*fields, artifact.digest), worker_options, load_nice, _serving_nice())
        )
        # Not held still while requests are served (``agent.backends.quiet``): on the GPU
        # machine that put 33 slow frames in the loads of 6 quiet swaps, against 3 ungated.
        reply = _await_reply(worker, timeout=None, what="load")
    except OSError as exc:  # its socket is closed: it is gone
        _close(worker, timeout=0)
        raise InferenceError(f"onnxruntime worker {worker.process.pid} is gone: {exc}") from exc
    except BaseException:
        _close(worker, timeout=0)
        raise
    if reply[0] == "error":
        _close(worker, timeout=CLOSE_TIMEOUT_S)
        _, kind, message = reply
        if kind == "unavailable":
            raise BackendUnavailableError("onnxruntime", message)
        raise ModelLoadError(message, model=artifact.name)
    ready: dict[str, Any] = reply[1]
    log.debug(
        "ort_worker_ready",
        model=artifact.name,
        pid=worker.process.pid,
        provider=ready["device"],
        cuda_graph=ready["cuda_graph"],
    )
    return ready


# One long-lived thread starts every worker: a worker's parent-death signal fires when the thread
# that started it ends (prctl(2)), and loader and request threads come and go.
_STARTER = concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="ort-worker-start"
)


def _start_worker() -> _Worker:
    return _STARTER.submit(_popen_worker).result()


def _popen_worker() -> _Worker:
    ours, theirs = _socketpair()
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding ``agent``
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.backends.ort_worker", str(theirs), str(os.getpid())],
            pass_fds=(theirs,),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except OSError as exc:
        os.close(ours)
        raise BackendUnavailableError("onnxruntime", f"cannot start a worker: {exc}") from exc
    finally:
        os.close(theirs)
    return _Worker(process, Connection(ours))


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


def _thread_nice() -> int | None:
    """The calling thread's priority (Linux: ``PRIO_PROCESS`` 0 names the calling thread)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except OSError:
        return None


def _await_reply(worker: _Worker, *, timeout: float | None, what: str) -> tuple[Any, ...]:
    """The worker's answer; ``InferenceError`` when it dies first or (with ``timeout``) hangs,
    in which case it is killed."""
    conn, process = worker.conn, worker.process
    waited = 0.0
    while timeout is None or waited < timeout:
        step = LOAD_POLL_S if timeout is None else min(LOAD_POLL_S, timeout - waited)
        try:
            if conn.poll(step):
                reply: tuple[Any, ...] = conn.recv()
                return reply
        except (EOFError, OSError):  # its end closed: it exited or is exiting
            worker.healthy = False
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
    worker.healthy = False
    process.kill()
    process.wait()
    raise InferenceError(f"onnxruntime worker {process.pid} did not answer a {what} in time")


def _let_go(worker: _Worker, keep: bool, delay_s: float = 0.0) -> threading.Thread:
    """Let a session's worker go, in a thread (returned): ``delay_s`` later (a live worker) it
    releases its model and becomes the spare when ``keep`` and there is room, or is told to
    exit and reaped."""
    alive = worker.healthy and worker.process.poll() is None
    keep = keep and alive
    if keep:
        _SPARES.releasing()  # a load from now on waits for this one rather than start another
    thread = threading.Thread(
        target=_release,
        args=(worker, keep, delay_s if alive else 0.0),
        name="ort-worker-release",
        daemon=True,
    )
    thread.start()
    return thread


def _release(worker: _Worker, keep: bool, delay_s: float = 0.0) -> None:
    if delay_s > 0:
        # After a swap the next version's worker has just started serving: a release (device
        # memory, cuDNN/cuBLAS handles and CUDA graphs freed) in this worker at that moment
        # slowed its first frames, and one a few hundred ms later hardly any.
        time.sleep(delay_s)
    if keep:
        reply: tuple[Any, ...] = ("lost",)
        try:
            worker.conn.send(("release",))
            reply = _await_reply(worker, timeout=CLOSE_TIMEOUT_S, what="release")
        except (InferenceError, OSError, ValueError):
            pass
        finally:
            kept = _SPARES.released(worker if reply == ("released",) else None)
        if kept:
            log.debug("ort_worker_spare", pid=worker.process.pid)
            return
    _close(worker, timeout=CLOSE_TIMEOUT_S)


def _close(worker: _Worker, timeout: float) -> None:
    """Tell a worker to exit, close our end of its socket, and reap it (killed after
    ``timeout``)."""
    with contextlib.suppress(OSError, ValueError):
        worker.conn.send(("close",))
    worker.conn.close()
    _reap(worker.process, timeout)


def _reap(process: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the worker's side -------------------------------------------------------------------


def _die_with_parent(parent: int | None) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # it died before the signal was set
        os._exit(1)


def _set_priority(nice: int | None, *, lower_only: bool) -> None:
    """Take ``nice`` for this process's loading thread (lowering is always allowed; raising
    needs root or ``RLIMIT_NICE``)."""
    if nice is None:
        return
    with contextlib.suppress(OSError):
        now = os.getpriority(os.PRIO_PROCESS, 0)
        if (now < nice) if lower_only else (now > nice):
            os.setpriority(os.PRIO_PROCESS, 0, nice)


def serve(conn: Connection) -> None:
    """The worker's loop: load a model, answer runs until told to release it (then wait for
    the next load) or to close, or until the parent goes away."""
    from agent.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] != "load":  # "close"
            return
        _, fields, options, load_nice, nice = message
        _set_priority(load_nice, lower_only=True)
        try:
            session = backend.load(Artifact(*fields), options)
        except Exception as exc:
            conn.send(_error_reply(exc))
            return
        _set_priority(nice, lower_only=False)
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
        if not _serve_session(conn, session):
            return
        from agent.models.loaded import return_freed_memory

        gc.collect()
        return_freed_memory()
        conn.send(("released",))


def _serve_session(conn: Connection, session: Session) -> bool:
    """Answer runs on ``session`` and close it; whether the parent asked for a release (rather
    than a close, or going away)."""
    region: _Region | None = None
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return False
            kind = message[0]
            if kind in ("close", "release"):
                return bool(kind == "release")
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
    _die_with_parent(int(args[1]) if len(args) > 1 else None)
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

"""Background child processes held still while a request is served.

A quiet swap compiles an OpenVINO model in a child process at nice 19 (``background_load``), so
the compile does not share the serving process. It still shared the machine: on 2 CPUs, frames
that overlapped the child (Python and OpenVINO starting, then the compile: about 0.4 s) took a
fifth longer, with a core to themselves, because the two cores share caches and memory
bandwidth. Niceness orders threads on one core; it does nothing for the core next door.

``ChildGate`` runs such children and stops them (SIGSTOP) while any request is in flight,
continuing them (SIGCONT) when the last one ends, so their work falls between frames as the
loader's in-process work already does. A child is never held longer than ``max_hold_s`` at a
time: after that it runs at least ``min_run_s`` whatever is served, so a saturated server still
finishes its swap (about a third of the time at worst, instead of never).

The gate is process-wide (``GATE``): every slot's requests hold every background child, since
any of them competes with any frame. Where signals cannot stop a child (not POSIX), children
run ungated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

__all__ = ["GATE", "ChildGate"]

MAX_HOLD_S = 0.1  # the longest a child is held stopped at a time
MIN_RUN_S = 0.05  # then the least it runs before it may be held again

_CAN_STOP = hasattr(signal, "SIGSTOP")
_NOTHING_TO_HOLD: AbstractContextManager[None] = nullcontext()


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    stopped_at: float | None = None
    free_until: float = 0.0  # not held before this (after a forced run)


class ChildGate:
    def __init__(
        self,
        *,
        max_hold_s: float = MAX_HOLD_S,
        min_run_s: float = MIN_RUN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_hold_s = max_hold_s
        self.min_run_s = min_run_s
        self._clock = clock
        self._lock = threading.Lock()
        self._busy = 0
        self._children: dict[int, _Child] = {}
        self._wake = threading.Condition(self._lock)
        self._watcher: threading.Thread | None = None

    # -- the serving side ----------------------------------------------------------------

    def serving(self) -> AbstractContextManager[None]:
        """Around one request: background children stand still until the last one ends. With
        no child (nearly always) a shared no-op, so the inference path pays one check."""
        return self._serving() if self._children else _NOTHING_TO_HOLD

    @contextmanager
    def _serving(self) -> Iterator[None]:
        with self._lock:
            self._busy += 1
            if self._busy == 1:
                self._hold_all()
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                if self._busy == 0:
                    self._release_all()

    # -- the background side -------------------------------------------------------------

    def run(self, args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[bytes]:
        """``subprocess.run(args, capture_output=True, timeout=timeout)``, gated (a stopped
        child is killed on timeout all the same: SIGKILL needs no SIGCONT)."""
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        child = _Child(process)
        with self._lock:
            self._children[process.pid] = child
            if self._busy:
                self._hold(child, self._clock())
            self._start_watcher()
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        finally:
            with self._lock:
                self._children.pop(process.pid, None)
        return subprocess.CompletedProcess(args, process.returncode, out, err)

    # -- under the lock ------------------------------------------------------------------

    def _hold_all(self) -> None:
        now = self._clock()
        for child in self._children.values():
            self._hold(child, now)
        self._wake.notify_all()

    def _release_all(self) -> None:
        for child in self._children.values():
            self._continue(child)

    def _hold(self, child: _Child, now: float) -> None:
        if not _CAN_STOP or child.stopped_at is not None or now < child.free_until:
            return
        if _signal(child.process, signal.SIGSTOP):
            child.stopped_at = now

    def _continue(self, child: _Child) -> None:
        if child.stopped_at is None:
            return
        child.stopped_at = None
        _signal(child.process, signal.SIGCONT)

    def _start_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="child-gate", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """Continue any child held past ``max_hold_s``; re-hold it after ``min_run_s`` if
        requests are still in flight. Ends when no child is left."""
        with self._lock:
            while self._children:
                now = self._clock()
                wait = self.max_hold_s
                for child in self._children.values():
                    if child.stopped_at is not None:
                        due = child.stopped_at + self.max_hold_s
                        if now >= due:
                            self._continue(child)
                            child.free_until = now + self.min_run_s
                        else:
                            wait = min(wait, due - now)
                    elif self._busy and now >= child.free_until:
                        self._hold(child, now)
                    elif self._busy:
                        wait = min(wait, child.free_until - now)
                self._wake.wait(max(wait, 0.001))
            self._watcher = None


def _signal(process: subprocess.Popen[bytes], sig: int) -> bool:
    if process.poll() is not None:
        return False
    try:
        os.kill(process.pid, sig)
    except ProcessLookupError:
        return False
    return True


GATE = ChildGate()

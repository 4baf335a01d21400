"""ONNX Runtime sessions in a worker process (``agent.backends.ort_worker``), on real models
with the CPU provider (``ort_process="always"``); the GPU tests run the same class on CUDA."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from agent.backends import Artifact, LoadOptions
from agent.backends.onnxruntime import OnnxRuntimeBackend, OrtSession
from agent.backends.ort_worker import OrtWorkerSession, spare_pids, worker_supported
from agent.config import BackendConfig
from agent.errors import InferenceError, InputError, ModelLoadError
from agent.models.slots import load_options_from
from agent.samples import DigitsData

pytestmark = pytest.mark.skipif(worker_supported() is not None, reason=str(worker_supported()))

# Workers that exit when their session closes; SPARE keeps one for the next load (the default).
WORKER = LoadOptions(ort_process="always", intra_op_threads=1, ort_spare_worker=False)
SPARE = LoadOptions(ort_process="always", intra_op_threads=1)
HERE = LoadOptions(ort_process="never", intra_op_threads=1)


def _load(path: Path, options: LoadOptions, name: str = "m") -> Any:
    return OnnxRuntimeBackend().load(Artifact(path, name=name), options)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_session_answers_as_the_session_here(digits_path: Path, digits: DigitsData) -> None:
    worker = _load(digits_path, WORKER, "digits")
    here = _load(digits_path, HERE, "digits")
    try:
        assert isinstance(worker, OrtWorkerSession)
        assert isinstance(here, OrtSession)
        assert worker.pid != os.getpid()
        assert _alive(worker.pid)
        assert worker.device == "CPUExecutionProvider"
        assert worker.inputs == here.inputs
        assert worker.outputs == here.outputs
        for batch in (1, 8, 3, 64, 1):  # shapes change: the region grows when it must
            x = digits.x_test[:batch]
            got = worker.run({"input": x})
            want = here.run({"input": x})
            assert got.keys() == want.keys()
            np.testing.assert_array_equal(got["logits"], want["logits"])
            got["logits"][:] = 0  # the caller owns what it got: the next run is unaffected
    finally:
        worker.close()
        here.close()
    assert worker.wait_exit(10) == 0
    with pytest.raises(InferenceError, match="closed"):
        worker.run({"input": digits.x_test[:1]})


def test_detector_maps_through_shared_memory(ppocr_path: Path) -> None:
    """Outputs whose size only a run tells (dynamic height and width) come back whole, the
    first pickled, then through a region grown to hold them."""
    worker = _load(ppocr_path, WORKER, "ppocr")
    here = _load(ppocr_path, HERE, "ppocr")
    rng = np.random.default_rng(0)
    try:
        for h, w in ((64, 96), (64, 96), (160, 224), (32, 32)):
            x = rng.random((1, 3, h, w), dtype=np.float32)
            got = next(iter(worker.run({"x": x}).values()))
            want = next(iter(here.run({"x": x}).values()))
            assert got.shape == want.shape == (1, 1, h, w)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    finally:
        worker.close()
        here.close()


def test_bad_inputs_fail_as_themselves_and_the_worker_serves_on(
    digits_path: Path, digits: DigitsData
) -> None:
    worker = _load(digits_path, WORKER, "digits")
    x = digits.x_test[:2]
    try:
        with pytest.raises(InputError, match="unknown input"):
            worker.run({"input": x, "extra": x})
        with pytest.raises(InputError, match="missing input"):
            worker.run({})
        with pytest.raises(InputError, match="shape"):
            worker.run({"input": x[..., :3]})
        with pytest.raises(InputError, match=r"FP64|datatype|type"):
            worker.run({"input": x.astype(np.float64)})
        assert worker.run({"input": x})["logits"].shape == (2, 10)
    finally:
        worker.close()


@pytest.mark.parametrize("found", ["at once", "socket released"])
def test_a_worker_that_dies_fails_one_run_and_the_next_starts_another(
    digits_path: Path, digits: DigitsData, found: str
) -> None:
    """Killed, the worker fails the next run, whether that run is sent before Linux releases
    the dead worker's socket (no answer comes) or after (the send itself fails): the same
    error, and the run after it starts another worker."""
    worker = _load(digits_path, WORKER, "digits")
    x = digits.x_test[:2]
    want = worker.run({"input": x})["logits"]
    first = worker.pid
    try:
        os.kill(first, signal.SIGKILL)
        if found == "socket released":
            deadline = time.monotonic() + 10
            while psutil.Process(first).status() != psutil.STATUS_ZOMBIE:  # dead, not reaped
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.3)  # Linux releases a dead process's sockets a moment after it exits
        with pytest.raises(InferenceError, match=r"exited \(code -9\) during a run"):
            worker.run({"input": x})
        np.testing.assert_array_equal(worker.run({"input": x})["logits"], want)
        assert worker.pid != first
        assert _alive(worker.pid)
        os.kill(worker.pid, signal.SIGKILL)  # and again: each death costs one run
        with pytest.raises(InferenceError):
            worker.run({"input": x})
        np.testing.assert_array_equal(worker.run({"input": x})["logits"], want)
    finally:
        worker.close()
    assert worker.wait_exit(10) == 0


def test_a_model_the_runtime_refuses_fails_the_load_and_leaves_no_worker(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a model" * 100)
    before = _children()
    with pytest.raises(ModelLoadError, match=r"^bad: (?!bad: )\S") as info:
        _load(bad, WORKER, "bad")
    assert info.value.model == "bad"
    deadline = time.monotonic() + 10
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - before


def _children() -> set[int]:
    """This process's live children (zombies have exited)."""
    found = set()
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
    return found


def test_a_hung_worker_fails_the_run_in_bounded_time(
    digits_path: Path, digits: DigitsData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.backends.ort_worker as ort_worker

    monkeypatch.setattr(ort_worker, "RUN_TIMEOUT_S", 1.0)
    worker = _load(digits_path, WORKER, "digits")
    try:
        os.kill(worker.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(InferenceError, match="did not answer a run"):
            worker.run({"input": digits.x_test[:1]})
        assert time.monotonic() - started < 10
        assert worker._process.poll() is not None  # killed, not left stopped
    finally:
        worker.close()


def test_concurrent_callers_each_get_their_own_answer(
    digits_path: Path, digits: DigitsData
) -> None:
    worker = _load(digits_path, WORKER, "digits")
    here = _load(digits_path, HERE, "digits")
    wrong: list[int] = []

    def call(i: int) -> None:
        for k in range(20):
            x = digits.x_test[i * 7 + k : i * 7 + k + 1 + (i + k) % 5]
            got = worker.run({"input": x})["logits"]
            if not np.array_equal(got, here.run({"input": x})["logits"]):
                wrong.append(i)

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        worker.close()
        here.close()
    assert not wrong


def test_a_session_dropped_without_close_does_not_leave_its_worker(digits_path: Path) -> None:
    worker = _load(digits_path, WORKER, "digits")
    process = worker._process
    del worker
    gc.collect()
    assert process.wait(timeout=10) == 0


def _released(session: OrtWorkerSession) -> None:
    assert session.wait_released(10)


def test_a_closed_session_leaves_its_worker_for_the_next_load(
    digits_path: Path, ppocr_path: Path, digits: DigitsData
) -> None:
    """The worker of a closed session releases its model and loads the next one (another
    model here); one spare at most: a second closed session's worker exits."""
    x = digits.x_test[:3]
    first = _load(digits_path, SPARE, "digits")
    want = first.run({"input": x})["logits"]
    pid = first.pid
    first.close()
    _released(first)
    assert pid in spare_pids()
    assert _alive(pid)
    second = _load(ppocr_path, SPARE, "ppocr")
    third = _load(digits_path, SPARE, "digits")
    try:
        assert second.pid == pid  # the spare loaded it
        assert pid not in spare_pids()
        assert third.pid != pid
        y = np.random.default_rng(0).random((1, 3, 64, 96), dtype=np.float32)
        assert next(iter(second.run({"x": y}).values())).shape == (1, 1, 64, 96)
        np.testing.assert_array_equal(third.run({"input": x})["logits"], want)
    finally:
        second.close()
        third.close()
    _released(second)
    _released(third)
    assert len(spare_pids()) == 1
    exited = second if second.pid not in spare_pids() else third
    assert exited._process.poll() == 0


def test_a_retired_worker_lets_its_model_go_after_the_release_delay(
    digits_path: Path, digits: DigitsData
) -> None:
    """``backends.ort_release_delay_s``: the worker of a closed session keeps its model that
    long (the next version's worker serves its first frames meanwhile), then becomes the
    spare; a load that comes during the delay waits for it rather than start another worker."""
    config = BackendConfig(ort_process="always", intra_op_threads=1, ort_release_delay_s=1.0)
    options = load_options_from(config)
    assert options.ort_release_delay_s == 1.0
    first = _load(digits_path, options, "digits")
    pid = first.pid
    closed = time.monotonic()
    first.close()
    assert not first.wait_released(0.4)
    assert pid not in spare_pids()
    second = _load(digits_path, options, "digits")
    try:
        assert second.pid == pid
        assert time.monotonic() - closed >= 1.0
        x = digits.x_test[:2]
        assert second.run({"input": x})["logits"].shape == (2, 10)
    finally:
        second.close()
    _released(second)
    assert pid in spare_pids()


def test_a_spare_that_died_idle_is_replaced_at_the_next_load(
    digits_path: Path, digits: DigitsData
) -> None:
    first = _load(digits_path, SPARE, "digits")
    first.close()
    _released(first)
    for pid in spare_pids():
        os.kill(pid, signal.SIGKILL)
    dead = first.pid
    second = _load(digits_path, SPARE, "digits")
    try:
        assert second.pid != dead
        assert second.run({"input": digits.x_test[:2]})["logits"].shape == (2, 10)
    finally:
        second.close()
    _released(second)


def test_a_spare_refusing_a_model_fails_the_load_as_itself(
    digits_path: Path, tmp_path: Path, digits: DigitsData
) -> None:
    first = _load(digits_path, SPARE, "digits")
    first.close()
    _released(first)
    spare = spare_pids()
    before = _children()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a model" * 100)
    with pytest.raises(ModelLoadError, match=r"^bad: "):
        _load(bad, SPARE, "bad")  # the spare tries, then a new worker: both exit
    deadline = time.monotonic() + 10
    while _children() - (before - set(spare)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - (before - set(spare))
    again = _load(digits_path, SPARE, "digits")  # a new worker, since those exited
    try:
        assert again.run({"input": digits.x_test[:1]})["logits"].shape == (1, 10)
    finally:
        again.close()


def test_a_worker_loaded_from_a_thread_that_ended_serves_on(
    digits_path: Path, digits: DigitsData
) -> None:
    """The parent-death signal follows the thread that started a process: workers are started
    from one long-lived thread, so a loader thread that ends takes no worker with it."""
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(_load(digits_path, WORKER, "digits")))
    thread.start()
    thread.join()
    worker = got[0]
    try:
        time.sleep(0.5)
        assert _alive(worker.pid)
        assert worker.run({"input": digits.x_test[:2]})["logits"].shape == (2, 10)
    finally:
        worker.close()

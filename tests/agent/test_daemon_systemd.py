"""The agent under systemd's notify protocol, as a real process: READY with what it serves,
watchdog pings while the inference loop makes progress and none once it stalls, STOPPING on
SIGTERM, and exit 78 for what a restart cannot fix."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.cli import EX_CONFIG
from agent.models.bundle import VariantSpec, build_bundle
from agent.models.store import ModelStore

WATCHDOG_USEC = 200_000  # the agent pings every 0.1 s


def _stalling_model(path: Path) -> Path:
    """y = x + n, by a Loop of n = x * 1e12 steps: instant for x = 0 (golden, warm-up), hours
    for the loop's synthetic frames (x in [0, 1))."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "step",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        [one],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "big"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["trips1"], to=TensorProto.INT64),
            helper.make_node("Squeeze", ["trips1", "axis0"], ["trips"]),
            helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body),
        ],
        "stall",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [
            helper.make_tensor("big", TensorProto.FLOAT, [1], [1e12]),
            helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
            helper.make_tensor("true", TensorProto.BOOL, [], [True]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _install(
    state_dir: Path, work: Path, name: str, model: Path, golden: dict[str, np.ndarray]
) -> None:
    bundle = work / f"{name}-bundle"
    build_bundle(bundle, name, "1.0.0", [VariantSpec(model)], golden_inputs=[golden])
    store = ModelStore(state_dir)
    store.install(bundle)
    store.activate(name, "1.0.0")


def _config(path: Path, state_dir: Path, model: str) -> Path:
    path.write_text(
        f'device_id = "notify-test"\nstate_dir = "{state_dir}"\n'
        f'[[models]]\nname = "{model}"\n'
        "[api]\nenabled = false\n[loop]\nrate_hz = 50\n[swap]\nwarmup_runs = 1\n"
    )
    return path


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()


def _start(config: Path, notify_path: str) -> subprocess.Popen[str]:
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _messages(sock: socket.socket, seconds: float) -> list[str]:
    """Every datagram that arrives within ``seconds``."""
    out: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return out


def _until_ready(sock: socket.socket, proc: subprocess.Popen[str]) -> str:
    for _ in range(120):
        for msg in _messages(sock, 0.5):
            if msg.startswith("READY=1"):
                return msg
        assert proc.poll() is None, proc.communicate()[1][-2000:]
    raise AssertionError("the agent never said READY=1")


def test_ready_status_watchdog_and_stopping(
    tmp_path: Path, state_dir: Path, digits_path: Path, notify: tuple[socket.socket, str]
) -> None:
    sock, path = notify
    _install(
        state_dir, tmp_path, "digits", digits_path, {"input": np.zeros((1, 1, 8, 8), np.float32)}
    )
    proc = _start(_config(tmp_path / "agent.toml", state_dir, "digits"), path)
    try:
        ready = _until_ready(sock, proc)
        assert ready == "READY=1\nSTATUS=serving digits 1.0.0 on onnxruntime"
        pings = [m for m in _messages(sock, 2.0) if m == "WATCHDOG=1"]
        assert len(pings) >= 5, pings  # about 20 are due in 2 s at 0.1 s
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _messages(sock, 10.0)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_stalled_loop_stops_the_watchdog_pings(
    tmp_path: Path, state_dir: Path, notify: tuple[socket.socket, str]
) -> None:
    sock, path = notify
    model = _stalling_model(tmp_path / "stall.onnx")
    _install(state_dir, tmp_path, "stall", model, {"x": np.zeros(1, np.float32)})
    proc = _start(_config(tmp_path / "agent.toml", state_dir, "stall"), path)
    try:
        assert _until_ready(sock, proc).startswith("READY=1\nSTATUS=serving stall 1.0.0")
        # The loop's first frame never returns: 20 health checks, not one ping.
        assert [m for m in _messages(sock, 2.0) if m == "WATCHDOG=1"] == []
        assert proc.poll() is None  # still alive: systemd, not the agent, restarts it
    finally:
        proc.kill()
        proc.communicate()


def test_missing_config_exits_78_with_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == EX_CONFIG
    assert res.stderr.strip().splitlines()[-1].startswith("ConfigError: config file not found")


def test_unusable_state_dir_exits_78(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "state"
    not_a_dir.write_text("a file where the state directory should be")
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{not_a_dir}"\n[api]\nenabled = false\n')
    res = subprocess.run(
        [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == EX_CONFIG, res.stderr
    assert f"ConfigError: state directory {not_a_dir} is not usable" in res.stderr

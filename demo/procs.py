"""The demo's child processes: start them, watch them, and stop every one of them.

Owns process lifetimes for ``demo.fleet``: each child runs in its own session (so a
Ctrl-C in the terminal reaches only the demo, which then stops the children in order), its
output goes to a log file under the demo directory, and ``stop_all`` ends them newest first
(SIGTERM, then SIGKILL after a grace period). Also picks the MQTT broker: the one listening on
127.0.0.1:1883, else a ``mosquitto`` started on a free port, else the embedded broker of
``demo.broker`` in a child process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from agent.logs import get_logger
from control_plane.errors import ConfigError

__all__ = [
    "BrokerChoice",
    "Child",
    "Children",
    "exit_with_parent",
    "free_port",
    "pick_broker",
    "port_open",
]

log = get_logger(__name__)

DEFAULT_BROKER = ("127.0.0.1", 1883)
STOP_GRACE_S = 10.0
PARENT_CHECK_S = 0.5


def exit_with_parent(*, check_s: float = PARENT_CHECK_S) -> None:
    """In a child: SIGTERM ourselves once the process that started us is gone.

    The demo stops its children itself; this covers the demo being killed outright (SIGKILL,
    a crashed terminal), so no agent or control plane outlives it. A daemon thread.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(check_s)
        log.warning("parent_gone", parent=parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout_s: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stdout_path: Path | None = None

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Children:
    """Every process the demo started, in start order."""

    log_dir: Path
    started: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        capture_stdout: bool = False,
        cwd: Path | None = None,
    ) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        stdout_path = self.log_dir / f"{name}.out" if capture_stdout else None
        with contextlib.ExitStack() as files:
            err: IO[bytes] = files.enter_context(log_path.open("wb"))
            out: IO[bytes] = (
                files.enter_context(stdout_path.open("wb")) if stdout_path is not None else err
            )
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env={**os.environ, **_import_path(), **(env or {})},
                cwd=cwd,
                start_new_session=True,  # Ctrl-C reaches the demo only; it stops us in order
            )
        child = Child(name, process, log_path, stdout_path)
        self.started.append(child)
        log.debug("child_started", name=name, pid=process.pid)
        return child

    def check_alive(self) -> None:
        """Raise ``ConfigError`` naming the first child that died, with its log's tail."""
        for child in self.started:
            code = child.process.poll()
            if code is not None:
                raise ConfigError(
                    f"{child.name} exited with status {code}; its log "
                    f"({child.log_path}) ends:\n{child.log_tail()}"
                )

    def stop(self, child: Child, *, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; the exit status."""
        process = child.process
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("child_killed", name=child.name, pid=process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        # Anything the child itself started (its session) goes with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def stop_all(self) -> None:
        for child in reversed(self.started):
            self.stop(child)


@dataclass(frozen=True)
class BrokerChoice:
    kind: Literal["running", "mosquitto", "embedded"]
    host: str
    port: int

    def describe(self) -> str:
        where = f"{self.host}:{self.port}"
        if self.kind == "running":
            return f"the MQTT broker already listening on {where}"
        if self.kind == "mosquitto":
            return f"mosquitto started on {where}"
        return f"the embedded MQTT broker on {where} (install mosquitto for the real one)"


def _wait_port(host: str, port: int, child: Child, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_open(host, port):
        if not child.alive():
            raise ConfigError(f"{child.name} exited at start:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise ConfigError(f"{child.name} does not listen on {host}:{port}")
        time.sleep(0.05)


def pick_broker(
    children: Children, *, prefer: str | None = None, probe: tuple[str, int] = DEFAULT_BROKER
) -> BrokerChoice:
    """``prefer``: None (the first that works), ``running``, ``mosquitto`` or ``embedded``."""
    if prefer not in (None, "running", "mosquitto", "embedded"):
        raise ConfigError(f"unknown broker choice {prefer!r}: running, mosquitto or embedded")
    host, port = probe
    if prefer in (None, "running") and port_open(host, port):
        return BrokerChoice("running", host, port)
    if prefer == "running":
        raise ConfigError(f"no MQTT broker listens on {host}:{port}")
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )
    if prefer in (None, "mosquitto") and binary:
        port = free_port()
        conf = children.log_dir / "mosquitto.conf"
        children.log_dir.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        child = children.start("mosquitto", [binary, "-c", str(conf)])
        _wait_port("127.0.0.1", port, child, 10.0)
        return BrokerChoice("mosquitto", "127.0.0.1", port)
    if prefer == "mosquitto":
        raise ConfigError("mosquitto is not installed")
    port = free_port()
    child = children.start("broker", [sys.executable, "-m", "demo.broker", "--port", str(port)])
    _wait_port("127.0.0.1", port, child, 15.0)
    return BrokerChoice("embedded", "127.0.0.1", port)


def _import_path() -> dict[str, str]:
    """``PYTHONPATH`` that lets a child ``python -m demo.<part>`` from any working directory:
    the demo lives beside the packages, outside the installed distribution."""
    root = str(Path(__file__).resolve().parent.parent)
    parts = [root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(parts))}

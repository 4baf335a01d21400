"""Drives ``agent_proc``'s zygote: start agent processes, read their progress, kill -9 them."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


class AgentHarness:
    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.agent.store.agent_proc", "zygote"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.wait_for("ZYGOTE")

    def start(self, state_dir: Path, mode: str, *args: str) -> int:
        """Fork one agent process for a job; returns its pid."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(shlex.join([str(state_dir), mode, *args]) + "\n")
        self._proc.stdin.flush()
        return int(self.wait_for("PID").split()[1])

    def wait_for(self, prefix: str) -> str:
        """The next line starting with ``prefix``; fails if the job exits first."""
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(prefix):
                return line.strip()
            if line.startswith("EXIT"):
                raise AssertionError(f"agent exited ({line.strip()}) before printing {prefix!r}")
        raise AssertionError(f"zygote ended before {prefix!r}")

    def finish(self) -> tuple[int, list[str]]:
        """Read the job's lines until it exits; its exit code and lines."""
        assert self._proc.stdout is not None
        lines = []
        for line in self._proc.stdout:
            if line.startswith("EXIT"):
                return int(line.split()[1]), lines
            lines.append(line.strip())
        raise AssertionError("zygote ended")

    def kill(self, pid: int) -> None:
        """SIGKILL the job (a no-op if it already ended) and wait until it is reaped."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.finish()

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

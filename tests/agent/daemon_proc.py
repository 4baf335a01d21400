"""A real ``edge-agent daemon`` for tests: a digits bundle installed in its store, the process
started on a config file, and a wait until its local API says it is ready."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import httpx
import numpy as np

from agent.models.bundle import VariantSpec, build_bundle
from agent.models.store import ModelStore
from agent.samples import DigitsData


def bundle_daemon(
    work: Path, bundle: Path, model: str, version: str, device_id: str, sections: str
) -> tuple[Path, int]:
    """``bundle`` installed in ``work/state`` as the active ``version`` of ``model`` and a daemon
    config serving it, its local API on a free port (gRPC off), with ``sections`` (TOML)
    appended: (config path, port)."""
    from tests.control_plane.conftest import free_port

    state_dir = work / "state"
    store = ModelStore(state_dir)
    store.install(bundle)
    store.activate(model, version)
    port = free_port()
    config = work / "agent.toml"
    config.write_text(
        f'device_id = "{device_id}"\nstate_dir = "{state_dir}"\n'
        f'[[models]]\nname = "{model}"\n'
        f"[api]\nhttp_port = {port}\ngrpc_port = 0\n" + sections
    )
    return config, port


def digits_daemon(
    work: Path,
    digits_path: Path,
    digits: DigitsData,
    device_id: str,
    sections: str,
    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime",
) -> tuple[Path, int]:
    """``bundle_daemon`` for the digits CNN's bundle (version 1.0.0, one FP32 variant for
    ``runtime``)."""
    golden = {"input": digits.x_test[:1].astype(np.float32)}
    bundle = work / "bundle"
    variant = VariantSpec(digits_path, runtime=runtime)
    build_bundle(bundle, "digits", "1.0.0", [variant], golden_inputs=[golden])
    return bundle_daemon(work, bundle, "digits", "1.0.0", device_id, sections)


@contextmanager
def running_daemon(
    config: Path, port: int, log_path: Path, timeout_s: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """The daemon on ``config``, once ``/v2/health/ready`` on ``port`` answers 200; terminated
    (and waited for) when the block ends. Its output goes to ``log_path``."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    ready = httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1)
                    if ready.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "daemon not ready"
                time.sleep(0.1)
            yield proc
        finally:
            proc.terminate()
            proc.wait(30)

"""From the README to a model served on a local agent: every step timed.

Runs, in a scratch directory, the README's operator block as written (extracted from README.md:
``edgectl serve`` in the background, then each command; the port is a free one through
``EDGEFLEET_CP__PORT`` and ``127.0.0.1:8080`` is rewritten to it; ``DEVICE_ID`` is a device
enrolled over the HTTP API with the generated bootstrap token), with the digits CNN and its
sample sets under the README's file names. Then the agent side: the pulled variant archives
installed offline (``edge-agent models install usb/*.tar --activate``, the command the README's
pull line points to) and ``edge-agent daemon`` serving them until the first inference over HTTP
answers. Prints each step's seconds, the number of steps, and the total.

    .venv/bin/python bench/bench_readme_flow.py

``make install`` (creating ``.venv``) is not timed here: it is the same before and after.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.samples import digits_cnn, digits_data  # noqa: E402

README_URL = "http://127.0.0.1:8080"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def operator_commands(text: str) -> list[str]:
    block = text.split("As an operator", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    return [c for line in joined.splitlines() if (c := line.split("#", 1)[0].strip())]


def _wait(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer")
        time.sleep(0.05)


def main() -> None:
    from agent.hardware import HardwareProfile  # noqa: F401 - the profile below is its dump
    from tests.control_plane.conftest import x86_profile

    commands = operator_commands((ROOT / "README.md").read_text())
    steps: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = digits_data()
        (work / "digits.onnx").write_bytes(digits_cnn().read_bytes())
        np.savez(work / "calib.npz", input=data.x_train[:64])
        np.savez(work / "val.npz", input=data.x_test, labels=data.y_test)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET", "EDGECTL"))}
        env |= {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "EDGECTL_CONFIG": str(work / "edgectl.json"),
            "EDGEFLEET_CP__PORT": str(port),
        }
        t0 = time.perf_counter()
        with (work / "serve.log").open("w") as log:
            server = subprocess.Popen(
                shlex.split(commands[0]), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        daemon = None
        try:
            _wait(url + "/healthz", server)
            steps.append((commands[0], time.perf_counter() - t0))
            bootstrap = (work / "edgefleet-data/local-tokens/bootstrap").read_text().strip()
            enrolled = httpx.post(
                url + "/v1/devices/enroll",
                json={
                    "bootstrap_token": bootstrap,
                    "name": "robot-1",
                    "profile": x86_profile().model_dump(mode="json"),
                    "labels": {},
                },
            )
            device_id = enrolled.json()["device_id"]
            for command in commands[1:]:
                shell = command.replace(README_URL, url).replace("DEVICE_ID", device_id)
                start = time.perf_counter()
                done = subprocess.run(
                    shell,
                    check=False,
                    shell=True,
                    cwd=work,
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    raise RuntimeError(f"{command}: {done.stderr}")
                steps.append((command, time.perf_counter() - start))
            # The agent side: install the pulled archives offline and serve them.
            archives = sorted(str(p) for p in (work / "usb").glob("digits-1.0.0-*.tar"))
            install = ["edge-agent", "models", "install", "usb/*.tar", "--state-dir", "agent-state"]
            start = time.perf_counter()
            subprocess.run(
                [*install[:3], *archives, "--state-dir", "agent-state", "--activate"],
                cwd=work,
                env=env,
                check=True,
                capture_output=True,
            )
            steps.append((" ".join(install) + " --activate", time.perf_counter() - start))
            api = _free_port()
            (work / "agent.toml").write_text(
                f'state_dir = "{work / "agent-state"}"\n[[models]]\nname = "digits"\n'
                f"[api]\nhttp_port = {api}\ngrpc_port = 0\n"
            )
            start = time.perf_counter()
            daemon = subprocess.Popen(
                ["edge-agent", "daemon", "--config", "agent.toml"],
                cwd=work,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait(f"http://127.0.0.1:{api}/v2/models/digits/ready", daemon)
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, 1, 8, 8],
                        "data": data.x_test[:1].astype(np.float32).ravel().tolist(),
                    }
                ]
            }
            r = httpx.post(f"http://127.0.0.1:{api}/v2/models/digits/infer", json=body)
            r.raise_for_status()
            steps.append(
                ("edge-agent daemon (until the first inference)", time.perf_counter() - start)
            )
        finally:
            for process in (daemon, server):
                if process is not None:
                    process.terminate()
                    process.wait(30)
    width = max(len(s) for s, _ in steps)
    for i, (step, seconds) in enumerate(steps, 1):
        print(f"{i:2d}  {step:{width}}  {seconds:7.2f} s")
    print(f"{len(steps)} steps, {sum(s for _, s in steps):.1f} s in all")


if __name__ == "__main__":
    main()

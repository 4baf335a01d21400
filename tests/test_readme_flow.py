"""The README's operator flow, extracted from README.md and run as written against a live
control plane (`edgectl serve` with no tokens set: the local mode the README starts with).

Two things are the test's, not the reader's: the port (a free one, through
``EDGEFLEET_CP__PORT``, with the README's ``127.0.0.1:8080`` rewritten to it) and the device
(enrolled over the HTTP API with the generated bootstrap token, as an agent would; its id
replaces ``DEVICE_ID``). The model files are the digits CNN and its sample sets under the
README's names.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from agent.hardware import HardwareProfile
from agent.samples import DigitsData
from tests.control_plane.conftest import free_port
from tests.control_plane.loopback import stop, wait_http

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://127.0.0.1:8080"


def operator_commands(text: str) -> list[str]:
    """The shell commands of the README's operator block: continuation lines joined,
    comments and comment-only lines dropped."""
    block = text.split("As an operator", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", "", block)
    commands = []
    for line in joined.splitlines():
        command = line.split("#", 1)[0].strip()
        if command:
            commands.append(command)
    return commands


def x86() -> HardwareProfile:
    from tests.control_plane.conftest import x86_profile

    return x86_profile()


def test_readme_operator_flow(tmp_path: Path, digits_path: Path, digits: DigitsData) -> None:
    commands = operator_commands(README.read_text())
    assert commands[0] == "edgectl serve"
    assert commands[1].startswith("edgectl login")
    shutil.copyfile(digits_path, tmp_path / "digits.onnx")
    np.savez(tmp_path / "calib.npz", input=digits.x_train[:64])
    np.savez(tmp_path / "val.npz", input=digits.x_test, labels=digits.y_test)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET", "EDGECTL"))}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "EDGECTL_CONFIG": str(tmp_path / "edgectl.json"),
        "EDGEFLEET_CP__PORT": str(port),
        "COLUMNS": "160",
    }
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        shlex.split(commands[0]), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_http(url + "/healthz", process=server)
        bootstrap = (tmp_path / "edgefleet-data/local-tokens/bootstrap").read_text().strip()
        enrolled = httpx.post(
            url + "/v1/devices/enroll",
            json={
                "bootstrap_token": bootstrap,
                "name": "robot-1",
                "profile": x86().model_dump(mode="json"),
                "labels": {},
            },
        )
        assert enrolled.status_code == 201, enrolled.text
        device_id = enrolled.json()["device_id"]
        for command in commands[1:]:
            shell = command.replace(README_URL, url).replace("DEVICE_ID", device_id)
            done = subprocess.run(
                shell,
                shell=True,  # the README's own command lines, redirections included
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stdout + done.stderr, command
    finally:
        stop(server)
        log.close()
    assert (tmp_path / "root.json").stat().st_size > 0
    pulled = list((tmp_path / "usb").glob("digits-1.0.0-*.tar"))
    assert pulled

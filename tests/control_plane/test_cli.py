"""``edgectl`` against the real service on loopback."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from control_plane.cli import main
from tests.control_plane.conftest import ADMIN, ADMIN_TOKEN, SampleFiles, enroll


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    config = tmp_path / "edgectl.json"
    monkeypatch.setenv("EDGECTL_CONFIG", str(config))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("EDGEFLEET_URL", raising=False)
    monkeypatch.delenv("EDGEFLEET_TOKEN", raising=False)
    return config


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_operator_workflow(
    cli_env: Path,
    live_server: str,
    client: httpx.Client,
    capsys: pytest.CaptureFixture[str],
    digits_path: Path,
    digits_sets: SampleFiles,
) -> None:
    code, _, err = run(capsys, "models", "ls")
    assert code == 1
    assert err.startswith("ConfigError: no control plane URL")

    code, _, err = run(capsys, "login", "--url", live_server, "--token", "efo_wrong")
    assert (code, err.strip()) == (1, "AuthError: unknown or revoked API token")
    assert not cli_env.exists()
    code, out, _ = run(capsys, "login", "--url", live_server, "--token", ADMIN_TOKEN)
    assert code == 0
    assert stat.S_IMODE(cli_env.stat().st_mode) == 0o600

    assert run(capsys, "models", "create", "digits", "--budget", "1.5")[0] == 0
    code, out, err = run(
        capsys,
        "models",
        "push",
        str(digits_path),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--calibration",
        str(digits_sets.calibration),
    )
    assert code == 0, err
    assert "build job" in out
    assert "onnx-fp32" in out
    assert "accepted" in out

    code, _, err = run(
        capsys,
        "models",
        "push",
        str(digits_path),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--calibration",
        str(digits_sets.calibration),
    )
    assert code == 1
    assert err.strip() == "ConflictError: version 1.0.0 of model 'digits' exists already"

    code, out, _ = run(capsys, "models", "ls")
    assert code == 0
    assert "digits" in out
    assert "1.0.0 (ready)" in out
    code, out, _ = run(capsys, "models", "show", "digits")
    assert "1.0.0" in out
    assert "ready" in out

    device_id, device = enroll(client, "robot-7")
    code, out, _ = run(capsys, "devices", "label", device_id, "site=lab", "group=a")
    assert code == 0
    assert client.get(f"/v1/devices/{device_id}", headers=ADMIN).json()["labels"] == {
        "site": "lab",
        "group": "a",
    }
    assert run(capsys, "devices", "label", device_id, "group-")[0] == 0
    code, out, _ = run(capsys, "devices", "ls")
    assert device_id in out
    assert "site=lab" in out

    code, out, _ = run(capsys, "deploy", "digits", "1.0.0", "--to", "site=lab")
    assert code == 0
    assert "(1 devices)" in out
    state = client.get(f"/v1/devices/{device_id}/desired-state", headers=device).json()
    assert state["models"][0]["version"] == "1.0.0"
    code, out, _ = run(capsys, "devices", "show", device_id)
    assert "onnx-fp32" in out

    code, out, _ = run(capsys, "tokens", "create", "ci", "--role", "operator")
    assert code == 0
    token = out.strip().rsplit(" ", 1)[1]
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200

    code, _, err = run(capsys, "deploy", "digits", "1.0.0", "--to", "nonsense")
    assert code == 1
    assert err.startswith("ConfigError: selector")


def test_unreachable_server(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.control_plane.conftest import free_port

    monkeypatch.setenv("EDGEFLEET_URL", f"http://127.0.0.1:{free_port()}")
    code, _, err = run(capsys, "devices", "ls")
    assert code == 1
    assert err.startswith("ClientError: cannot reach the control plane")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bogus"], "No such command 'bogus'"),
        (["models", "ls", "--jsn"], "No such option: --jsn"),
        (["models", "push"], "Missing argument"),
        (["devices", "show"], "Missing argument"),
    ],
)
def test_usage_mistakes_are_one_line_errors(
    cli_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in out + err
    assert "Traceback" not in out + err


def test_read_commands_print_json(
    cli_env: Path, live_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert run(capsys, "login", "--url", live_server, "--token", ADMIN_TOKEN)[0] == 0
    for argv in (["models", "ls", "--json"], ["devices", "ls", "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert isinstance(json.loads(out), list)


def test_every_failure_is_one_line_unless_debug(
    cli_env: Path, live_server: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A failure that is no ControlPlaneError (here the config file cannot be written) takes
    the same path: ``Name: message``, exit 1, the traceback only with ``--debug``."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    import os

    os.environ["EDGECTL_CONFIG"] = str(blocker / "edgectl.json")
    try:
        code, out, err = run(capsys, "login", "--url", live_server, "--token", ADMIN_TOKEN)
        assert code == 1
        assert err.splitlines()[0].startswith(("FileExistsError: ", "NotADirectoryError: "))
        assert "Traceback" not in out + err
        code, _, err = run(capsys, "--debug", "login", "--url", live_server, "--token", ADMIN_TOKEN)
        assert code == 1
        assert "Traceback (most recent call last)" in err
    finally:
        os.environ["EDGECTL_CONFIG"] = str(cli_env)


def test_login_reads_the_token_from_stdin(
    cli_env: Path,
    live_server: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(ADMIN_TOKEN + "\n"))
    code, out, err = run(capsys, "login", "--url", live_server)
    assert code == 0, err
    assert ADMIN_TOKEN not in out + err
    assert ADMIN_TOKEN in cli_env.read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    code, _, err = run(capsys, "login", "--url", live_server)
    assert (code, err.split(":")[0]) == (1, "ConfigError")


def test_onboarding_errors_say_the_fix_before_a_version_is_used(
    cli_env: Path, live_server: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """skl2onnx's default export (ZipMap), then its zipmap=False export with labels (the first
    output is the label, not the scores): both refused at push, with the fix, synchronously;
    the fixed model then takes the same version number. Push creates the model when needed."""
    import numpy as np
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    model = LogisticRegression(max_iter=500).fit(x, y)
    zipmap, plain = tmp_path / "zipmap.onnx", tmp_path / "plain.onnx"
    zipmap.write_bytes(to_onnx(model, x[:1]).SerializeToString())
    plain_model = to_onnx(model, x[:1], options={id(model): {"zipmap": False}})
    plain.write_bytes(plain_model.SerializeToString())
    fixed = tmp_path / "scores.onnx"
    del plain_model.graph.output[0]  # what the message says to do
    fixed.write_bytes(plain_model.SerializeToString())
    val = tmp_path / "val.npz"
    np.savez(val, X=x[::3], labels=y[::3])
    assert run(capsys, "login", "--url", live_server, "--token", ADMIN_TOKEN)[0] == 0

    def push(path: Path) -> tuple[int, str, str]:
        return run(
            capsys,
            "models",
            "push",
            str(path),
            "--name",
            "iris",
            "--version",
            "1.0.0",
            "--validation",
            str(val),
            "--no-wait",
        )

    code, out, err = push(zipmap)
    assert code == 1
    assert "created model iris" in out
    assert err.startswith("BuildInputError: onnx: output 'output_probability' is a ZipMap")
    assert "export with zipmap=False (options={id(model): {'zipmap': False}})" in err
    code, _, err = push(plain)
    assert code == 1
    assert err.startswith(
        "BuildInputError: validation: labels were given, but the first output 'label'"
    )
    assert "del onx.graph.output[0]" in err
    code, out, err = push(fixed)
    assert code == 0, err
    assert "uploaded iris 1.0.0" in out
    assert "created model" not in out


def test_more_read_commands_print_json(
    cli_env: Path, live_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    assert run(capsys, "login", "--url", live_server, "--token", ADMIN_TOKEN)[0] == 0
    assert run(capsys, "models", "create", "m")[0] == 0
    for argv, kind in (
        (["models", "show", "m", "--json"], dict),
        (["rollout", "ls", "--json"], list),
        (["jobs", "ls", "--json"], list),
        (["tokens", "ls", "--json"], list),
        (["bootstrap-tokens", "ls", "--json"], list),
    ):
        code, out, err = run(capsys, *argv)
        assert code == 0, (argv, err)
        assert isinstance(json.loads(out), kind), argv


def test_serve_without_tokens_on_loopback_is_a_local_control_plane(tmp_path: Path) -> None:
    """`edgectl serve` with no tokens set: tokens generated into 0600 files, the URL and the
    next commands printed; `edgectl login < file` then works. A public bind is refused."""
    import os
    import subprocess
    import sys

    from tests.control_plane.conftest import free_port
    from tests.control_plane.loopback import stop, wait_http

    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEFLEET", "EDGECTL"))}
    env |= {"EDGECTL_CONFIG": str(tmp_path / "edgectl.json"), "COLUMNS": "200"}
    edgectl = [sys.executable, "-m", "control_plane.cli"]
    refused = subprocess.run(
        [*edgectl, "serve", "--host", "0.0.0.0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert refused.stderr.startswith("ConfigError: binding 0.0.0.0 needs tokens")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [*edgectl, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(url + "/healthz", process=process)
        folder = tmp_path / "edgefleet-data" / "local-tokens"
        for name in ("admin", "bootstrap"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
        text = (tmp_path / "serve.log").read_text()
        assert f'"url": "{url}"' in text  # the start log line
        assert f"{url}/ui" in text
        assert f"edgectl login --url {url} < edgefleet-data/local-tokens/admin" in text
        with (folder / "admin").open() as stdin:
            done = subprocess.run(
                [*edgectl, "login", "--url", url],
                stdin=stdin,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert done.returncode == 0, done.stderr
        listed = subprocess.run(
            [*edgectl, "models", "ls", "--json"], env=env, capture_output=True, text=True
        )
        assert (listed.returncode, listed.stdout.strip()) == (0, "[]")
    finally:
        stop(process)
        log.close()

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

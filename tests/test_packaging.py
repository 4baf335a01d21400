"""Packaging checks that run without Docker or a robot: the systemd unit, the Dockerfiles and the
images' dependency sets resolved for their real targets (linux/aarch64 on each Python)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "edge-agent.service"
BIN = Path(sys.executable).parent


def _unit_for_this_machine(tmp_path: Path) -> Path:
    # verify checks that ExecStart exists: point it at this checkout's entry point.
    text = UNIT.read_text().replace("/opt/edge-agent/bin/edge-agent", str(BIN / "edge-agent"))
    out = tmp_path / "edge-agent.service"
    out.write_text(text)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    unit = _unit_for_this_machine(tmp_path)
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "edge-agent.service" not in res.stderr, res.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    unit = _unit_for_this_machine(tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    line = next(ln for ln in res.stdout.splitlines() if "Overall exposure level" in ln)
    score = float(line.split(":")[1].split()[0])
    assert score <= 2.0, line


def test_unit_keeps_required_directives() -> None:
    text = UNIT.read_text()
    for directive in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "DevicePolicy=closed",
        "RestartPreventExitStatus=78",
    ):
        assert directive in text, directive


@pytest.mark.parametrize(
    "dockerfile", ["Dockerfile.rpi", "Dockerfile.jetson", "deploy/control-plane.Dockerfile"]
)
def test_dockerfiles_lint_clean(dockerfile: str) -> None:
    hadolint = BIN / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint is missing from the dev extra")
    res = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "info", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _index_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


AARCH64 = [
    "--platform",
    "manylinux_2_35_aarch64",
    "--platform",
    "manylinux_2_34_aarch64",
    "--platform",
    "manylinux_2_31_aarch64",
    "--platform",
    "manylinux_2_28_aarch64",
    "--platform",
    "manylinux_2_27_aarch64",
    "--platform",
    "manylinux_2_17_aarch64",
    "--platform",
    "manylinux2014_aarch64",
]


@pytest.mark.network
@pytest.mark.parametrize(
    ("python", "extras", "constraints"),
    [
        ("3.10", "agent,openvino,tensorrt", "jetson-py310-aarch64.txt"),  # Jetson, JetPack 6
        ("3.11", "agent,openvino", "rpi-py311-aarch64.txt"),  # Raspberry Pi OS 12
        ("3.13", "agent,openvino", None),  # Raspberry Pi OS 13
    ],
)
def test_image_install_step_resolves_for_aarch64(
    tmp_path: Path, python: str, extras: str, constraints: str | None
) -> None:
    """The images' pip step, for the image's platform and Python, with its constraints file."""
    if not _index_reachable():
        pytest.skip("the package index is unreachable from this machine")
    cmd = [
        str(BIN / "pip"),
        "install",
        "-q",
        "--dry-run",
        "--ignore-installed",
        "--only-binary=:all:",
        *AARCH64,
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--target",
        str(tmp_path / "t"),
        f"{ROOT}[{extras}]",
    ]
    if constraints:
        cmd += ["-c", str(ROOT / "deploy" / "constraints" / constraints)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]


def test_compose_stack_refuses_to_start_without_its_secrets() -> None:
    """Every variable the stack reads is a required secret with a message (``${X:?msg}``), and
    the example env file lists each one."""
    import re

    import yaml

    text = (ROOT / "deploy" / "compose.yaml").read_text()
    refs = re.findall(r"\$\{([A-Z0-9_]+)(:\?[^}]+)?\}", text)
    assert refs
    for name, required in refs:
        assert required, f"${{{name}}} has no ':?message': compose would start with it empty"
    example = (ROOT / "deploy" / "stack.env.example").read_text()
    for name, _ in refs:
        assert name in example, f"{name} missing from deploy/stack.env.example"
    stack = yaml.safe_load(text)
    for name, service in stack["services"].items():
        image = service.get("image", "")
        assert ":" in image, f"{name}: image {image!r} is not pinned"
        assert not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    assert "healthcheck" in stack["services"]["postgres"]
    assert stack["services"]["control-plane"]["depends_on"]["postgres"]["condition"] == (
        "service_healthy"
    )
    for service in stack["services"].values():
        for volume in service.get("volumes", []):
            src = volume.split(":", 1)[0]
            if src.startswith("./mosquitto/") and not src.endswith("passwd"):
                assert (ROOT / "deploy" / src).exists(), src


@pytest.mark.parametrize("config", ["haproxy.cfg", "haproxy-compose.cfg"])
def test_haproxy_configs_are_valid(config: str) -> None:
    """The balancer configs parse with the real HAProxy (``haproxy -c``) and health-check the
    replicas on /readyz."""
    path = ROOT / "deploy" / "haproxy" / config
    res = subprocess.run(
        [shutil.which("haproxy") or "/usr/sbin/haproxy", "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "option httpchk GET /readyz" in path.read_text()


def test_compose_stack_runs_replicas_behind_haproxy() -> None:
    import yaml

    stack = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = stack["services"]
    cp, lb = services["control-plane"], services["haproxy"]
    assert cp["deploy"]["replicas"] >= 2
    assert "ports" not in cp, "replicas publish no host port: traffic goes through haproxy"
    assert lb["ports"] == ["8080:8080"]
    mounted = [v.split(":", 1)[0] for v in lb["volumes"]]
    assert mounted == ["./haproxy/haproxy-compose.cfg"]
    assert (ROOT / "deploy" / mounted[0]).exists()
    # the replicas share one database, never a per-replica SQLite file
    assert cp["environment"]["EDGEFLEET_CP__DATABASE_URL"].startswith("postgresql")


def test_example_agent_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.config import load_settings

    for key in [k for k in os.environ if k.startswith("EDGE_AGENT__")]:
        monkeypatch.delenv(key)
    settings = load_settings(ROOT / "deploy" / "systemd" / "agent.toml.example")
    assert settings.control_plane.tuf_root_path == Path("/etc/edge-agent/root.json")
    assert [m.name for m in settings.models] == ["detector"]


def test_wheel_ships_the_packages_not_the_demo(tmp_path: Path) -> None:
    """The demos live beside the packages; an install carries agent and control_plane only,
    and the control plane imports nothing of the agent beyond the shared tier."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(root),
        ],
        check=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("edgefleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info" not in n}
    assert tops == {"agent", "control_plane"}, tops
    shared = ("agent.contracts", "agent.logs", "agent._fs")
    for path in (root / "control_plane").rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("from", "import") and words[1].startswith("agent"):
                assert words[1].startswith(shared), f"{path}: {line.strip()}"

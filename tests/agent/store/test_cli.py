"""``edge-agent models`` for a technician: install, list, activate, rollback, and clear errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from agent.cli import main
from agent.models.probation import UpdateJournal
from agent.models.store import ModelStore
from tests.agent.store import models


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() points structlog at the captured stderr; later tests must not log into it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_install_list_activate_rollback(
    capsys: pytest.CaptureFixture[str],
    state_dir: Path,
    bundles: dict[str, Path],
    archives: dict[str, Path],
) -> None:
    sd = ("--state-dir", str(state_dir))
    code, out, _ = _run(capsys, "models", "install", str(bundles["1.0.0"]), "--activate", *sd)
    assert code == 0
    assert "installed: digits 1.0.0" in out
    assert "validated: digits 1.0.0" in out
    assert "active: digits 1.0.0 (previous: -)" in out
    code, out, _ = _run(capsys, "models", "install", str(archives["2.0.0"]), *sd)
    assert code == 0
    assert "installed: digits 2.0.0" in out
    code, out, _ = _run(capsys, "models", "install", str(archives["2.0.0"]), *sd)
    assert "already installed: digits 2.0.0" in out

    code, out, _ = _run(capsys, "models", "activate", "digits", "2.0.0", *sd)
    assert code == 0
    assert "active: digits 2.0.0 (previous: 1.0.0)" in out
    code, out, _ = _run(capsys, "models", "list", "--json", *sd)
    rows = json.loads(out)
    assert [(r["version"], r["status"]) for r in rows] == [
        ("2.0.0", "active"),
        ("1.0.0", "previous"),
    ]
    assert rows[0]["variants"] == ["onnxruntime-fp32"]
    assert rows[0]["size_bytes"] > 0
    code, out, _ = _run(capsys, "models", "list", *sd)
    assert code == 0
    assert "digits" in out
    assert "active" in out
    assert "previous" in out

    code, out, _ = _run(capsys, "models", "rollback", "digits", *sd)
    assert code == 0
    assert "active: digits 1.0.0 (rolled back from 2.0.0)" in out
    assert ModelStore(state_dir).active("digits") == "1.0.0"
    record = UpdateJournal(state_dir).load("digits")
    assert record is not None
    assert record.phase == "rolled_back"
    assert record.to_version == "2.0.0"


def test_errors_are_one_line_and_change_nothing(
    capsys: pytest.CaptureFixture[str],
    state_dir: Path,
    bundles: dict[str, Path],
    model_files: dict[str, Path],
    tmp_path: Path,
    golden_x: object,
) -> None:
    sd = ("--state-dir", str(state_dir))
    assert _run(capsys, "models", "install", str(bundles["1.0.0"]), "--activate", *sd)[0] == 0
    code, _, err = _run(capsys, "models", "activate", "digits", "7.0.0", *sd)
    assert code == 1
    assert err.strip() == (
        "StoreError: digits 7.0.0 is not installed (see: edge-agent models list)"
    )
    code, _, err = _run(capsys, "models", "rollback", "digits", *sd)
    assert code == 1
    assert "StoreError: digits has no previous version recorded" in err
    bad = tmp_path / "bad"
    shutil.copytree(bundles["2.0.0"], bad)
    (bad / "manifest.json").write_text("{")
    code, _, err = _run(capsys, "models", "install", str(bad), *sd)
    last = err.strip().splitlines()[-1]  # after the store's own warning log line
    assert code == 1
    assert last.startswith("BundleError: bad: manifest.json does not parse as JSON")
    # golden outputs that do not match: installed, but activation refuses it
    models.make_bundle(
        tmp_path / "mismatch",
        "2.0.0",
        model_files["2.0.0"],
        golden_x,  # type: ignore[arg-type]
        reference_model=model_files["1.0.0"],
    )
    code, _, err = _run(capsys, "models", "install", str(tmp_path / "mismatch"), "--activate", *sd)
    assert code == 1
    assert "ValidationError: digits: golden case 0" in err
    assert ModelStore(state_dir).active("digits") == "1.0.0"
    assert "Traceback" not in err

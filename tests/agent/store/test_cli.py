"""``edge-agent models`` for a technician: install, list, activate, rollback, and clear errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from agent.cli import main
from agent.models.bundle import VariantSpec, build_bundle, pack
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


def test_an_onnx_file_straight_in(
    capsys: pytest.CaptureFixture[str],
    state_dir: Path,
    digits_path: Path,
    golden_x: np.ndarray,
    tmp_path: Path,
) -> None:
    sd = ("--state-dir", str(state_dir))
    golden = tmp_path / "golden.npz"
    np.savez(golden, input=golden_x)
    code, out, err = _run(
        capsys,
        "models",
        "install",
        str(digits_path),
        "--name",
        "digits",
        "--version",
        "1.0.0",
        "--golden",
        str(golden),
        "--preprocess",
        "resize=8x8",
        "--preprocess",
        "grayscale=true",
        "--activate",
        *sd,
    )
    assert code == 0, err
    assert "installed: digits 1.0.0" in out
    assert "active: digits 1.0.0" in out
    store = ModelStore(state_dir)
    manifest = store.manifest("digits", "1.0.0")
    assert manifest.preprocessing is not None
    assert manifest.preprocessing.resize == (8, 8)
    assert manifest.preprocessing.grayscale
    [case] = manifest.golden
    with np.load(store.path("digits", "1.0.0") / case.file.path) as npz:
        np.testing.assert_array_equal(npz["in:input"], golden_x)
    code, out, _ = _run(capsys, "models", "list", "--json", *sd)
    [row] = json.loads(out)
    assert row["serving"]["variant_id"] == "onnxruntime-fp32"
    assert row["serving"]["choice"] == "the only variant that fits this device"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--version", "1.0.0"], "needs --name and --version"),
        (["--name", "d", "--version", "1.0.0", "--preprocess", "resize"], "KEY=VALUE"),
        (["--name", "d", "--version", "1.0.0", "--preprocess", "layout=CHWN"], "layout"),
        (["--name", "d", "--version", "one"], "version"),
    ],
)
def test_onnx_install_mistakes_are_one_line(
    capsys: pytest.CaptureFixture[str],
    state_dir: Path,
    digits_path: Path,
    argv: list[str],
    message: str,
) -> None:
    code, _, err = _run(
        capsys, "models", "install", str(digits_path), *argv, "--state-dir", str(state_dir)
    )
    assert code != 0
    assert message in err
    assert "Traceback" not in err
    assert ModelStore(state_dir).names() == []


def test_variant_archives_install_as_one_version(
    capsys: pytest.CaptureFixture[str],
    state_dir: Path,
    model_files: dict[str, Path],
    golden_x: np.ndarray,
    tmp_path: Path,
) -> None:
    """What ``edgectl models pull`` writes: one archive per variant, the same version."""
    archives = []
    for vid, model in (("fast", "1.0.0"), ("slow", "slow")):
        bundle = tmp_path / vid
        build_bundle(
            bundle,
            "digits",
            "1.0.0",
            [VariantSpec(model_files[model], id=vid)],
            golden_inputs={"input": golden_x},
            reference_model=model_files["1.0.0"],
        )
        archives.append(pack(bundle, tmp_path / f"digits-1.0.0-{vid}.tar"))
    code, _, err = _run(
        capsys, "models", "install", *map(str, archives), "--state-dir", str(state_dir)
    )
    assert code == 0, err
    manifest = ModelStore(state_dir).verify("digits", "1.0.0")
    assert sorted(v.id for v in manifest.variants) == ["fast", "slow"]
    other = tmp_path / "other"
    build_bundle(
        other,
        "digits",
        "2.0.0",
        [VariantSpec(model_files["2.0.0"], id="x")],
        golden_inputs={"input": golden_x},
    )
    code, _, err = _run(
        capsys, "models", "install", str(archives[0]), str(other), "--state-dir", str(state_dir)
    )
    assert code != 0
    assert "cannot merge digits 2.0.0 into digits 1.0.0" in err

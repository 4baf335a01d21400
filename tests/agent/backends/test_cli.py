"""``edge-agent profile``, ``doctor`` and ``bench``: exit codes, tables, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.cli import EX_CONFIG, main
from tests.agent.backends.conftest import make_model, text_image

BOARDS = Path(__file__).resolve().parents[2] / "fixtures" / "boards"


def test_profile_json_of_a_recorded_board(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--json", "--root", str(BOARDS / "jetson-orin-nano-super-jp6")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["board"]["jetpack"] == "6.2"
    assert data["gpus"][0]["compute_capability"] == "8.7"


def test_profile_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile"]) == 0
    out = capsys.readouterr().out
    assert "hardware profile" in out
    assert "runtime onnxruntime" in out


def test_profile_bad_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["profile", "--root", str(tmp_path / "nope")]) == EX_CONFIG
    assert capsys.readouterr().err.startswith("ConfigError: --root is not a directory")


def test_doctor_lists_every_runtime(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("onnxruntime", "openvino", "tensorrt"):
        assert name in out
    assert "CPUExecutionProvider" in out


def test_bench_marks_the_chosen(
    capsys: pytest.CaptureFixture[str], digits_path: Path, digits_int8: Path
) -> None:
    code = main(
        ["bench", str(digits_path), "--int8", str(digits_int8), "--budget-s", "2", "--json"]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    ids = [m["candidate"] for m in data["measurements"]]
    assert data["chosen"] in ids
    assert any(i.startswith("onnxruntime:int8") for i in ids)
    assert main(["bench", str(digits_path), "--budget-s", "1"]) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out
    assert "chosen:" in out
    assert "*" in out


def test_bench_dynamic_shape_and_golden(
    capsys: pytest.CaptureFixture[str], ppocr_path: Path, tmp_path: Path
) -> None:
    golden = tmp_path / "golden.npz"
    np.savez(golden, **{"in:x": text_image(64, 64)})
    assert (
        main(["bench", str(ppocr_path), "--golden", str(golden), "--budget-s", "1", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["backend"] in ("onnxruntime", "openvino")
    assert main(["bench", str(ppocr_path), "--shape", "y=1x3x64x64"]) == EX_CONFIG
    assert "ConfigError: --shape names unknown input(s) ['y']" in capsys.readouterr().err
    assert main(["bench", str(ppocr_path), "--shape", "x=1xbad"]) == EX_CONFIG
    assert "ConfigError: --shape wants NAME=1x3x640x640" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "ModelLoadError: m: model file not found:"),
        (b"\x00\x01 definitely not onnx", "ModelLoadError: m: corrupt or not an ONNX file"),
    ],
    ids=["missing", "corrupt"],
)
def test_bench_bad_model_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    assert main(["bench", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


def test_bench_unsupported_opset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = make_model(tmp_path / "m.onnx", opset=99)
    assert main(["bench", str(path)]) == 1
    assert "ModelLoadError: m:" in capsys.readouterr().err


def test_bench_missing_int8_file(
    capsys: pytest.CaptureFixture[str], digits_path: Path, tmp_path: Path
) -> None:
    assert main(["bench", str(digits_path), "--int8", str(tmp_path / "q.onnx")]) == 1
    assert "ModelLoadError: q: model file not found" in capsys.readouterr().err


def test_subprocess_exit_code_and_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModelLoadError: broken: corrupt or not an ONNX file")

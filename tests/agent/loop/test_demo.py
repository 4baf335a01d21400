"""``python -m demo.local`` runs both real models and exits 0."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo import local as demo


def test_demo_runs_both_models(
    ppocr_path: Path, digits_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo.main(seconds=0.5) == 0
    out = capsys.readouterr().out
    assert "ppocr-det" in out
    assert "digits-cnn" in out
    accuracy = float(out.split("images it saw:")[1].strip().rstrip("%"))
    assert accuracy > 80.0

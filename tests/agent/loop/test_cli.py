"""``edge-agent run``: a real model from the command line, clean stops, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from agent.cli import EX_CONFIG, main
from tests.conftest import ROOT


def write_config(path: Path, **loop: Any) -> Path:
    lines = ["[loop]"] + [f"{k} = {json.dumps(v)}" for k, v in loop.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def final_stats(out: str) -> dict[str, Any]:
    line = out.strip().splitlines()[-1]
    stats: dict[str, Any] = json.loads(line)
    return stats


def test_run_a_model_for_a_duration_with_a_sink(
    digits_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = tmp_path / "results.jsonl"
    config = write_config(tmp_path / "agent.toml", window_s=0.2, rate_hz=100.0, sink_path=str(sink))
    code = main(["run", "--config", str(config), "--model", str(digits_path), "--duration", "0.6"])
    out, err = capsys.readouterr()
    assert code == 0
    stats = final_stats(out)
    assert stats["model"] == digits_path.stem
    assert stats["state"] == "stopped"
    assert stats["total_count"] > 0
    assert len(sink.read_text().splitlines()) == stats["total_count"]
    windows = [json.loads(line) for line in err.splitlines() if '"loop_window"' in line]
    assert windows  # one structlog event per window when stdout is not a TTY
    assert windows[-1]["total_count"] == stats["total_count"]


def test_run_an_image_folder_from_the_config_to_its_end(
    digits_path: Path, digit_frames: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames, _ = digit_frames
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.stack([frames[i]] * 3, axis=-1)).save(folder / f"{i}.png")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[[models]]\nname = "digits"\npath = "{digits_path}"\n\n'
        f'[loop]\nsource = "images"\nsource_path = "{folder}"\nrate_hz = 1000.0\n'
        'drop_policy = "catch_up"\n'
    )
    assert main(["run", "--config", str(config)]) == 0
    stats = final_stats(capsys.readouterr().out)
    assert (stats["model"], stats["total_count"], stats["total_failed"]) == ("digits", 5, 0)


def test_unthrottled_synthetic_run_with_a_shape(
    ppocr_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--model", str(ppocr_path), "--rate", "0", "--shape", "1x3x64x64"]
    assert main([*args, "--duration", "0.5"]) == 0
    assert final_stats(capsys.readouterr().out)["total_count"] > 0


def run_failing(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    # Configuration errors exit 78 (EX_CONFIG, not restarted by systemd); the others 1.
    assert code == (EX_CONFIG if "ConfigError: " in err else 1)
    last = err.strip().splitlines()[-1]
    assert sum(1 for line in err.splitlines() if line.startswith(last.split(":")[0])) == 1
    return last


def test_missing_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sink = tmp_path / "r.jsonl"
    config = write_config(tmp_path / "a.toml", sink_path=str(sink))
    line = run_failing(
        ["run", "--config", str(config), "--model", str(tmp_path / "gone.onnx")], capsys
    )
    assert line.startswith("ModelLoadError: gone: ")
    assert "not found" in line
    assert not sink.exists()


def test_corrupt_model_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "broken.onnx"
    model.write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    sink = tmp_path / "r.jsonl"
    config = write_config(tmp_path / "a.toml", sink_path=str(sink))
    line = run_failing(["run", "--config", str(config), "--model", str(model)], capsys)
    assert line.startswith("ModelLoadError: broken: ")
    assert not sink.exists()


@pytest.mark.parametrize(
    ("config_text", "extra", "match"),
    [
        ("[loop\nrate_hz = 3", [], "cannot read config"),
        ("[loop]\nrate_hz = -1\n", [], "rate_hz"),
        ('[loop]\nsource = "webcam"\n', [], "source"),
        ("", [], "no model to run"),
        ('[[models]]\nname = "m"\n', [], "no path configured"),
        ('[loop]\nsource = "images"\n', ["--model", "DIGITS"], "needs loop.source_path"),
        (
            '[loop]\nsource = "images"\nsource_path = "/nonexistent/x"\n',
            ["--model", "DIGITS"],
            "image folder not found",
        ),
        ('[loop]\nsource = "callback"\n', ["--model", "DIGITS"], "in-process"),
        ("", ["--model", "DIGITS", "--duration", "0"], "--duration"),
        ("", ["--model", "DIGITS", "--rate", "-3"], "--rate"),
        ("", ["--model", "DIGITS", "--shape", "1xAx8"], "--shape"),
        ("", ["--model", "DIGITS", "--shape", "1x3x8x8"], "does not fit"),
    ],
)
def test_bad_configuration_is_one_clear_line(
    config_text: str,
    extra: list[str],
    match: str,
    digits_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sink = tmp_path / "r.jsonl"
    config = tmp_path / "a.toml"
    sink_line = f'sink_path = "{sink}"\n'
    if "[loop]\n" in config_text:
        config.write_text(config_text.replace("[loop]\n", "[loop]\n" + sink_line))
    else:
        config.write_text(config_text + "\n[loop]\n" + sink_line)
    extra = [str(digits_path) if a == "DIGITS" else a for a in extra]
    line = run_failing(["run", "--config", str(config), *extra], capsys)
    assert line.startswith("ConfigError: ")
    assert match in line
    assert not sink.exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = run_failing(["run", "--config", str(tmp_path / "nope.toml")], capsys)
    assert line.startswith("ConfigError: config file not found")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_loop_cleanly(
    sig: signal.Signals, digits_path: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "a.toml", window_s=0.1, rate_hz=200.0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "run",
            "--config",
            str(config),
            "--model",
            str(digits_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the first closed window proves the loop is running
            if '"loop_window"' in line:
                break
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    stats = final_stats(out)
    assert stats["state"] == "stopped"
    assert stats["total_count"] > 0

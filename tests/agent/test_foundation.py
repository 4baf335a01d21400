"""The contracts and configuration every part builds on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.backends import Artifact, LoadOptions, load_first
from agent.config import load_settings
from agent.contracts.manifest import semver_key
from agent.errors import ConfigError, InputError, ModelLoadError
from agent.samples import DigitsData


def test_digits_cnn_is_a_real_classifier(digits_path: Path, digits: DigitsData) -> None:
    session = load_first(Artifact(digits_path, name="digits"), LoadOptions())
    logits = session.run({"input": digits.x_test})["logits"]
    assert (logits.argmax(axis=1) == digits.y_test).mean() > 0.95


def test_wrong_shape_names_the_tensor(digits_path: Path) -> None:
    session = load_first(Artifact(digits_path, name="digits"), LoadOptions())
    with pytest.raises(InputError, match=r"digits: input 'input': shape 1x1x9x9"):
        session.run({"input": np.zeros((1, 1, 9, 9), np.float32)})
    with pytest.raises(InputError, match="dtype float64"):
        session.run({"input": np.zeros((1, 1, 8, 8), np.float64)})


def test_corrupt_model_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError, match="bad: corrupt or not an ONNX file"):
        load_first(Artifact(bad, name="bad"), LoadOptions())


def test_config_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "robot-1"\n[loop]\nrate_hz = 10\n')
    monkeypatch.setenv("EDGE_AGENT__LOOP__RATE_HZ", "50")
    settings = load_settings(cfg)
    assert settings.device_id == "robot-1"
    assert settings.loop.rate_hz == 50


def test_config_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[loop]\nrate_hz = -1\n")
    with pytest.raises(ConfigError, match="rate_hz"):
        load_settings(bad)


def test_semver_ordering() -> None:
    versions = ["1.0.0", "1.0.0-rc.1", "0.9.10", "1.10.0", "1.2.0", "1.0.0-alpha"]
    assert sorted(versions, key=semver_key) == [
        "0.9.10",
        "1.0.0-alpha",
        "1.0.0-rc.1",
        "1.0.0",
        "1.2.0",
        "1.10.0",
    ]

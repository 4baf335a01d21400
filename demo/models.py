"""The demo's model: two versions of the digits CNN and the sample sets their builds need.

v1.0.0 is ``agent.samples.digits_cnn`` (trained once and cached); v1.1.0 is the same network
retrained with another seed and more epochs, cached beside it. The calibration set is training
images, the validation set the held-out labelled images, so every quantized variant the control
plane builds is measured against FP32 on real labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.samples import DIGITS_VERSION, digits_cnn, digits_data, sample_cache_dir

__all__ = ["DemoModels", "prepare_models"]

MODEL_NAME = "digits"
V1, V2 = "1.0.0", "1.1.0"
V2_SEED, V2_EPOCHS = 7, 40
CALIBRATION_SAMPLES = 128


@dataclass(frozen=True)
class DemoModels:
    name: str
    versions: dict[str, Path]  # version -> ONNX file
    calibration: Path
    validation: Path


def _retrained(cache: Path) -> Path:
    dest = cache / f"digits-cnn-v{DIGITS_VERSION}-seed{V2_SEED}-e{V2_EPOCHS}.onnx"
    if dest.exists():
        return dest
    import onnx

    # The training and export steps of agent.samples, with another seed and epoch count.
    from agent.samples import _digits_onnx, _train_digits

    channels = 16
    params = _train_digits(digits_data(), channels=channels, epochs=V2_EPOCHS, seed=V2_SEED)
    model = _digits_onnx(params, channels)
    onnx.checker.check_model(model)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    onnx.save(model, str(tmp))
    tmp.replace(dest)
    return dest


def prepare_models(work_dir: Path) -> DemoModels:
    cache = sample_cache_dir()
    data = digits_data()
    work_dir.mkdir(parents=True, exist_ok=True)
    calibration = work_dir / "calibration.npz"
    validation = work_dir / "validation.npz"
    np.savez(calibration, input=data.x_train[:CALIBRATION_SAMPLES])
    np.savez(validation, input=data.x_test, labels=data.y_test)
    return DemoModels(
        name=MODEL_NAME,
        versions={V1: digits_cnn(), V2: _retrained(cache)},
        calibration=calibration,
        validation=validation,
    )

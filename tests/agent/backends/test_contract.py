"""The contract every backend passes, run on each backend installed here."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.backends import Artifact, Backend, LoadOptions, get_backend
from agent.backends.base import Session
from agent.backends.choice import rel_l2
from agent.errors import InferenceError, InputError, ModelLoadError
from agent.samples import DigitsData
from tests.agent.backends.conftest import INSTALLED, make_model, text_image


def _load(backend: Backend, path: Path, name: str = "m", **kw: object) -> Session:
    return backend.load(Artifact(path, name=name), LoadOptions(**kw))  # type: ignore[arg-type]


def test_ppocr_detector_runs(backend: Backend, ppocr_path: Path) -> None:
    session = _load(backend, ppocr_path, "ppocr")
    assert session.backend == backend.name
    assert [s.name for s in session.inputs] == ["x"]
    assert session.inputs[0].shape == (-1, 3, -1, -1)
    assert [s.name for s in session.outputs] == ["sigmoid_0.tmp_0"]
    out = session.run({"x": text_image(96, 96)})
    prob = out["sigmoid_0.tmp_0"]
    assert prob.shape == (1, 1, 96, 96)
    assert prob.dtype == np.float32
    assert prob.min() >= 0.0
    assert prob.max() <= 1.0
    session.close()


def test_digits_cnn_classifies(backend: Backend, digits_path: Path, digits: DigitsData) -> None:
    session = _load(backend, digits_path, "digits")
    logits = session.run({"input": digits.x_test})["logits"]
    assert logits.shape == (len(digits.x_test), 10)
    assert (logits.argmax(axis=1) == digits.y_test).mean() > 0.95


def test_dynamic_axes(backend: Backend, tmp_path: Path) -> None:
    session = _load(backend, make_model(tmp_path / "dyn.onnx"), "dyn")
    assert session.inputs[0].shape == (-1, -1)
    assert {s.name for s in session.outputs} == {"y", "z"}
    for shape in [(1, 1), (2, 3), (7, 33)]:
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        out = session.run({"x": x})
        np.testing.assert_allclose(out["y"], np.maximum(x, 0) + 0.5, rtol=1e-6)
        np.testing.assert_allclose(out["z"], x * 2, rtol=1e-6)


def test_outputs_are_not_overwritten_by_the_next_run(backend: Backend, tmp_path: Path) -> None:
    session = _load(backend, make_model(tmp_path / "dyn.onnx"), "dyn")
    first = session.run({"x": np.ones((2, 3), np.float32)})["z"]
    session.run({"x": np.full((2, 3), 5.0, np.float32)})
    np.testing.assert_array_equal(first, np.full((2, 3), 2.0, np.float32))


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"x": np.zeros((2, 3), np.float64)}, r"syn: input 'x': dtype float64 where FP32"),
        ({"x": np.zeros((2, 3), np.int64)}, r"input 'x': dtype int64"),
        ({"x": np.zeros((2, 3, 4), np.float32)}, r"input 'x': shape 2x3x4 where \?x\? is expected"),
        ({"nope": np.zeros((2, 3), np.float32)}, r"unknown input\(s\) \['nope'\]"),
        ({}, r"missing input 'x'"),
        ({"x": np.zeros((2, 3), np.float32), "extra": np.zeros(1)}, r"unknown input"),
    ],
    ids=["float64", "int64", "rank", "name", "missing", "extra"],
)
def test_bad_feed_names_the_tensor_and_session_survives(
    backend: Backend, tmp_path: Path, feeds: dict[str, np.ndarray], message: str
) -> None:
    session = _load(backend, make_model(tmp_path / "syn.onnx"), "syn")
    with pytest.raises(InputError, match=message):
        session.run(feeds)
    ok = session.run({"x": np.ones((2, 3), np.float32)})
    np.testing.assert_allclose(ok["y"], 1.5)


def test_wrong_static_shape_names_the_tensor(backend: Backend, digits_path: Path) -> None:
    session = _load(backend, digits_path, "digits")
    with pytest.raises(InputError, match=r"digits: input 'input': shape 1x1x9x9"):
        session.run({"input": np.zeros((1, 1, 9, 9), np.float32)})
    assert session.run({"input": np.zeros((1, 1, 8, 8), np.float32)})["logits"].shape == (1, 10)


def test_missing_file(backend: Backend, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^gone: model file not found: .*gone.onnx"):
        _load(backend, tmp_path / "gone.onnx", "gone")
    assert not (tmp_path / "gone.onnx").exists()


@pytest.mark.parametrize("content", [b"not a model at all", b"", b"\x08\x07\x3a\xff\xff"])
def test_corrupt_file(backend: Backend, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"^bad: .*(corrupt|cannot load)"):
        _load(backend, bad, "bad")
    assert bad.read_bytes() == content  # the file is left as it was


def test_truncated_model(backend: Backend, tmp_path: Path, ppocr_path: Path) -> None:
    cut = tmp_path / "cut.onnx"
    data = ppocr_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"^cut: "):
        _load(backend, cut, "cut")


def test_unsupported_opset(backend: Backend, tmp_path: Path) -> None:
    path = make_model(tmp_path / "op99.onnx", opset=99)
    with pytest.raises(ModelLoadError, match=r"^op99: .*opset"):
        _load(backend, path, "op99")


def test_concurrent_runs_are_safe(backend: Backend, digits_path: Path, digits: DigitsData) -> None:
    session = _load(backend, digits_path, "digits")
    expected = session.run({"input": digits.x_test[:64]})["logits"]
    failures: list[str] = []

    def worker(seed: int) -> None:
        for _ in range(20):
            got = session.run({"input": digits.x_test[:64]})["logits"]
            if not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
                failures.append(f"thread {seed}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_closed_session_refuses_to_run(backend: Backend, tmp_path: Path) -> None:
    session = _load(backend, make_model(tmp_path / "c.onnx"), "c")
    session.close()
    with pytest.raises(InferenceError, match="closed"):
        session.run({"x": np.ones((1, 1), np.float32)})


def test_backends_agree(ppocr_path: Path, digits_path: Path, digits: DigitsData) -> None:
    names = [p.values[0] for p in INSTALLED]
    sessions = {n: get_backend(n).load(Artifact(ppocr_path), LoadOptions()) for n in names}
    x = text_image(128, 160, seed=3)
    outs = {n: s.run({"x": x}) for n, s in sessions.items()}
    ref = outs["onnxruntime"]
    for name, out in outs.items():
        assert rel_l2(out, ref)[0] < 1e-4, name
    digit_outs = {
        n: get_backend(n).load(Artifact(digits_path), LoadOptions()).run({"input": digits.x_test})
        for n in names
    }
    for name, out in digit_outs.items():
        assert rel_l2(out, digit_outs["onnxruntime"])[0] < 1e-5, name


def test_int8_model_stays_close_to_fp32(
    backend: Backend, digits_path: Path, digits_int8: Path, digits: DigitsData
) -> None:
    fp32 = _load(backend, digits_path).run({"input": digits.x_test})["logits"]
    session = backend.load(Artifact(digits_int8, precision="int8"), LoadOptions())
    assert session.precision == "int8"
    int8 = session.run({"input": digits.x_test})["logits"]
    assert (int8.argmax(1) == fp32.argmax(1)).mean() > 0.97
    assert rel_l2({"l": int8}, {"l": fp32})[0] < 0.1

"""String tensors: the protocol's BYTES (Python ``bytes``) round-trip through ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.backends import Artifact, LoadOptions
from agent.backends.onnxruntime import OnnxRuntimeBackend, OrtSession, OrtStringSession
from agent.backends.ort_worker import OrtWorkerSession
from agent.errors import InputError


def _identity(path: Path, elem: int) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "identity",
        [helper.make_tensor_value_info("text", elem, [-1])],
        [helper.make_tensor_value_info("same", elem, [-1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_bytes_round_trip(tmp_path: Path) -> None:
    session = OnnxRuntimeBackend().load(
        Artifact(_identity(tmp_path / "s.onnx", TensorProto.STRING), name="echo"), LoadOptions()
    )
    assert isinstance(session, OrtStringSession)
    words = np.array([b"robot", "caf\u00e9".encode()], dtype=object)
    out = session.run({"text": words})["same"]
    assert list(out) == [b"robot", "caf\u00e9".encode()]
    with pytest.raises(InputError, match="not valid UTF-8"):
        session.run({"text": np.array([b"\xff\xfe"], dtype=object)})


def test_numeric_models_take_the_plain_session(tmp_path: Path) -> None:
    session = OnnxRuntimeBackend().load(
        Artifact(_identity(tmp_path / "f.onnx", TensorProto.FLOAT), name="f"), LoadOptions()
    )
    assert type(session) is OrtSession


def test_bytes_round_trip_through_a_worker_process(tmp_path: Path) -> None:
    """Object tensors cannot go through the worker's shared memory: they travel pickled, and a
    bad one still fails as ``InputError`` while the worker serves on."""
    session = OnnxRuntimeBackend().load(
        Artifact(_identity(tmp_path / "s.onnx", TensorProto.STRING), name="echo"),
        LoadOptions(ort_process="always"),
    )
    try:
        assert isinstance(session, OrtWorkerSession)
        words = np.array([b"robot", "caf\u00e9".encode()], dtype=object)
        assert list(session.run({"text": words})["same"]) == [b"robot", "caf\u00e9".encode()]
        with pytest.raises(InputError, match="not valid UTF-8"):
            session.run({"text": np.array([b"\xff\xfe"], dtype=object)})
        assert list(session.run({"text": words[:1]})["same"]) == [b"robot"]
    finally:
        session.close()

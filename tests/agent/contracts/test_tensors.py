"""``TensorSpec.value_range`` and ``max_shape``: the bounds on an input that the build finds
in the graph or reads from the model's metadata, that the local API checks, and how they
travel in a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from agent.contracts.tensors import TensorSpec, check_feed
from control_plane.builds._onnx import index_ranges, read_source
from control_plane.builds.errors import BuildInputError

_INT = st.sampled_from([np.int8, np.int32, np.int64, np.uint8, np.uint16])


@given(
    array=_INT.flatmap(lambda t: hnp.arrays(t, hnp.array_shapes(min_dims=1, max_dims=3))),
    low=st.integers(-200, 200),
    width=st.integers(0, 300),
)
def test_a_feed_fits_its_range_exactly_when_every_value_lies_inside(
    array: np.ndarray, low: int, width: int
) -> None:
    spec = TensorSpec(
        name="ids",
        datatype={"b": "INT8", "B": "UINT8", "H": "UINT16", "i": "INT32", "l": "INT64"}[
            array.dtype.char
        ],
        shape=(-1,) * array.ndim,
        value_range=(low, low + width),
    )
    inside = array.size == 0 or (int(array.min()) >= low and int(array.max()) <= low + width)
    problem = check_feed(spec, array)
    assert (problem is None) == inside, problem
    if problem is not None:
        assert problem.startswith(f"input 'ids': values must lie in [{low}, {low + width}]")


def test_the_range_is_left_out_of_the_json_where_unset_and_read_back_where_set() -> None:
    plain = TensorSpec(name="x", datatype="FP32", shape=(1, 3))
    assert json.loads(plain.model_dump_json()) == {"name": "x", "datatype": "FP32", "shape": [1, 3]}
    bounded = TensorSpec(name="ids", datatype="INT64", shape=(-1, -1), value_range=(0, 9))
    assert TensorSpec.model_validate_json(bounded.model_dump_json()) == bounded
    with pytest.raises(ValueError, match=r"value_range \[5, 4\] is empty"):
        TensorSpec(name="ids", datatype="INT64", shape=(-1,), value_range=(5, 4))


def test_index_ranges_name_the_rows_of_the_smallest_table_an_input_indexes() -> None:
    tables = [
        numpy_helper.from_array(np.zeros((50, 4), np.float32), "big"),
        numpy_helper.from_array(np.zeros((3, 4), np.float32), "small"),
        numpy_helper.from_array(np.zeros((4, 7), np.float32), "wide"),
    ]
    nodes = [
        helper.make_node("Gather", ["big", "ids"], ["a"]),
        helper.make_node("Gather", ["small", "both"], ["b"]),
        helper.make_node("Gather", ["big", "both"], ["c"]),
        helper.make_node("Gather", ["wide", "cols"], ["d"], axis=1),
        helper.make_node("Gather", ["x", "ids"], ["e"]),  # a table that is an input: no bound
        helper.make_node("Add", ["x", "x"], ["f"]),
    ]
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, [-1]) for n in ("ids", "both", "cols")
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abcdef"]
    graph = helper.make_graph(nodes, "g", [*ints, x], outs, initializer=tables)
    assert index_ranges(graph) == {"ids": (0, 49), "both": (0, 2), "cols": (0, 6)}


def _declaring(tmp_path: Path, declared: str | None) -> Path:
    """A two-input model (ids ``batch x sequence``, a fixed ``1 x 4`` scale) whose metadata
    declares ``declared`` as its ``max_shape``."""
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "table")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"]),
            helper.make_node("Mul", ["rows", "scale"], ["out"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1, 4]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "sequence", 4])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if declared is not None:
        helper.set_model_props(model, {"max_shape": declared})
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_a_declared_max_shape_reaches_the_specs_and_a_misfit_is_refused_by_name(
    tmp_path: Path,
) -> None:
    source = read_source(_declaring(tmp_path, '{"ids": [-1, 16], "scale": [1, -1]}'))
    specs = {s.name: s for s in source.inputs}
    assert specs["ids"].max_shape == (-1, 16)
    assert specs["ids"].value_range == (0, 9)
    assert specs["scale"].max_shape == (1, -1)
    assert specs["scale"].value_range is None
    assert read_source(_declaring(tmp_path, None)).inputs[0].max_shape is None
    for declared, why in (
        ("[-1, 16]", "not a JSON object"),
        ('{"ids": [-1, "16"]}', "not a JSON object"),
        ("{", "not a JSON object"),
        ('{"tokens": [-1, 16]}', r"names no input \['tokens'\]"),
        ('{"ids": [16]}', r"max_shape \[16\] does not fit shape \[-1, -1\]"),
        ('{"scale": [2, 4]}', r"max_shape \[2, 4\] does not fit shape \[1, 4\]"),
        ('{"ids": [-1, 0]}', "does not fit shape"),
    ):
        with pytest.raises(BuildInputError, match=why) as info:
            read_source(_declaring(tmp_path, declared))
        assert info.value.field == "onnx"

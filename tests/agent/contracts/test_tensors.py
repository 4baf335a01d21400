"""``TensorSpec.value_range``: the bound on an index input that the build finds in the graph
and the local API checks, and how it travels in a manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from agent.contracts.tensors import TensorSpec, check_feed
from control_plane.builds._onnx import index_ranges

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

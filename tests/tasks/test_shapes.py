"""tasks/shapes.py: the one model-I/O type, dtype map, default batch range and synthetic rule."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from tasks.shapes import (TensorInfo, default_batch_range, model_io, numpy_dtype, opt_shapes, synthetic_array,
                          synthetic_inputs)
from tests import models


def test_model_io_of_a_loaded_model_and_of_a_path_agree(tmp_path):
    proto = models.two_input_model()
    io = model_io(proto)
    assert [(t.name, t.dtype, t.shape, t.dynamic_dims) for t in io.inputs] == [
        ("features", "float32", ["N", 16], [0]), ("ids", "int64", ["N", 4], [0])]
    assert io.input("ids").np_dtype() == np.int64 and io.input("nope") is None
    assert model_io(models.save(proto, tmp_path / "m.onnx")) == io


@pytest.mark.parametrize("item", [
    {"name": "x", "dtype": "float32", "shape": [-1, 3, 8, 8]},
    {"name": "x", "elem_type": TensorProto.FLOAT, "shape": ("N", 3, 8, 8)},
    TensorInfo("x", "float32", ("N", 3, 8, 8)),
])
def test_every_description_of_an_input_becomes_one_tensor_info(item):
    info = TensorInfo.from_any(item)
    assert info.name == "x" and info.dtype == "float32" and info.dynamic_dims == [0] and len(info.shape) == 4


def test_a_description_without_dtype_says_what_to_give():
    with pytest.raises(ValueError, match="dtype"):
        TensorInfo.from_any({"name": "x", "shape": [1]})


@pytest.mark.parametrize("value, name", [("FLOAT", "float32"), ("tensor(float)", "float32"), ("tensor(double)", "float64"),
                                         (TensorProto.INT64, "int64"), (np.dtype("float16"), "float16"),
                                         ("HALF", "float16"), ("bool", "bool")])
def test_numpy_dtype_map(value, name):
    assert numpy_dtype(value).name == name


def test_default_batch_range_caps_opt_at_max():
    assert default_batch_range(8, 32) == (1, 8, 32)
    assert default_batch_range(64, 16) == (1, 16, 16)


def test_synthetic_rule_per_dtype_is_seeded():
    rng = np.random.default_rng(0)
    assert synthetic_array([4], np.float32, rng).dtype == np.float32
    assert synthetic_array([100], np.int64, rng, int_high=3).max() < 3
    assert synthetic_array([100], np.uint8, rng).max() > 10
    assert synthetic_array([3], np.bool_, rng).dtype == np.bool_
    with pytest.raises(TypeError):
        synthetic_array([1], np.complex64, rng)
    a = synthetic_inputs({"x": np.float32}, {"x": [2, 2]}, seed=7)
    assert np.array_equal(a["x"], synthetic_inputs({"x": np.float32}, {"x": [2, 2]}, seed=7)["x"])
    assert opt_shapes({"x": {"min": [1], "opt": [4], "max": [8]}}) == {"x": [4]}

"""tasks/fp16.py's converter choice: ModelOpt AutoCast where it imports (here a TEST DOUBLE of
``modelopt.onnx.autocast`` that records its call), onnxruntime's converter otherwise, and the Q/DQ
graph over FP16 (opset 19, float16 scales) that strongly typed INT8 builds take."""
from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tasks.errors import InfraError, ModelError
from tasks.fp16 import TENSORRT_FP16_OP_BLOCK_LIST, fp16_graph_from_onnx
from tests.models import save, small_cnn


@pytest.fixture
def autocast(monkeypatch):
    """TEST DOUBLE of modelopt.onnx.autocast: records the keyword arguments, converts with onnxruntime."""
    calls = []

    def convert_to_mixed_precision(onnx_path, low_precision_type="fp16", nodes_to_exclude=None,
                                   op_types_to_exclude=None, keep_io_types=False, data_max=512, init_max=65504):
        calls.append(dict(onnx_path=onnx_path, low_precision_type=low_precision_type, nodes_to_exclude=nodes_to_exclude,
                          op_types_to_exclude=op_types_to_exclude, keep_io_types=keep_io_types))
        from onnxruntime.transformers.float16 import convert_float_to_float16

        return convert_float_to_float16(onnx.load(onnx_path), keep_io_types=keep_io_types)

    module = types.ModuleType("modelopt.onnx.autocast")
    module.convert_to_mixed_precision = convert_to_mixed_precision
    for name in ("modelopt", "modelopt.onnx"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "modelopt.onnx.autocast", module)
    return calls


def test_autocast_is_used_when_installed_with_the_specs_fp32_nodes(autocast, tmp_path):
    path = save(small_cnn(), tmp_path / "m.onnx")
    out = fp16_graph_from_onnx(path, tmp_path / "m.fp16.onnx", op_block_list=["Gemm"], node_block_list=["conv2"])
    assert out.converter == "modelopt-autocast" and out.to_record()["converter"] == "modelopt-autocast"
    (call,) = autocast
    assert call["low_precision_type"] == "fp16" and call["keep_io_types"] is True
    assert call["nodes_to_exclude"] == ["^conv2$"] and call["op_types_to_exclude"] == ["Gemm"]
    onnx.checker.check_model(onnx.load(str(out.path)))
    assert fp16_graph_from_onnx(path, tmp_path / "o.onnx", converter="onnxruntime").converter == "onnxruntime"


def test_modelopt_converter_without_modelopt_is_an_infra_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelopt", None)
    path = save(small_cnn(), tmp_path / "m.onnx")
    assert fp16_graph_from_onnx(path, tmp_path / "a.onnx").converter == "onnxruntime"  # auto falls back
    with pytest.raises(InfraError, match="ModelOpt is not installed") as err:
        fp16_graph_from_onnx(path, tmp_path / "b.onnx", converter="modelopt")
    assert "fp16.converter: auto" in err.value.fix
    with pytest.raises(ModelError, match="unknown FP16 converter"):
        fp16_graph_from_onnx(path, tmp_path / "c.onnx", converter="bf16")


def test_the_tensorrt_block_list_leaves_topk_range_cumsum_min_max_resize_to_fp16():
    for op in ("TopK", "Range", "CumSum", "Min", "Max", "Resize", "Upsample"):
        assert op not in TENSORRT_FP16_OP_BLOCK_LIST
    assert "NonMaxSuppression" in TENSORRT_FP16_OP_BLOCK_LIST and "RoiAlign" in TENSORRT_FP16_OP_BLOCK_LIST


def test_min_max_stay_fp16_in_the_onnxruntime_conversion(monkeypatch, tmp_path):
    """onnxruntime's default list would put Casts around Max; TensorRT runs it in FP16."""
    monkeypatch.setitem(sys.modules, "modelopt", None)
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["m"], name="mul"), helper.make_node("Max", ["m", "x"], ["y"], name="max")],
        "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.full((4,), 0.5, np.float32), "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = fp16_graph_from_onnx(save(model, tmp_path / "mm.onnx"), tmp_path / "mm.fp16.onnx")
    converted = onnx.load(str(out.path))
    assert [n.op_type for n in converted.graph.node].count("Cast") == 2  # only the kept-FP32 I/O
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    y = ort.InferenceSession(str(out.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, np.maximum(x * 0.5, x), rtol=1e-3, atol=1e-3)

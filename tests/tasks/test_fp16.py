"""FP16 graphs for strongly typed builds: they run in ORT and agree with FP32."""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from tasks.errors import ModelError
from tasks.fp16 import fp16_graph_from_onnx
from tests.models import save, small_cnn, two_input_model
from tests.trained import accuracy, train_small_cnn


def run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_small_cnn_fp16_graph_runs_and_agrees_with_fp32(tmp_path):
    path = save(small_cnn(), tmp_path / "m.onnx")
    out = fp16_graph_from_onnx(path, tmp_path / "m.fp16.onnx")
    m = onnx.load(str(out))
    onnx.checker.check_model(m, full_check=True)  # also: nodes in topological order
    assert m.ir_version == 8
    weights = {i.name: i for i in m.graph.initializer}
    assert weights["w1"].data_type == onnx.TensorProto.FLOAT16
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O kept float32
    x = np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)
    a, b = run(path, {"images": x}), run(out, {"images": x})
    assert b.dtype == np.float32 and cosine(a, b) > 0.999
    assert not np.array_equal(a, b)  # really computed in FP16


def test_trained_cnn_keeps_its_accuracy_in_fp16(tmp_path):
    model, eval_x, eval_y, _ = train_small_cnn(0)
    path = save(model, tmp_path / "bars.onnx")
    out = fp16_graph_from_onnx(path, tmp_path / "bars.fp16.onnx")
    a, b = run(path, {"images": eval_x}), run(out, {"images": eval_x})
    assert cosine(a, b) > 0.999 and accuracy(b, eval_y) == accuracy(a, eval_y)


def test_io_types_can_become_fp16_and_int_inputs_stay_int(tmp_path):
    path = save(two_input_model(), tmp_path / "two.onnx")
    out = fp16_graph_from_onnx(path, tmp_path / "two.fp16.onnx", keep_io_types=False)
    m = onnx.load(str(out))
    types = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    assert types == {"features": onnx.TensorProto.FLOAT16, "ids": onnx.TensorProto.INT64}
    rng = np.random.default_rng(0)
    feats, ids = rng.normal(size=(3, 16)).astype(np.float32), rng.integers(0, 50, size=(3, 4))
    a = run(path, {"features": feats, "ids": ids})
    b = run(out, {"features": feats.astype(np.float16), "ids": ids})
    assert b.dtype == np.float16 and cosine(a, b) > 0.999


def test_out_of_range_weights_are_reported_and_qdq_models_refused(tmp_path, caplog):
    m = small_cnn()
    for init in m.graph.initializer:
        if init.name == "w1":
            w = numpy_helper.to_array(init).copy()
            w[0, 0, 0, 0] = 1e6
            init.CopyFrom(numpy_helper.from_array(w, "w1"))
    path = save(m, tmp_path / "big.onnx")
    with caplog.at_level(logging.WARNING, logger="trtflow.fp16"):
        fp16_graph_from_onnx(path, tmp_path / "big.fp16.onnx")
    assert "1 weights exceed" in caplog.text

    from tasks.calibration import CalibrationData
    from tasks.quantize import qdq_model_from_calibration
    from tasks.spec import ModelSpec

    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    q = qdq_model_from_calibration(save(small_cnn(), tmp_path / "s.onnx"), CalibrationData({"images": x}, "a" * 64),
                                   ModelSpec(), tmp_path / "q.onnx")
    with pytest.raises(ModelError, match="already holds Q/DQ"):
        fp16_graph_from_onnx(q.out_path, tmp_path / "q.fp16.onnx")

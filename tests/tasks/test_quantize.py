"""Q/DQ models: TensorRT-oriented placement, structure guard, accuracy of the trained CNN under ORT, cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tasks.calibration import CalibrationData, load_calibration_data
from tasks.errors import InfraError, ModelError
from tasks.quantize import (ORT_DEFAULT, PLACEMENT, QdqCache, check_qdq_structure, choose_backend, fetch_cached_qdq,
                            plan_placement, qdq_cache, qdq_cache_key, qdq_model_from_calibration,
                            quantize_recipe, stats_path_for, store_cached_qdq)
from tasks.spec import parse_spec
from tests import models
from tests.models import save, small_cnn, two_input_model
from tests.trained import accuracy, int8_hostile_cnn, train_small_cnn

try:
    from tasks.metrics import compare_outputs, gate
except ImportError:  # pragma: no cover - metrics.py is written alongside; compute the two numbers here then
    compare_outputs = gate = None


def spec(**calibration):
    return parse_spec({"calibration": calibration} if calibration else {})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained bars CNN on disk, its eval set and a calibration folder of .npy files."""
    model, eval_x, eval_y, calib_x = train_small_cnn(0)
    root = tmp_path_factory.mktemp("bars")
    path = save(model, root / "model.onnx")
    calib = root / "calibration"
    calib.mkdir()
    np.save(calib / "images.npy", calib_x)
    return path, eval_x, eval_y, calib


def run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def graph(path):
    m = onnx.load(str(path))
    producers = {o: n for n in m.graph.node for o in n.output}
    nodes = {n.name: n for n in m.graph.node}
    return m, producers, nodes


def via_dq(producers, tensor) -> bool:
    return tensor in producers and producers[tensor].op_type == "DequantizeLinear"


def int8_gate(reference, actual, tolerance):
    if compare_outputs is not None:
        result = gate(compare_outputs(reference, actual), tolerance)
        return bool(result), result.summary()
    a, b = reference["logits"].ravel(), actual["logits"].ravel()
    cos = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    top1 = float((reference["logits"].argmax(1) == actual["logits"].argmax(1)).mean())
    return cos >= tolerance.min_cosine and top1 >= tolerance.min_top1, f"cosine {cos}, top1 {top1}"


# ---- the trained CNN under ORT --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_trained_cnn_qdq_model_runs_in_ort_within_the_int8_gate(trained, tmp_path, method):
    path, eval_x, eval_y, calib = trained
    s = spec(method=method)
    data = load_calibration_data(calib, s, [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    result = qdq_model_from_calibration(path, data, s, tmp_path / "model.qdq.onnx")
    assert result.backend == "onnxruntime" and result.method == method and result.placement == PLACEMENT
    assert check_qdq_structure(result.out_path) == []
    reference, actual = run(path, {"images": eval_x}), run(result.out_path, {"images": eval_x})
    assert accuracy(reference["logits"], eval_y) >= 0.9  # the FP32 model learnt its task
    passed, summary = int8_gate(reference, actual, s.tolerance("int8"))
    assert passed, summary
    assert accuracy(actual["logits"], eval_y) >= 0.9
    assert not np.allclose(reference["logits"], actual["logits"], atol=1e-5)  # it really is quantised
    stats = stats_path_for(result.out_path)
    assert result.stats_path == str(stats) and stats.exists()
    import json
    tensors = json.loads(stats.read_text())["tensors"]
    assert {"images", "r1", "r2", "flat"} <= set(tensors)
    assert tensors["r1"]["amax"] == pytest.approx(127 * tensors["r1"]["scale"])


def test_placement_quantises_weighted_inputs_and_the_residual_only(trained, tmp_path):
    path, _, _, calib = trained
    data = load_calibration_data(calib, spec(), [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    result = qdq_model_from_calibration(path, data, spec(), tmp_path / "q.onnx")
    m, producers, nodes = graph(result.out_path)
    inits = {i.name: i for i in m.graph.initializer}
    for name in ("conv1", "conv2", "conv3", "fc"):
        node = nodes[name]
        assert via_dq(producers, node.input[0]) and via_dq(producers, node.input[1]), name
        assert node.input[2] in inits and inits[node.input[2]].data_type == TensorProto.FLOAT, f"{name}: float bias"
        weight_q = producers[producers[node.input[1]].input[0]]
        assert weight_q.op_type == "QuantizeLinear" and inits[weight_q.input[0]].data_type == TensorProto.FLOAT
    # no Q/DQ between a Conv and its ReLU, around pooling/Flatten, or on the model output
    for name in ("relu1", "relu2", "relu3", "gap", "flatten"):
        assert not via_dq(producers, nodes[name].input[0]), name
    assert producers["logits"].op_type == "Gemm"
    # residual Add: the Conv-side input (fused by TensorRT) float, the skip input quantised, shared with conv2's
    add = nodes["add"]
    assert add.input[0] == "c2" and via_dq(producers, add.input[1])
    assert add.input[1] == nodes["conv2"].input[0]
    assert result.residual_adds == ["add"]
    assert sorted(result.quantized_nodes) == ["add", "conv1", "conv2", "conv3", "fc"]
    assert result.qdq_nodes == {"QuantizeLinear": 8, "DequantizeLinear": 8}
    assert m.ir_version == 8 and m.opset_import[0].version == 17


def test_onnxruntime_default_placement_is_what_trtflow_avoids(trained, tmp_path):
    path, eval_x, _, calib = trained
    data = load_calibration_data(calib, spec(), [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    ours = qdq_model_from_calibration(path, data, spec(), tmp_path / "ours.onnx")
    theirs = qdq_model_from_calibration(path, data, spec(), tmp_path / "ort.onnx", placement=ORT_DEFAULT)
    assert theirs.placement == ORT_DEFAULT and check_qdq_structure(theirs.out_path) == []
    _, producers, nodes = graph(theirs.out_path)
    assert via_dq(producers, nodes["relu1"].input[0])  # Conv -> Q/DQ -> Relu: splits Conv+ReLU fusion
    assert via_dq(producers, nodes["gap"].input[0])
    assert sum(theirs.qdq_nodes.values()) > sum(ours.qdq_nodes.values())


def test_the_int8_hostile_variant_is_exact_in_fp32_and_fails_the_int8_gate(trained, tmp_path):
    """The model tests/gpu and the flow tests use to exercise the INT8 -> FP16 fallback."""
    plain, eval_x, _, calib = trained
    model, _, _, _ = int8_hostile_cnn(0)
    path = save(model, tmp_path / "hostile.onnx")
    reference = run(plain, {"images": eval_x})
    np.testing.assert_array_equal(run(path, {"images": eval_x})["logits"], reference["logits"])
    data = load_calibration_data(calib, spec(), [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    result = qdq_model_from_calibration(path, data, spec(), tmp_path / "q.onnx")
    passed, summary = int8_gate(reference, run(result.out_path, {"images": eval_x}), spec().tolerance("int8"))
    assert not passed, summary
    with pytest.raises(ModelError, match="percentile method") as err:  # onnxruntime's histograms fail on its constant plane
        qdq_model_from_calibration(path, data, spec(method="percentile"), tmp_path / "p.onnx")
    assert "minmax" in err.value.fix


# ---- placement on hand-built graphs -------------------------------------------------------------
def _w(rng, *shape):
    return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32))


def block_model(batchnorm: bool = False) -> onnx.ModelProto:
    """x -> conv_a -> relu_a -> conv_b [-> bn] -+-> add -> relu -> pool -> flat -> fc(MatMul) -> + bias -> out
           \\-> conv_proj ---------------------/                          also: out2 = MatMul(flat, flat^T)"""
    rng = np.random.default_rng(0)
    inits = []

    def init(name, *shape):
        t = _w(rng, *shape)
        t.name = name
        inits.append(t)
        return name

    nodes = [
        helper.make_node("Conv", ["x", init("wa", 8, 4, 3, 3), init("ba", 8)], ["a"], name="conv_a", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", init("wb", 8, 8, 3, 3), init("bb", 8)], ["b"], name="conv_b", pads=[1] * 4),
        helper.make_node("Conv", ["x", init("wp", 8, 4, 1, 1), init("bp", 8)], ["p"], name="conv_proj"),
    ]
    b = "b"
    if batchnorm:
        inits.append(numpy_helper.from_array(np.ones(8, np.float32), "g"))
        inits.append(numpy_helper.from_array(np.zeros(8, np.float32), "beta"))
        inits.append(numpy_helper.from_array(np.zeros(8, np.float32), "mu"))
        inits.append(numpy_helper.from_array(np.ones(8, np.float32), "var"))
        nodes.append(helper.make_node("BatchNormalization", ["b", "g", "beta", "mu", "var"], ["bn"], name="bn"))
        b = "bn"
    nodes += [
        helper.make_node("Add", [b, "p"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["rs"], name="relu"),
        helper.make_node("GlobalAveragePool", ["rs"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", init("wf", 8, 5)], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", init("bias", 5)], ["out"], name="bias_add"),
        helper.make_node("Transpose", ["flat"], ["flat_t"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["flat", "flat_t"], ["out2"], name="gram"),
    ]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5]),
                           helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["N", "N"])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def block_data(n=32):
    x = np.random.default_rng(1).normal(size=(n, 4, 8, 8)).astype(np.float32)
    return CalibrationData({"x": x}, "d" * 64)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_projection_shortcut_quantises_the_shorter_branch_and_leaves_the_fused_conv_float(tmp_path, batchnorm):
    path = save(block_model(batchnorm), tmp_path / "block.onnx")
    plan = plan_placement(block_model(batchnorm))
    assert plan.residual_adds == {"add": 0}  # conv_b's branch is deeper: TensorRT fuses it with the Add
    result = qdq_model_from_calibration(path, block_data(), spec(), tmp_path / "q.onnx")
    assert check_qdq_structure(result.out_path) == []
    _, producers, nodes = graph(result.out_path)
    add = nodes["add"]
    assert add.input[0] == ("bn" if batchnorm else "b") and via_dq(producers, add.input[1])
    # x feeds conv_a and conv_proj through one shared pair
    assert nodes["conv_a"].input[0] == nodes["conv_proj"].input[0] and via_dq(producers, nodes["conv_a"].input[0])
    # the bias Add and the activation x activation MatMul are not quantised (gram reads flat through the one
    # pair flat has, as TensorRT wants: a second, float copy would cost an unfused Quantize layer); the
    # constant-weight MatMul is per-channel
    assert not any(via_dq(producers, i) for i in nodes["bias_add"].input)
    assert nodes["gram"].input[0] == nodes["fc"].input[0] and not via_dq(producers, nodes["gram"].input[1])
    assert via_dq(producers, nodes["fc"].input[1])
    assert sorted(result.quantized_nodes) == ["add", "conv_a", "conv_b", "conv_proj", "fc"]
    ref, act = run(path, block_data(8).arrays), run(result.out_path, block_data(8).arrays)
    a, b = ref["out"].ravel(), act["out"].ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


def test_resnet50_placement_fuses_every_block_add_with_its_conv3():
    from tests.resnet50 import resnet50

    model = resnet50()
    plan = plan_placement(model)
    adds = {n.name: n for n in model.graph.node if n.op_type == "Add"}
    assert len(plan.residual_adds) == len(adds) == 16
    for name, fused in plan.residual_adds.items():
        assert adds[name].input[fused].endswith(".conv3.out"), name  # the projection shortcut gets the Q/DQ
    assert len(plan.weighted) == 54 and plan.excluded == []  # 53 convs and the fc


def test_excluded_nodes_and_op_types_keep_float_inputs(tmp_path):
    path = save(block_model(), tmp_path / "block.onnx")
    s = spec(exclude_nodes=["conv_a"], exclude_op_types=["MatMul"])
    result = qdq_model_from_calibration(path, block_data(), s, tmp_path / "q.onnx")
    assert result.excluded_nodes == ["conv_a", "fc", "gram"]
    _, producers, nodes = graph(result.out_path)
    # x still has a Q/DQ pair for conv_proj, but the excluded conv_a reads the float x and float weights
    assert nodes["conv_a"].input[:2] == ["x", "wa"]
    assert via_dq(producers, nodes["conv_proj"].input[0])
    assert nodes["fc"].input == ["flat", "wf"]
    assert "conv_a" not in result.quantized_nodes and "fc" not in result.quantized_nodes
    assert check_qdq_structure(result.out_path) == []
    with pytest.raises(ModelError, match="exclude_nodes names conv_z"):
        qdq_model_from_calibration(path, block_data(), spec(exclude_nodes=["conv_z"]), tmp_path / "x.onnx")


def test_excluding_the_gemm_of_the_trained_cnn_keeps_it_float_and_within_the_gate(trained, tmp_path):
    path, eval_x, _, calib = trained
    s = spec(exclude_op_types=["Gemm"])
    data = load_calibration_data(calib, s, [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    result = qdq_model_from_calibration(path, data, s, tmp_path / "q.onnx")
    _, producers, nodes = graph(result.out_path)
    assert nodes["fc"].input == ["flat", "wf", "bf"]
    passed, summary = int8_gate(run(path, {"images": eval_x}), run(result.out_path, {"images": eval_x}),
                                s.tolerance("int8"))
    assert passed, summary


def test_multi_input_model_quantises_the_matmul_per_channel_on_its_output_axis(tmp_path):
    path = save(two_input_model(), tmp_path / "two.onnx")
    rng = np.random.default_rng(0)
    data = CalibrationData({"features": rng.normal(size=(24, 16)).astype(np.float32),
                            "ids": rng.integers(0, 50, size=(24, 4))}, "e" * 64)
    result = qdq_model_from_calibration(path, data, spec(), tmp_path / "q.onnx")
    assert result.quantized_nodes == ["proj"] and check_qdq_structure(result.out_path) == []
    m, producers, nodes = graph(result.out_path)
    dq = producers[nodes["proj"].input[1]]
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1]


# ---- errors and special cases -------------------------------------------------------------------
def test_calibration_data_for_other_inputs_is_a_model_error(tmp_path):
    path = save(small_cnn(), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match=r"feeds inputs \['x'\], the model has \['images'\]"):
        qdq_model_from_calibration(path, CalibrationData({"x": np.zeros((2, 3, 32, 32), np.float32)}, "f" * 64),
                                   spec(), tmp_path / "q.onnx")


def test_a_model_with_nothing_to_quantise_is_a_model_error(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = save(m, tmp_path / "relu.onnx")
    with pytest.raises(ModelError, match="nothing|no Conv") as err:
        qdq_model_from_calibration(path, CalibrationData({"x": np.ones((2, 4), np.float32)}, "g" * 64), spec(),
                                   tmp_path / "q.onnx")
    assert "precisions" in err.value.fix


def test_an_already_quantised_model_is_used_as_it_is(trained, tmp_path):
    path, _, _, calib = trained
    data = load_calibration_data(calib, spec(), [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    first = qdq_model_from_calibration(path, data, spec(), tmp_path / "q1.onnx")
    again = qdq_model_from_calibration(first.out_path, data, spec(), tmp_path / "q2.onnx")
    assert again.backend == "existing" and again.qdq_nodes == first.qdq_nodes
    assert Path(again.out_path).read_bytes() == Path(first.out_path).read_bytes()


def test_an_old_opset_is_raised_to_13_for_per_channel_axes(tmp_path):
    m = small_cnn(size=8)
    m.opset_import[0].version = 11
    m.ir_version = 6
    path = save(m, tmp_path / "old.onnx")
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    result = qdq_model_from_calibration(path, CalibrationData({"images": x}, "h" * 64), spec(), tmp_path / "q.onnx")
    q = onnx.load(result.out_path)
    assert q.opset_import[0].version >= 13 and q.ir_version <= 8 and check_qdq_structure(q) == []


# ---- the structure guard ------------------------------------------------------------------------
def ort_quantize(path, out, **extra):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from tasks.calibration import CalibrationReader

    x = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    quantize_static(str(path), str(out), CalibrationReader(CalibrationData({"images": x}, ""), 4),
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=extra.pop("act", QuantType.QInt8),
                    weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "Gemm"], extra_options=extra)
    return onnx.load(str(out))


def test_structure_check_finds_quantised_biases_and_asymmetric_zero_points(tmp_path):
    from onnxruntime.quantization import QuantType

    path = save(small_cnn(), tmp_path / "m.onnx")
    biased = ort_quantize(path, tmp_path / "b.onnx", ActivationSymmetric=True)  # onnxruntime quantises biases by default
    problems = check_qdq_structure(biased)
    assert any("quantised bias" in p and "Conv 'conv1'" in p for p in problems), problems
    assert any("Gemm 'fc'" in p for p in problems)
    asym = ort_quantize(path, tmp_path / "a.onnx", QuantizeBias=False, act=QuantType.QUInt8)
    problems = check_qdq_structure(asym)
    assert any("uint8 zero points" in p for p in problems) and any("asymmetric" in p for p in problems), problems
    ok = ort_quantize(path, tmp_path / "ok.onnx", QuantizeBias=False, ActivationSymmetric=True)
    assert check_qdq_structure(ok) == []


def test_structure_check_finds_wrong_per_channel_axes_and_bad_scales(tmp_path):
    path = save(small_cnn(), tmp_path / "m.onnx")
    m = ort_quantize(path, tmp_path / "ok.onnx", QuantizeBias=False, ActivationSymmetric=True)
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].startswith("w1"):
            n.attribute[0].i = 1  # Conv weights quantised along input channels
    for init in m.graph.initializer:
        if init.name == "images_scale":
            init.CopyFrom(numpy_helper.from_array(np.array(-1.0, np.float32), "images_scale"))
    problems = check_qdq_structure(m)
    assert any("weight of Conv 'conv1' along axis 1; its output channels are axis 0" in p for p in problems), problems
    assert any("non-positive scales" in p for p in problems)


def test_guard_raises_a_model_error_with_every_problem(tmp_path):
    from tasks.quantize import assert_qdq_structure

    path = save(small_cnn(), tmp_path / "m.onnx")
    biased = ort_quantize(path, tmp_path / "b.onnx", ActivationSymmetric=True)
    with pytest.raises(ModelError, match="rejected or mis-built by TensorRT") as err:
        assert_qdq_structure(biased)
    assert len(err.value.details) >= 3


# ---- backends -----------------------------------------------------------------------------------
def test_backend_choice():
    assert choose_backend(spec(backend="onnxruntime")) == "onnxruntime"
    assert choose_backend(spec(), tensorrt="8.6.0") == "onnxruntime"  # ModelOpt's opset-19 graphs are for 10+
    try:
        import modelopt.onnx.quantization  # noqa: F401
        have = True
    except Exception:  # noqa: BLE001
        have = False
    assert choose_backend(spec()) == ("modelopt" if have else "onnxruntime")
    if not have:
        with pytest.raises(InfraError, match="ModelOpt is not installed") as err:
            choose_backend(spec(backend="modelopt"))
        assert err.value.retriable is False


def test_modelopt_backend_when_installed(trained, tmp_path):
    pytest.importorskip("modelopt.onnx.quantization")
    path, eval_x, _, calib = trained
    s = spec(backend="modelopt", method="entropy")
    data = load_calibration_data(calib, s, [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    result = qdq_model_from_calibration(path, data, s, tmp_path / "q.onnx")
    assert result.backend == "modelopt" and check_qdq_structure(result.out_path) == []
    passed, summary = int8_gate(run(path, {"images": eval_x}), run(result.out_path, {"images": eval_x}),
                                s.tolerance("int8"))
    assert passed, summary


# ---- cache ----------------------------------------------------------------------------------------
def test_cache_keys_change_with_data_method_and_recipe():
    base = qdq_cache_key("m", "a" * 64, "b" * 64, spec())
    assert base == qdq_cache_key("m", "a" * 64, "b" * 64, spec())
    assert base.startswith("_trtflow/qdq/m/aaaaaaaaaaaa-bbbbbbbbbbbb-minmax-") and base.endswith(".onnx")
    assert qdq_cache_key("m", "a" * 64, "c" * 64, spec()) != base
    assert qdq_cache_key("m", "a" * 64, "b" * 64, spec(method="entropy")) != base
    assert qdq_cache_key("m", "a" * 64, "b" * 64, spec(exclude_nodes=["fc"])) != base
    assert quantize_recipe(spec(percentile=99.9)) == quantize_recipe(spec())  # percentile only counts for percentile
    assert quantize_recipe(spec(method="percentile", percentile=99.9)) != quantize_recipe(spec(method="percentile"))
    assert qdq_cache(None, "m", "a" * 64, "b" * 64, "minmax").key == "_trtflow/qdq/m/aaaaaaaaaaaa-bbbbbbbbbbbb-minmax.onnx"


def test_cache_round_trip_through_the_bucket(trained, tmp_path, local_bucket):
    path, _, _, calib = trained
    data = load_calibration_data(calib, spec(), [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    cache = qdq_cache(local_bucket, "bars", "a" * 64, data.sha256, "minmax", quantize_recipe(spec()))
    assert cache.get(tmp_path / "miss.onnx") is None
    made = qdq_model_from_calibration(path, data, spec(), tmp_path / "made.onnx")
    cache.put(made)
    assert local_bucket.head(cache.key) and local_bucket.head(cache.stats_key)
    got = cache.get(tmp_path / "got" / "model.qdq.onnx")
    assert got.qdq_nodes == made.qdq_nodes and got.data_sha256 == data.sha256
    assert Path(got.out_path).read_bytes() == Path(made.out_path).read_bytes()
    assert Path(got.stats_path).exists()
    # the helpers tasks/precision_inputs.py uses
    key = qdq_cache_key("bars", "a" * 64, data.sha256, spec())
    assert not fetch_cached_qdq(local_bucket, key.replace("minmax", "entropy"), tmp_path / "x.onnx")
    store_cached_qdq(local_bucket, key, made.out_path, made)
    assert fetch_cached_qdq(local_bucket, key, tmp_path / "y.onnx") and (tmp_path / "y.onnx").exists()


def test_an_entry_without_statistics_is_not_a_hit(tmp_path, local_bucket):
    cache = QdqCache(local_bucket, "_trtflow/qdq/m/half.onnx")
    local_bucket.write_bytes(cache.key, b"model written, statistics not yet")
    assert cache.get(tmp_path / "m.onnx") is None


def test_silu_detector_keeps_qdq_off_silu_and_the_box_decoder(tmp_path):
    """TensorRT fuses Conv+Sigmoid+Mul (SiLU) and runs the decoder's Reshape/Softmax/Concat in float:
    a Q/DQ pair inside them would split the fusions. Conv inputs and weights are quantised, and
    the CSP bottleneck's residual Add gets its skip input quantised, the Conv-SiLU side float."""
    from tests.models import silu_detector

    path = save(silu_detector(), tmp_path / "det.onnx")
    images = np.random.default_rng(0).uniform(0, 1, (16, 3, 16, 16)).astype(np.float32)
    data = CalibrationData({"images": images}, sha256="silu-detector-test")
    result = qdq_model_from_calibration(path, data, spec(), tmp_path / "det.q.onnx")
    m, producers, nodes = graph(result.out_path)
    for name in ("stem.conv", "block.conv", "head.conv"):
        assert via_dq(producers, nodes[name].input[0]) and via_dq(producers, nodes[name].input[1]), name
    float_ops = ("Sigmoid", "Mul", "Split", "Concat", "Slice", "Reshape", "Softmax")
    for node in m.graph.node:
        if node.op_type in float_ops:
            assert not any(via_dq(producers, i) for i in node.input), f"Q/DQ on {node.op_type} {node.name}"
    add = nodes["block.add"]
    assert add.input[1] == "block.y" and via_dq(producers, add.input[0])  # skip quantised, Conv-SiLU side fused
    assert result.residual_adds == ["block.add"]
    assert sorted(result.quantized_nodes) == ["block.add", "block.conv", "head.conv", "stem.conv"]
    assert producers["out"].op_type == "Concat"


def test_incomplete_shape_inference_leaves_nothing_in_the_current_folder(tmp_path, monkeypatch, caplog):
    """onnxruntime writes sym_shape_infer_temp.onnx (+ the weights) into the current folder when its
    symbolic shape inference stays incomplete; the stage keeps that inside its own workdir."""
    from tasks.quantize.stage import _prepare_model

    model = save(models.custom_op_model(), tmp_path / "m.onnx")
    cwd, work = tmp_path / "cwd", tmp_path / "work"
    cwd.mkdir(), work.mkdir()
    monkeypatch.chdir(cwd)
    path, _ = _prepare_model(model, work)
    assert path == model and "Incomplete symbolic shape inference" in caplog.text
    assert list(cwd.iterdir()) == [] and Path.cwd() == cwd



# ---- memory: histogram calibration in chunks, and running out of it ------------------------------
@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_collects_in_chunks_and_stays_within_the_gate(trained, tmp_path, monkeypatch, method):
    """onnxruntime's entropy/percentile calibrators hold a stride's activations and copies of them
    (ConvNeXt-T, strides of 64 samples: out of the stage's 16 GiB); their strides are 8 samples."""
    from onnxruntime.quantization import calibrate

    from tasks.quantize import backends

    calls = []
    whole = calibrate.HistogramCalibrater.collect_data

    def counting(self, reader):  # TEST DOUBLE around onnxruntime's own collect_data: counts the strides
        calls.append(reader._end - reader._start)
        return whole(self, reader)

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", counting)
    path, eval_x, eval_y, calib = trained
    s = spec(method=method)
    data = load_calibration_data(calib, s, [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    result = qdq_model_from_calibration(path, data, s, tmp_path / "model.qdq.onnx")
    batches = -(-data.samples // 16)  # onnxruntime's batch for a dynamic batch dim (tasks/quantize/backends.py)
    per_chunk = max(1, backends._HISTOGRAM_CHUNK_SAMPLES // 16)
    assert len(calls) == -(-batches // per_chunk) > 1 and sum(calls) == batches  # strides, each batch once
    passed, summary = int8_gate(run(path, {"images": eval_x}), run(result.out_path, {"images": eval_x}),
                                s.tolerance("int8"))
    assert passed, summary


def test_onnxruntime_out_of_memory_names_the_stage_limit_and_the_fix(trained, tmp_path, monkeypatch):
    import onnxruntime.quantization as oq

    def out_of_memory(*args, **kwargs):  # TEST DOUBLE: what onnxruntime raised for ConvNeXt-T (2026-12-02)
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Mul node. "
                           "Status Message: bfc_arena.cc:360 AllocateRawInternal Failed to allocate memory for "
                           "requested buffer of size 12845056")

    monkeypatch.setattr(oq, "quantize_static", out_of_memory)
    path, _, _, calib = trained
    s = spec(method="entropy")
    data = load_calibration_data(calib, s, [{"name": "images", "dtype": "float32", "shape": ["N", 3, 16, 16]}])
    with pytest.raises(ModelError) as err:
        qdq_model_from_calibration(path, data, s, tmp_path / "model.qdq.onnx")
    assert "ran out of memory" in err.value.message and "limits.cpu_memory_mib = 16384 MiB" in err.value.message
    assert err.value.fix.startswith("Raise limits.cpu_memory_mib") and "constant tensors" not in err.value.fix

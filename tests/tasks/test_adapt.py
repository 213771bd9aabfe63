"""tasks/adapt.py on small models from tests/models.py, checked against ONNX Runtime."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tasks import adapt
from tasks.adapt import AdaptResult, TargetLimits, adapt_for_target
from tasks.errors import ModelError
from tasks.gpu.compat import caps_for_version, parser_support
from tests import models

TRT86 = TargetLimits(parser_max_ir=8, parser_max_opset=17)


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _same_outputs(a, b, feeds):
    for x, y in zip(_run(a, feeds), _run(b, feeds)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def _names(result: AdaptResult):
    return [r.name for r in result.records if r.applied]


# ---- limits -------------------------------------------------------------------------------------
def test_limits_accept_caps_like_objects_and_the_validate_table():
    caps = SimpleNamespace(parser_max_ir=10, parser_max_opset=20)
    assert TargetLimits.of(caps) == TargetLimits(10, 20, 7)
    support, _ = parser_support("8.6")
    assert TargetLimits.of(support) == TargetLimits(8, 17, 7)
    assert TargetLimits.of(caps_for_version("8.6")) == TargetLimits(8, 17, 7)
    with pytest.raises(TypeError, match="parser_max_ir"):
        TargetLimits.of(object())


def test_a_model_the_parser_reads_is_left_where_it_is(tmp_path):
    src = models.save(models.small_cnn(), tmp_path / "in" / "model.onnx")
    result = adapt_for_target(src, tmp_path / "out", TRT86)
    assert result.path == src and result.records == [] and not result.changed
    assert not (tmp_path / "out").exists()


# ---- 1a: IR -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ir", [9, 10, onnx.IR_VERSION])
def test_ir_newer_than_the_parser_is_lowered_when_no_newer_feature_is_used(tmp_path, ir):
    src = models.save(models.relu_model(ir_version=ir), tmp_path / "in" / "model.onnx")
    result = adapt_for_target(src, tmp_path / "out", TRT86)
    assert _names(result) == ["lower_ir"]
    assert result.records[0].before == f"IR {ir}" and result.records[0].after == "IR 8"
    out = onnx.load(str(result.path))
    assert out.ir_version == 8
    onnx.checker.check_model(out, full_check=True)
    feeds = {"x": np.array([[-1, 2, -3, 4]], np.float32)}
    _same_outputs(src, result.path, feeds)


def test_ir_is_not_lowered_past_a_feature_that_needs_it():
    model = models.float8_weight_model(ir_version=9)
    with pytest.raises(ModelError) as err:
        adapt.lower_ir(model, TargetLimits(8, 19))
    assert "FLOAT8E4M3FN" in err.value.message and "IR 9" in err.value.message
    assert err.value.fix and "TensorRT" in err.value.fix
    assert model.ir_version == 9  # untouched


def test_ir_features_names_local_functions():
    fn = helper.make_function("custom", "Twice", ["a"], ["b"],
                              [helper.make_node("Add", ["a", "a"], ["b"])], [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Twice", ["x"], ["y"], domain="custom")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)])
    assert any(ir == 8 and "Twice" in what for ir, what in adapt.ir_features(model))
    assert adapt.ir_features(models.relu_model()) == []


# ---- 1b: opset ----------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [18, 20])
def test_newer_opset_is_converted_and_still_computes_the_same(tmp_path, opset):
    src = models.save(models.reduce_mean_model(opset=opset), tmp_path / "in" / "model.onnx")
    result = adapt_for_target(src, tmp_path / "out", TRT86)
    assert _names(result) == ["convert_opset"]
    rec = result.records[0]
    assert rec.before == f"opset {opset}" and rec.after == "opset 17" and "ReduceMean" in rec.why
    out = onnx.load(str(result.path))
    assert adapt.default_opset(out) == 17 and out.ir_version <= 8
    mean = next(n for n in out.graph.node if n.op_type == "ReduceMean")
    assert [a.name for a in mean.attribute if a.name == "axes"] == ["axes"]  # opset-17 form: an attribute
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 4, 6)).astype(np.float32)}
    _same_outputs(src, result.path, feeds)


def test_opset_that_cannot_be_converted_is_refused_naming_the_op(tmp_path):
    model = models.gelu_opset20_model()
    src = models.save(model, tmp_path / "in" / "model.onnx")
    with pytest.raises(ModelError) as err:
        adapt_for_target(src, tmp_path / "out", TRT86)
    assert "Gelu" in err.value.message and "opset 20" in err.value.message
    assert "opset_version=17" in err.value.fix


# ---- 1c: shared dim_params ----------------------------------------------------------------------
def _range(lo, opt, hi):
    return {"min": lo, "opt": opt, "max": hi}


def test_dims_sharing_a_name_with_different_ranges_are_renamed_apart(tmp_path):
    src = models.save(models.shared_param_cnn("?"), tmp_path / "in" / "model.onnx")
    profiles = [{"images": _range([1, 3, 64, 32], [8, 3, 224, 320], [16, 3, 256, 512])}]
    result = adapt_for_target(src, tmp_path / "out", TRT86, profiles)
    assert _names(result) == ["split_shared_dims", "split_shared_dims"]
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "?_2", "?_3"]
    assert "inconsistent" in result.records[0].why
    feeds = {"images": np.random.default_rng(1).normal(size=(1, 3, 40, 56)).astype(np.float32)}
    _same_outputs(src, result.path, feeds)


def test_dims_sharing_a_name_with_equal_ranges_stay_shared(tmp_path):
    src = models.save(models.shared_param_cnn("?"), tmp_path / "in" / "model.onnx")
    profiles = [{"images": _range([1, 3, 64, 64], [8, 3, 224, 224], [16, 3, 256, 256])}]
    assert adapt_for_target(src, tmp_path / "out", TRT86, profiles).records == []


def test_batch_and_sequence_shared_across_inputs_stay_shared(tmp_path):
    model = models.shared_batch_text_model()
    same = _range([1, 8], [4, 128], [8, 512])
    assert adapt.split_shared_dims(model, [{"input_ids": same, "attention_mask": same}]) == []
    # Different sequence ranges per input: S splits, the batch B (equal for both) stays one name.
    records = adapt.split_shared_dims(model, [{"input_ids": same, "attention_mask": _range([1, 16], [4, 64], [8, 128])}])
    assert len(records) == 2
    shapes = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert shapes[0][0] == shapes[1][0] == "B"
    assert shapes[0][1] != shapes[1][1] and {shapes[0][1], shapes[1][1]} == {"S_input_ids_1", "S_attention_mask_1"}
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "B"


def test_dim_ranges_differing_in_a_second_profile_only_also_split():
    model = models.shared_param_cnn("?")
    p0 = {"images": _range([1, 3, 64, 64], [1, 3, 64, 64], [1, 3, 64, 64])}
    p1 = {"images": _range([1, 3, 64, 32], [1, 3, 64, 48], [1, 3, 64, 96])}
    assert [r.after for r in adapt.split_shared_dims(model, [p0, p1])] == ["'?_2'", "'?_3'"]


# ---- 1d: sanitise -------------------------------------------------------------------------------
def test_slice_with_computed_axes_is_folded_before_the_build(tmp_path):
    src = models.save(models.dynamic_axes_slice_model(), tmp_path / "in" / "model.onnx")
    assert adapt.dynamic_slices(onnx.load(str(src))) == ["dyn_slice"]
    result = adapt_for_target(src, tmp_path / "out", TRT86)  # on-failure: a known-rejected pattern
    assert _names(result) == ["sanitise"]
    assert "dyn_slice" in result.records[0].why
    out = onnx.load(str(result.path))
    assert adapt.dynamic_slices(out) == []
    assert [n.op_type for n in out.graph.node] == ["Slice", "Relu"]
    assert out.ir_version == 8 and adapt.default_opset(out) == 17
    feeds = {"x": np.arange(16, dtype=np.float32).reshape(2, 8) - 8}
    _same_outputs(src, result.path, feeds)


def test_sanitise_never_leaves_the_slice(tmp_path):
    src = models.save(models.dynamic_axes_slice_model(), tmp_path / "in" / "model.onnx")
    assert adapt_for_target(src, tmp_path / "out", TRT86, sanitise_mode="never").path == src


def test_sanitise_without_graphsurgeon_returns_the_original_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)  # import now raises ImportError
    model = models.dynamic_axes_slice_model()
    out, record = adapt.sanitise(model)
    assert out is model and not record.applied and "onnx-graphsurgeon" in record.why


def test_sanitise_that_fails_returns_the_original_and_says_why():
    model = models.relu_model()
    model.graph.node[0].input[0] = "nowhere"  # a dangling input: export/checker refuse it
    out, record = adapt.sanitise(model)
    assert out is model and not record.applied and "failed" in record.why


def test_unknown_sanitise_mode_names_the_choices(tmp_path):
    src = models.save(models.small_cnn(), tmp_path / "model.onnx")
    with pytest.raises(ModelError, match="on-failure"):
        adapt_for_target(src, tmp_path / "out", TRT86, sanitise_mode="sometimes")


# ---- external data ------------------------------------------------------------------------------
def test_external_data_stays_on_disk_and_the_adapted_model_is_written_beside_it(tmp_path, monkeypatch):
    monkeypatch.setattr(adapt, "SMALL_TENSOR_BYTES", 100)  # the test's weights stand in for large ones
    model = models.small_cnn()
    model.ir_version = 10
    src = models.save(model, tmp_path / "in" / "model.onnx", external_data="weights.bin")
    result = adapt_for_target(src, tmp_path / "out", TRT86, sanitise_mode="always")
    assert _names(result) == ["lower_ir", "sanitise"]
    out = onnx.load(str(result.path), load_external_data=False)
    kinds = {t.name: t.data_location for t in out.graph.initializer}
    assert all(kinds[w] == TensorProto.EXTERNAL for w in ("w1", "w2", "wf"))  # the weights stay in their file
    assert {t.name for t in out.graph.initializer} == {"w1", "b1", "w2", "b2", "wf", "bf"}
    assert [i.name for i in out.graph.input] == ["images"]
    assert result.path == tmp_path / "in" / "model.adapted.onnx"  # the data resolves where it lies
    assert not (tmp_path / "out").exists()
    assert result.path.stat().st_size < 4096  # the graph only: no weights inside
    feeds = {"images": np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)}
    _same_outputs(src, result.path, feeds)


def test_opset_conversion_reads_small_constants_kept_in_external_data(tmp_path):
    # Saved with size_threshold=0: even ReduceMean's axes live in the data file, and the converter
    # needs their values to turn them into the opset-17 attribute.
    src = models.save(models.reduce_mean_model(opset=18), tmp_path / "in" / "model.onnx", external_data="w.bin")
    inline = models.save(models.reduce_mean_model(opset=18), tmp_path / "ref" / "model.onnx")  # ORT cannot read src
    result = adapt_for_target(src, tmp_path / "out", TRT86)
    assert _names(result) == ["convert_opset"]
    out = onnx.load(str(result.path))
    assert adapt.default_opset(out) == 17
    feeds = {"x": np.random.default_rng(3).normal(size=(2, 4, 6)).astype(np.float32)}
    _same_outputs(inline, result.path, feeds)


def test_large_external_tensors_stay_external(tmp_path):
    model = models.small_cnn()
    model.ir_version = 10
    src = models.save(model, tmp_path / "in" / "model.onnx", external_data="weights.bin")
    loaded = onnx.load(str(src), load_external_data=False)
    assert adapt.inline_small_external_data(loaded, src.parent, limit=200) == 3  # b1, b2, bf: 32, 64, 40 bytes
    kinds = {t.name: t.data_location for t in loaded.graph.initializer}
    assert kinds["w1"] == kinds["w2"] == kinds["wf"] == TensorProto.EXTERNAL
    assert kinds["b1"] == kinds["b2"] == kinds["bf"] == TensorProto.DEFAULT

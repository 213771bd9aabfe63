"""validate_model on the registry of tiny models in tests/models.py: each broken one yields its error
code and a message that names the problem and says how to fix it."""
from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import yaml

from tasks.errors import ModelError
from tasks.spec import parse_spec
from tasks.gpu.compat import PARSER_SUPPORT, caps_for_version, parser_support
from tasks.validate import ValidationReport, validate_model
from tests import models


def _pkg(tmp_path: Path, name: str = "pkg") -> Path:
    return tmp_path / name / "model.onnx"


# ---- good models --------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: models.small_cnn(dynamic_batch=False), models.small_cnn,
                                   models.two_input_model], ids=["cnn-static", "cnn-dynamic", "two-inputs"])
def test_good_models_pass(tmp_path, build):
    report = validate_model(models.save(build(), _pkg(tmp_path)))
    assert report.ok and bool(report), report.summary_lines()
    assert report.errors == []
    assert report.ir_version == models.IR_VERSION
    assert report.opsets == {"ai.onnx": models.OPSET}
    assert report.producer.startswith("trtflow-tests")
    assert report.model_bytes == _pkg(tmp_path).stat().st_size
    assert report.parameters > 0
    assert report.external_files == [] and report.external_data_bytes == 0
    json.dumps(report.to_dict())  # JSON-serialisable as is


def test_static_cnn_inventory_and_io(tmp_path):
    report = validate_model(models.save(models.small_cnn(dynamic_batch=False), _pkg(tmp_path)))
    assert report.operators == {"Conv": 2, "Relu": 2, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}
    (inp,), (out,) = report.inputs, report.outputs
    assert (inp.name, inp.dtype, inp.shape, inp.dynamic_dims) == ("images", "float32", [1, 3, 32, 32], [])
    assert (out.name, out.dtype, out.shape) == ("logits", "float32", [1, 10])
    # 8*3*3*3 + 8 + 16*8*3*3 + 16 + 10*16 + 10
    assert report.parameters == 216 + 8 + 1152 + 16 + 160 + 10
    assert report.warnings == []
    assert report.profiles == [{"images": {"min": [1, 3, 32, 32], "opt": [1, 3, 32, 32], "max": [1, 3, 32, 32]}}]


def test_dynamic_batch_gets_default_profile_with_a_warning(tmp_path):
    spec = parse_spec({"build": {"default_opt_batch": 4, "default_max_batch": 16}})
    report = validate_model(models.save(models.small_cnn(), _pkg(tmp_path)), spec)
    assert report.ok
    assert report.inputs[0].shape == ["N", 3, 32, 32] and report.inputs[0].dynamic_dims == [0]
    assert report.profiles == [{"images": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [16, 3, 32, 32]}}]
    (w,) = [w for w in report.warnings if w.code == "default_batch_profile"]
    assert "'images'" in w.message and "1/4/16" in w.message and "default_max_batch=16" in w.message
    assert "profiles:" in w.fix
    assert report.opt_shapes() == {"images": [4, 3, 32, 32]}


def test_two_inputs_share_the_default_batch_and_int64_is_flagged_for_trt86(tmp_path):
    path = models.save(models.two_input_model(), _pkg(tmp_path))
    report = validate_model(path)
    assert report.ok
    assert [(t.name, t.dtype) for t in report.inputs] == [("features", "float32"), ("ids", "int64")]
    assert report.profiles[0]["features"]["opt"] == [8, 16] and report.profiles[0]["ids"]["opt"] == [8, 4]
    assert "int64_io" in report.warning_codes()
    assert "int64_io" not in validate_model(path, trt_version="10.3").warning_codes()  # 10.x takes int64


def test_profiles_resolve_every_input_of_a_two_input_model(tmp_path):
    path = models.save(models.two_input_model(), _pkg(tmp_path))
    spec = parse_spec({"profiles": [{"features": {"min": [1, 16], "opt": [2, 16], "max": [4, 16]},
                                     "ids": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}]})
    report = validate_model(path, spec)
    assert report.ok
    assert report.profiles[0]["ids"] == {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}


# ---- dynamic dims without a profile ---------------------------------------------------------------
def test_dynamic_spatial_dims_without_profile_name_input_dims_and_fix(tmp_path):
    report = validate_model(models.save(models.dynamic_hw_cnn(), _pkg(tmp_path)))
    assert not report.ok
    assert report.codes() == ["dynamic_dim_without_profile"]
    err = report.errors[0]
    assert "'images'" in err.message and "[N, 3, H, W]" in err.message
    assert "2 (H)" in err.message and "3 (W)" in err.message
    assert "0 (N)" not in err.message  # the batch has a default
    # the fix is a YAML snippet that parses into a valid spec, and that spec makes the model pass
    snippet = err.fix.split("\n", 1)[1]
    data = yaml.safe_load(snippet)
    assert data["profiles"][0]["images"]["opt"][0] == 8
    fixed = validate_model(_pkg(tmp_path), parse_spec(data))
    assert fixed.ok, fixed.summary_lines()
    assert fixed.profiles[0]["images"]["max"] == [32, 3, 512, 512]


def test_profile_from_spec_covers_dynamic_dims(tmp_path):
    path = models.save(models.dynamic_hw_cnn(), _pkg(tmp_path))
    spec = parse_spec({"profiles": [{"images": {"min": [1, 3, 32, 32], "opt": [2, 3, 64, 64], "max": [4, 3, 96, 96]}},
                                    {"images": {"min": [8, 3, 16, 16], "opt": [8, 3, 16, 16], "max": [8, 3, 16, 16]}}]})
    report = validate_model(path, spec)
    assert report.ok and report.warnings == []
    assert [p["images"]["opt"] for p in report.profiles] == [[2, 3, 64, 64], [8, 3, 16, 16]]


def test_profile_errors_unknown_input_rank_and_static_dims(tmp_path):
    path = models.save(models.two_input_model(), _pkg(tmp_path))
    spec = parse_spec({"profiles": [
        {"feature": {"min": [1, 16], "opt": [1, 16], "max": [1, 16]}},
        {"features": {"min": [1], "opt": [1], "max": [1]}},
        {"features": {"min": [1, 8], "opt": [1, 16], "max": [1, 16]}},
    ]})
    report = validate_model(path, spec)
    assert sorted(report.codes()) == ["profile_rank_mismatch", "profile_static_dim_mismatch", "profile_unknown_input"]
    by = {e.code: e for e in report.errors}
    assert "'feature'" in by["profile_unknown_input"].message and "'features'" in by["profile_unknown_input"].message
    assert "profile 1" in by["profile_rank_mismatch"].message and "rank 1" in by["profile_rank_mismatch"].message
    assert "dim(s) [1]" in by["profile_static_dim_mismatch"].message and "[16]" in by["profile_static_dim_mismatch"].message


def test_batch_of_an_unnamed_input_follows_the_profile(tmp_path):
    path = models.save(models.two_input_model(), _pkg(tmp_path))
    spec = parse_spec({"profiles": [{"features": {"min": [2, 16], "opt": [3, 16], "max": [5, 16]}}]})
    report = validate_model(path, spec)
    assert report.ok
    assert report.profiles[0]["ids"] == {"min": [2, 4], "opt": [3, 4], "max": [5, 4]}
    assert any("follows" in w.message and "'ids'" in w.message for w in report.warnings)


def test_inconsistent_ranges_for_a_shared_dim_warn(tmp_path):
    path = models.save(models.two_input_model(), _pkg(tmp_path))
    spec = parse_spec({"profiles": [{"features": {"min": [1, 16], "opt": [4, 16], "max": [8, 16]},
                                     "ids": {"min": [1, 4], "opt": [2, 4], "max": [8, 4]}}]})
    report = validate_model(path, spec)
    assert "profile_inconsistent_dims" in report.warning_codes()
    assert "'N'" in next(w for w in report.warnings if w.code == "profile_inconsistent_dims").message


# ---- external data --------------------------------------------------------------------------------
def test_external_data_inside_the_package_passes(tmp_path):
    path = models.save(models.small_cnn(), _pkg(tmp_path), external_data="model.onnx.data")
    report = validate_model(path)
    assert report.ok, report.summary_lines()
    assert report.external_files == ["model.onnx.data"]
    assert report.external_data_bytes == (tmp_path / "pkg" / "model.onnx.data").stat().st_size > 0
    assert report.model_bytes < report.external_data_bytes


def test_dotdot_location_is_rejected_even_when_the_file_exists(tmp_path):
    path = models.save_with_external_location(models.small_cnn(), _pkg(tmp_path), "../weights.bin")
    assert (tmp_path / "weights.bin").is_file()  # the data is there, but outside the package
    report = validate_model(path)
    assert report.codes() == ["external_data_outside_package"]
    err = report.errors[0]
    assert "'../weights.bin'" in err.message and "'w1'" in err.message and "outside" in err.message
    assert "location=" in err.fix
    assert "checker_skipped" in report.warning_codes()


def test_absolute_location_is_rejected(tmp_path):
    weights = tmp_path / "elsewhere" / "w.bin"
    path = models.save_with_external_location(models.small_cnn(), _pkg(tmp_path), str(weights))
    report = validate_model(path)
    assert report.codes() == ["external_data_absolute"]
    assert str(weights) in report.errors[0].message


def test_symlink_out_of_the_package_is_rejected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    path = models.save_with_external_location(models.small_cnn(), _pkg(tmp_path), "data/w.bin")
    (tmp_path / "pkg" / "data" / "w.bin").rename(outside / "w.bin")
    (tmp_path / "pkg" / "data").rmdir()
    os.symlink(outside, tmp_path / "pkg" / "data")
    report = validate_model(path)
    assert report.codes() == ["external_data_outside_package"]


def test_missing_and_short_external_files(tmp_path):
    missing = models.save_with_external_location(models.small_cnn(), _pkg(tmp_path, "a"), "w.bin", write_data=False)
    report = validate_model(missing)
    assert report.codes() == ["external_data_missing"]
    assert "'w.bin'" in report.errors[0].message and "Upload 'w.bin'" in report.errors[0].fix

    short = models.save_with_external_location(models.small_cnn(), _pkg(tmp_path, "b"), "w.bin", truncate_bytes=8)
    report = validate_model(short)
    assert report.codes() == ["external_data_truncated"]
    assert "'bf'" in report.errors[0].message  # the last tensor in the file is the one cut short
    assert "too short" in report.errors[0].message


@pytest.mark.parametrize("key, value", [("offset", "-16"), ("length", "-1")])
def test_negative_external_data_offset_or_length_is_rejected(tmp_path, key, value):
    path = models.save_with_external_location(models.small_cnn(), _pkg(tmp_path), "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == key)
    entry.value = value  # a reader would seek from the file's end / read the whole file
    path.write_bytes(model.SerializeToString())
    report = validate_model(path)
    assert report.codes() == ["external_data_bad_entry"]
    assert "negative" in report.errors[0].message and value in report.errors[0].message
    assert "'w1'" in report.errors[0].message


def test_dotdot_is_rejected_even_inside_a_wider_package_root(tmp_path):
    # "..": rejected outright, even where it would land inside the package root (no path tricks).
    path = models.save_with_external_location(models.small_cnn(), tmp_path / "pkg" / "onnx" / "model.onnx",
                                              "../weights/w.bin")
    assert validate_model(path).codes() == ["external_data_outside_package"]
    assert validate_model(path, package_root=tmp_path / "pkg").codes() == ["external_data_outside_package"]


# ---- not a model ----------------------------------------------------------------------------------
def test_truncated_file(tmp_path):
    report = validate_model(models.truncated_file(_pkg(tmp_path)))
    assert report.codes() == ["not_onnx"]
    err = report.errors[0]
    assert "not a valid ONNX model" in err.message and "truncated" in err.message
    assert "re-upload" in err.fix and "re-export" in err.fix.lower()
    assert report.ir_version is None and report.inputs == []


@pytest.mark.parametrize("kind,hint", [("html", "HTML"), ("zip", "zip archive")])
def test_non_onnx_files(tmp_path, kind, hint):
    report = validate_model(models.not_onnx_file(_pkg(tmp_path), kind))
    assert report.codes() == ["not_onnx"]
    assert "not a valid ONNX model" in report.errors[0].message and hint in report.errors[0].message


def test_empty_and_missing_files(tmp_path):
    empty = _pkg(tmp_path)
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    assert validate_model(empty).codes() == ["not_onnx"]
    assert validate_model(tmp_path / "nope.onnx").codes() == ["file_missing"]


def test_checker_failure_is_reported(tmp_path):
    model = models.small_cnn()
    model.graph.node[1].input[0] = "no_such_tensor"  # Relu reads a value nobody produces
    path = _pkg(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(model.SerializeToString())
    report = validate_model(path)
    assert "checker_failed" in report.codes()
    assert "no_such_tensor" in next(e for e in report.errors if e.code == "checker_failed").message


# ---- versions and operators -------------------------------------------------------------------------
def test_opset_too_new_for_trt86_is_converted_not_refused(tmp_path):
    path = models.save(models.relu_model(opset=20), _pkg(tmp_path))
    report = validate_model(path)
    assert report.ok and "opset_converted" in report.warning_codes()
    warning = next(w for w in report.warnings if w.code == "opset_converted")
    assert "opset 20" in warning.message and "7 to 17" in warning.message and "version_converter" in warning.message
    assert "opset_converted" not in validate_model(path, trt_version="10.0.1").warning_codes()


def test_opset_that_cannot_be_converted_is_refused_naming_the_op(tmp_path):
    model = models.gelu_opset20_model()
    report = validate_model(models.save(model, _pkg(tmp_path)))
    assert "opset_unsupported" in report.codes()
    err = next(e for e in report.errors if e.code == "opset_unsupported")
    assert "Gelu" in err.message and "opset 20" in err.message and "opset_version=17" in err.fix


def test_ir_version_too_new_for_trt86_is_lowered_not_refused(tmp_path):
    path = models.save(models.relu_model(ir_version=10), _pkg(tmp_path))
    report = validate_model(path)
    assert report.ok and "ir_version_lowered" in report.warning_codes()
    assert "lowers the number to 8" in next(w for w in report.warnings if w.code == "ir_version_lowered").message
    assert "ir_version_lowered" not in validate_model(path, trt_version="10").warning_codes()


def test_ir_version_needed_by_a_feature_is_refused(tmp_path):
    path = models.save(models.float8_weight_model(ir_version=9), _pkg(tmp_path))
    report = validate_model(path)
    assert "ir_version_unsupported" in report.codes()
    assert "FLOAT8E4M3FN" in next(e for e in report.errors if e.code == "ir_version_unsupported").message


def test_old_opset_only_warns(tmp_path):
    path = models.save(models.relu_model(opset=6, ir_version=3), _pkg(tmp_path))
    report = validate_model(path, trt_version="10")
    assert report.ok and "opset_old" in report.warning_codes()


def test_unsupported_operator_warns_only(tmp_path):
    report = validate_model(models.save(models.unique_op_model(), _pkg(tmp_path)))
    assert report.ok
    (w,) = [w for w in report.warnings if w.code == "unsupported_operator"]
    assert "Unique" in w.message and "operators.md" in w.message


def test_custom_domain_operator_warns(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MyOp", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    path = _pkg(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(model.SerializeToString())
    report = validate_model(path)
    assert report.operators == {"com.example:MyOp": 1}
    assert report.opsets == {"ai.onnx": 17, "com.example": 1}
    assert "custom_operator" in report.warning_codes()


def test_string_input_is_an_error(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["t"])], "g",
                              [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("t", TensorProto.STRING, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = models.save(model, _pkg(tmp_path))
    report = validate_model(path)
    assert report.codes() == ["unsupported_io_dtype", "unsupported_io_dtype"]
    assert "string" in report.errors[0].message


def test_trt_version_table():
    assert parser_support("8.6.1.6") == (PARSER_SUPPORT["8.6"], "")
    assert parser_support("10.3.0")[0].max_opset == 20
    entry, note = parser_support("12.0")
    assert entry is PARSER_SUPPORT["11"] and "12.0" in note
    for s in PARSER_SUPPORT.values():
        assert s.min_opset <= s.max_opset and s.max_ir >= 8 and "Unique" in s.unsupported_ops


# ---- the report -------------------------------------------------------------------------------------
def test_report_round_trips_and_raises_a_model_error(tmp_path):
    report = validate_model(models.save(models.dynamic_hw_cnn(), _pkg(tmp_path)))
    again = ValidationReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    with pytest.raises(ModelError) as info:
        report.raise_for_errors()
    err = info.value
    assert "dynamic_dim_without_profile" in err.message and "model.onnx" in err.message
    assert "profiles:" in err.fix
    assert err.details[0]["code"] == "dynamic_dim_without_profile"


def test_summaries_are_readable(tmp_path):
    report = validate_model(models.save(models.dynamic_hw_cnn(), _pkg(tmp_path)))
    text = "\n".join(report.summary_lines())
    assert "FAILED" in text and "input  images: float32 [N, 3, H, W]" in text
    assert "ERROR [dynamic_dim_without_profile]" in text and "fix:" in text
    md = report.summary_markdown()
    assert "❌ FAILED" in md and "| input | `images` | float32 | [N, 3, H, W] |" in md and "```" in md
    ok = validate_model(models.save(models.small_cnn(), _pkg(tmp_path, "ok")))
    assert "✅ OK" in ok.summary_markdown() and "| 0 | `images` |" in ok.summary_markdown()


def test_the_report_names_the_target_it_judged_against_given_as_caps_or_old_keyword(tmp_path):
    path = models.save(models.relu_model(opset=20), _pkg(tmp_path))
    by_caps = validate_model(path, caps=caps_for_version("10.3.1"))
    assert by_caps.ok and by_caps.trt_version == "10.3.1"
    assert "for TensorRT 10.3.1 (parser rules of 10)" in by_caps.summary_lines()[0]
    by_shim = validate_model(path, trt_version="8.6.1")  # the keyword pools' flow still passes
    assert by_shim.trt_version == "8.6.1" and "opset_converted" in by_shim.warning_codes()
    assert "TensorRT 8.6.1" in by_shim.summary_lines()[0]
    assert validate_model(path, target="11.0").ok  # the CLI's --target


def test_an_already_loaded_model_is_not_parsed_again(tmp_path, monkeypatch):
    import tasks.validate as validate_pkg

    path = models.save(models.small_cnn(), _pkg(tmp_path))
    proto = onnx.load(str(path), load_external_data=False)
    monkeypatch.setattr(validate_pkg, "_read_proto", lambda *a: pytest.fail("the file was parsed again"))
    assert validate_model(path, model=proto).ok

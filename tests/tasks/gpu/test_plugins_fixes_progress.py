"""tasks/gpu against the TensorRT TEST DOUBLES: plugins registered before parsing, parser/builder
failures carrying the fix that matches them (never "loosen the tolerances"), and the phase lines
the parent's heartbeat reads (TensorRT 10's IProgressMonitor where the version has one)."""
from __future__ import annotations

import logging

import pytest
from onnx import TensorProto, helper

from tasks.errors import ModelError
from tasks.gpu import build as gpu_build, compat
from tests.models import instance_norm_model, save
from tests.tasks.gpu import trt_double
from tests.tasks.gpu.test_gpu_glue import _request

TRT86, TRT10 = "8.6.1", trt_double.VERSIONS[10]


def _build(monkeypatch, tmp_path, model, version):
    trt_double.install(monkeypatch, version=version)
    path = save(model, tmp_path / "model.onnx")
    return gpu_build.build_engine(_request(path, tmp_path / "engine"))


def test_plugins_are_registered_before_parsing_so_instance_norm_imports_on_86(monkeypatch, tmp_path):
    built = _build(monkeypatch, tmp_path, instance_norm_model(), TRT86)
    assert built.response["engine"]["bytes"] > 0
    assert trt_double.PLUGINS.calls == [""]  # the default namespace, as init_libnvinfer_plugins(logger, "")


def test_without_plugins_the_parser_failure_names_the_node_and_the_registration(monkeypatch, tmp_path):
    monkeypatch.setattr(compat, "register_plugins", lambda trt, logger: False)
    with pytest.raises(ModelError) as err:
        _build(monkeypatch, tmp_path, instance_norm_model(), TRT86)
    assert "inorm" in err.value.fix and "init_libnvinfer_plugins" in err.value.fix
    assert "loosen" not in err.value.fix.lower()
    assert err.value.details[-1]["fix"]["code"] == "plugin_op_not_found"


def _custom_op_model():
    graph = helper.make_graph([helper.make_node("NotAnOp", ["x"], ["y"], name="mystery_node", domain="trtflow.test")],
                              "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trtflow.test", 1)])
    model.ir_version = 8
    return model


def test_an_unknown_op_gets_the_plugin_fix_with_its_node_not_the_accuracy_advice(monkeypatch, tmp_path):
    with pytest.raises(ModelError) as err:
        _build(monkeypatch, tmp_path, _custom_op_model(), TRT10)
    assert "limit: TensorRT 10" in err.value.message
    assert "'mystery_node'" in err.value.fix and "operators.md" in err.value.fix
    assert "tolerances" not in err.value.fix


class _Logger:
    def __init__(self, errors):
        self.errors = errors


def test_builder_failure_names_the_layer_the_limit_and_the_version_that_lifts_it():
    logger = _Logger(["[optimizer.cpp::computeCosts] Error Code 10: Internal Error "
                      "(Could not find any implementation for node /head/Conv + /head/Sigmoid.)"])
    caps = compat.caps_for_version(TRT86)
    err = gpu_build._build_failure(logger, "building the int8 engine", caps, "int8")
    assert isinstance(err, ModelError)
    assert "/head/Conv + /head/Sigmoid" in err.fix and "calibration.exclude_nodes" in err.fix
    assert "TensorRT 10.0 lifts" in err.fix and "int8 kernel" in err.message
    assert "tolerances" not in err.fix


@pytest.mark.parametrize("version, monitored", [(TRT86, False), (TRT10, True)])
def test_build_reports_phases_and_trt10_adds_the_builders_own(monkeypatch, tmp_path, caplog, version, monitored):
    caplog.set_level(logging.INFO, logger="trtflow.gpu.build")
    _build(monkeypatch, tmp_path, instance_norm_model(), version)
    phases = [r.getMessage() for r in caplog.records if r.getMessage().startswith(compat.PHASE_PREFIX)]
    assert phases[0] == f"{compat.PHASE_PREFIX} parse model.onnx"
    assert f"{compat.PHASE_PREFIX} build fp32" in phases
    builder = [p for p in phases if "build: " in p]
    assert bool(builder) == monitored
    if monitored:  # the top-level phase always; the nested one is throttled but the first one shows
        assert builder[0].endswith("build: Building engine (2 steps)")


@pytest.mark.parametrize("compat_kw", [{"hardware_compatibility": "ampere_plus"}, {"version_compatible": True}])
def test_instance_norm_builds_hardware_or_version_compatible_on_86_with_the_native_layer(monkeypatch, tmp_path,
                                                                                        compat_kw):
    trt_double.install(monkeypatch, version=TRT86)
    path = save(instance_norm_model(), tmp_path / "model.onnx")
    built = gpu_build.build_engine(_request(path, tmp_path / "engine", **compat_kw))
    assert built.response["engine"]["bytes"] > 0
    assert trt_double.PLUGINS.parser_flags == ["NATIVE_INSTANCENORM"]


def test_without_the_native_flag_a_compatible_86_build_fails_on_the_plugin(monkeypatch, tmp_path):
    monkeypatch.setattr(compat, "parser_flags", lambda trt, hw, vc: [])
    with pytest.raises(ModelError, match="plugin layers"):
        trt_double.install(monkeypatch, version=TRT86)
        path = save(instance_norm_model(), tmp_path / "model.onnx")
        gpu_build.build_engine(_request(path, tmp_path / "engine", hardware_compatibility="ampere_plus"))


def test_parser_flags_only_for_compatible_builds_where_the_enum_has_the_flag():
    class WithFlag:
        class OnnxParserFlag:
            NATIVE_INSTANCENORM = 0

    assert compat.parser_flags(WithFlag, "none", False) == []
    assert compat.parser_flags(WithFlag, "ampere_plus", False) == ["NATIVE_INSTANCENORM"]
    assert compat.parser_flags(WithFlag, None, True) == ["NATIVE_INSTANCENORM"]
    assert compat.parser_flags(object(), "ampere_plus", True) == []

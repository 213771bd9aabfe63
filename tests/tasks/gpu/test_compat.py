"""tasks/gpu/compat.py: TensorRT-version decisions for 8.6, 10.x and 11.x, on CPU without tensorrt.

FakeTrt modules below are TEST DOUBLES of the ``tensorrt`` module: SimpleNamespaces that carry only
the version string and the attributes compat.caps_from_module looks for, laid out as NVIDIA's
Python API has them in each version (8.6 from its bindings; 10.x/11.x from the API reference and the
10.x -> 11.x migration guide).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest

from tasks.errors import InfraError, ModelError
from tasks.gpu import compat


def _ns(*names, **values):
    return SimpleNamespace(**{n: i for i, n in enumerate(names)}, **values)


def fake_trt(version: str) -> SimpleNamespace:
    """TEST DOUBLE of the tensorrt module of ``version`` (attributes only, nothing callable)."""
    major = int(version.split(".")[0])
    flags = ["TF32", "REFIT", "DEBUG", "DISABLE_TIMING_CACHE", "GPU_FALLBACK", "SPARSE_WEIGHTS"]
    if major >= 8:
        flags += ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    if major < 11:  # removed in 11: strong typing replaces them
        flags += ["FP16", "INT8", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO"]
    if major < 10:
        network_flags = _ns("EXPLICIT_BATCH", "EXPLICIT_PRECISION")
    elif major == 10:
        network_flags = _ns("EXPLICIT_BATCH", "STRONGLY_TYPED")  # EXPLICIT_BATCH deprecated, ignored
    else:
        network_flags = _ns("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS")  # STRONGLY_TYPED deprecated, ignored
    config = {"set_memory_pool_limit": None, "builder_optimization_level": 3, "hardware_compatibility_level": None,
              "profiling_verbosity": None, "set_timing_cache": None, "create_timing_cache": None}
    if major < 11:
        config.update(int8_calibrator=None, set_calibration_profile=None)
    engine = {"create_engine_inspector": None, "num_io_tensors": 0, "get_tensor_name": None}
    if major < 11:
        engine["device_memory_size"] = 0
    if major >= 10:
        engine["device_memory_size_v2"] = 0
    parser_error = {"code": None, "desc": None, "node": None}
    if major >= 10:
        parser_error.update(node_name=None, node_operator=None, local_function_stack=None)
    datatypes = ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8"] + (["INT64", "BF16"] if major >= 10 else [])
    module = SimpleNamespace(
        __version__=version,
        BuilderFlag=_ns(*flags),
        NetworkDefinitionCreationFlag=network_flags,
        MemoryPoolType=_ns("WORKSPACE", "DLA_MANAGED_SRAM"),
        HardwareCompatibilityLevel=_ns("NONE", "AMPERE_PLUS"),
        LayerInformationFormat=_ns("ONELINE", "JSON"),
        IBuilderConfig=SimpleNamespace(**config),
        ICudaEngine=SimpleNamespace(**engine),
        IExecutionContext=SimpleNamespace(execute_async_v3=None, set_input_shape=None, set_tensor_address=None),
        ITimingCache=SimpleNamespace(combine=None, serialize=None),
        ParserError=SimpleNamespace(**parser_error),
        DataType=_ns(*datatypes),
    )
    if major < 11:
        module.IInt8EntropyCalibrator2 = SimpleNamespace(get_batch=None)
    return module


TRT86, TRT10, TRT11 = (compat.caps_from_module(fake_trt(v)) for v in ("8.6.0", "10.7.0", "11.0.0"))


def test_caps_from_module_per_version():
    assert (TRT86.major, TRT86.minor, TRT86.patch) == (8, 6, 0)
    assert TRT86.fp16_flag and TRT86.int8_flag and TRT86.int8_calibrator and TRT86.explicit_batch_flag
    assert not TRT86.strongly_typed and not TRT86.strongly_typed_only and not TRT86.parser_node_names
    assert TRT86.hardware_compatibility and TRT86.version_compatible and TRT86.optimization_level
    assert not TRT86.device_memory_size_v2 and not TRT86.int64_tensors

    assert TRT10.fp16_flag and TRT10.int8_calibrator and TRT10.strongly_typed and TRT10.strongly_typed_flag
    assert not TRT10.explicit_batch_flag, "EXPLICIT_BATCH exists in 10.x but is deprecated and must not be set"
    assert not TRT10.strongly_typed_only and TRT10.parser_node_names and TRT10.device_memory_size_v2
    assert TRT10.int64_tensors

    assert TRT11.strongly_typed_only and TRT11.strongly_typed
    assert not (TRT11.fp16_flag or TRT11.int8_flag or TRT11.int8_calibrator or TRT11.explicit_batch_flag)


def test_caps_round_trip_through_the_probe_dict():
    data = TRT10.to_dict()
    for key in ("fp16_flag", "int8_flag", "int8_calibrator", "strongly_typed", "explicit_batch_flag",
                "engine_inspector", "hardware_compatibility", "version_compatible", "optimization_level"):
        assert isinstance(data[key], bool), key
    assert compat.Caps.from_dict(dict(data, some_future_key=1)) == TRT10
    assert compat.Caps.from_dict(None) == compat.Caps()


@pytest.mark.parametrize("text, expected", [("8.6.0", (8, 6, 0)), ("10.7.0.post1", (10, 7, 0)), ("11.0", (11, 0, 0)),
                                            ("garbage", (0, 0, 0))])
def test_parse_version(text, expected):
    assert compat.parse_version(text) == expected


# (caps, precision, int8_mode, graph) -> (network flags, builder flags, strongly typed, calibrator, needs fp16 graph)
PLANS = [
    (TRT86, "fp32", None, "fp32", ["EXPLICIT_BATCH"], [], False, False, False),
    (TRT86, "fp16", None, "fp32", ["EXPLICIT_BATCH"], ["FP16"], False, False, False),
    (TRT86, "fp16", None, "fp16", ["EXPLICIT_BATCH"], ["FP16"], False, False, False),
    (TRT86, "int8", "qdq", "fp32", ["EXPLICIT_BATCH"], ["INT8", "FP16"], False, False, False),
    (TRT86, "int8", None, "fp32", ["EXPLICIT_BATCH"], ["INT8", "FP16"], False, False, False),
    (TRT86, "int8", "calibrator", "fp32", ["EXPLICIT_BATCH"], ["INT8", "FP16"], False, True, False),
    (TRT10, "fp32", None, "fp32", [], [], False, False, False),
    (TRT10, "fp16", None, "fp32", [], ["FP16"], False, False, False),
    (TRT10, "fp16", None, "fp16", ["STRONGLY_TYPED"], [], True, False, False),
    (TRT10, "int8", "qdq", "fp32", [], ["INT8", "FP16"], False, False, False),  # as 8.6: unquantised layers FP16
    (TRT10, "int8", "qdq", "fp16", ["STRONGLY_TYPED"], [], True, False, False),   # Q/DQ over FP16
    (TRT10, "int8", "calibrator", "fp32", [], ["INT8", "FP16"], False, True, False),
    (TRT11, "fp32", None, "fp32", [], [], True, False, False),
    (TRT11, "fp16", None, "fp32", [], [], True, False, True),
    (TRT11, "fp16", None, "fp16", [], [], True, False, False),
    (TRT11, "int8", "qdq", "fp32", [], [], True, False, False),
    (TRT11, "int8", "qdq", "fp16", [], [], True, False, False),
]


@pytest.mark.parametrize("caps, precision, mode, graph, net, flags, strong, calib, needs16", PLANS,
                         ids=[f"trt{p[0].major}-{p[1]}-{p[2] or '-'}-{p[3]}graph" for p in PLANS])
def test_plan_build(caps, precision, mode, graph, net, flags, strong, calib, needs16):
    plan = compat.plan_build(caps, precision, mode, graph)
    assert plan.network_flags == net
    assert plan.builder_flags == flags
    assert plan.strongly_typed is strong
    assert plan.use_calibrator is calib
    assert plan.needs_fp16_graph is needs16
    assert plan.int8_mode == ((mode or "qdq") if precision == "int8" else None)


def test_calibrator_is_refused_on_trt11_with_the_fix():
    with pytest.raises(ModelError) as err:
        compat.plan_build(TRT11, "int8", "calibrator", "fp32")
    assert "implicit INT8 calibration was removed in TensorRT 11" in err.value.message
    assert err.value.fix == "use calibration.mode: qdq (explicit quantisation with Q/DQ nodes)"


def test_calibrator_on_trt10_notes_the_deprecation():
    plan = compat.plan_build(TRT10, "int8", "calibrator")
    assert any("implicit INT8 calibration" in d and "since 10.1" in d for d in plan.deprecations)
    assert not compat.plan_build(TRT86, "int8", "calibrator").deprecations
    assert plan.to_dict()["deprecations"] == plan.deprecations and plan.to_dict()["typing"] == "weak"


@pytest.mark.parametrize("args, words", [
    (("fp32", None, "fp16"), "FP16 ONNX graph"),
    (("bf16", None, "fp32"), "unknown precision"),
    (("int8", "smoothquant", "fp32"), "unknown INT8 mode"),
    (("fp16", None, "int4"), "unknown graph precision"),
])
def test_impossible_requests_are_model_errors(args, words):
    with pytest.raises(ModelError) as err:
        compat.plan_build(TRT86, *args)
    assert words in err.value.message and err.value.fix


def test_int8_mode_is_ignored_for_float_precisions():
    assert compat.plan_build(TRT86, "fp16", "calibrator").int8_mode is None
    assert not compat.plan_build(TRT86, "fp16", "calibrator").use_calibrator


def test_network_flags_value_uses_enum_positions():
    trt = fake_trt("8.6.0")  # EXPLICIT_BATCH = 0 in the double, as in TensorRT
    assert compat.network_flags_value(trt, ["EXPLICIT_BATCH"]) == 1
    assert compat.network_flags_value(trt, []) == 0
    assert compat.network_flags_value(fake_trt("10.7.0"), ["STRONGLY_TYPED"]) == 2


def test_hardware_and_version_compatibility_need_support():
    old = compat.Caps(version="8.4.3", major=8, minor=4)
    with pytest.raises(ModelError):
        compat.set_hardware_compatibility(None, SimpleNamespace(), old, "ampere_plus")
    with pytest.raises(ModelError):
        compat.version_compatible_flags(old, True)
    config = SimpleNamespace(hardware_compatibility_level=None)
    compat.set_hardware_compatibility(fake_trt("8.6.0"), config, TRT86, "ampere_plus")
    assert config.hardware_compatibility_level == 1  # AMPERE_PLUS in the double
    compat.set_hardware_compatibility(fake_trt("8.6.0"), config, TRT86, "none")
    assert compat.version_compatible_flags(TRT86, True) == ["VERSION_COMPATIBLE"]
    assert compat.version_compatible_flags(TRT86, False) == []


class _ParserDouble:
    """TEST DOUBLE of trt.OnnxParser after a failed parse: errors shaped like 8.6's or 10's ParserError."""

    def __init__(self, errors):
        self._errors = errors
        self.num_errors = len(errors)

    def get_error(self, i):
        return self._errors[i]


def _error_86(desc, node):
    return SimpleNamespace(desc=lambda: desc, code=lambda: SimpleNamespace(name="UNSUPPORTED_NODE"), node=lambda: node,
                           file=lambda: "ModelImporter.cpp", func=lambda: "parseGraph", line=lambda: 726)


def test_parser_errors_name_the_node_on_86_from_the_graph():
    parser = _ParserDouble([_error_86("No importer registered for op: NotAnOp", 1)])
    [item] = compat.parser_error_details(parser, TRT86, ["relu_ok", "mystery_node"], ["Relu", "NotAnOp"])
    assert item["node_index"] == 1 and item["node_name"] == "mystery_node" and item["node_op"] == "NotAnOp"
    assert item["code"] == "UNSUPPORTED_NODE" and "NotAnOp" in item["desc"]


def test_parser_errors_use_node_name_on_10():
    err = _error_86("bad attribute", 0)
    err.node_name = lambda: "conv_from_parser"
    err.node_operator = lambda: "Conv"
    [item] = compat.parser_error_details(_ParserDouble([err]), TRT10, ["conv_from_graph"], ["Conv"])
    assert item["node_name"] == "conv_from_parser" and item["node_op"] == "Conv"


def test_device_memory_prefers_v2():
    assert compat.device_memory_bytes(SimpleNamespace(device_memory_size=10, device_memory_size_v2=20)) == 20
    assert compat.device_memory_bytes(SimpleNamespace(device_memory_size=10)) == 10
    assert compat.device_memory_bytes(SimpleNamespace()) == 0


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed here")
def test_caps_of_the_real_tensorrt_module():
    """With a real tensorrt (the GPU worker's interpreter), caps agree with what its version promises."""
    import tensorrt

    caps = compat.caps_from_module(tensorrt)
    if caps.major == 8:
        assert caps.explicit_batch_flag and caps.fp16_flag and caps.int8_calibrator and not caps.strongly_typed
    elif caps.major == 10:
        assert caps.strongly_typed and not caps.explicit_batch_flag and caps.fp16_flag
    else:
        assert caps.strongly_typed_only and not caps.int8_calibrator
    assert caps.engine_inspector and caps.timing_cache_combine and caps.execute_async_v3


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="this interpreter has tensorrt")
def test_probe_without_tensorrt_fails_cleanly_naming_trt_python(tmp_path, monkeypatch):
    """`python -m tasks.gpu probe` in this interpreter: ok=false, kind infra, a fix naming TRT_PYTHON."""
    from tasks.gpu_client import probe_gpu

    monkeypatch.delenv("TRT_PYTHON", raising=False)
    with pytest.raises(InfraError) as err:
        probe_gpu(tmp_path, timeout_s=120)
    assert f"TensorRT cannot be imported in {sys.executable}" in err.value.message
    assert "TRT_PYTHON" in err.value.fix and "/opt/trt/bin/trt-python" in err.value.fix
    response = json.loads((tmp_path / "probe.response.json").read_text())
    assert response["ok"] is False and response["error"]["kind"] == "infra"


# ---- the CPU side's view: caps from a version string ---------------------------------------------

@pytest.mark.parametrize("version", ["8.6.0", "10.7.0", "11.0.0"])
def test_caps_for_version_agrees_with_the_module_of_that_version(version):
    assert compat.caps_for_version(version) == compat.caps_from_module(fake_trt(version))


def test_parser_limits_per_version():
    t86, t10, t11 = (compat.caps_for_version(v) for v in ("8.6.1.6", "10.3.0", "11.1"))
    assert (t86.parser_min_opset, t86.parser_max_opset, t86.parser_max_ir) == (7, 17, 8)
    assert not t86.parser_local_functions and t86.parser_table == "8.6" and t86.parser_note == ""
    assert (t10.parser_min_opset, t10.parser_max_opset, t10.parser_max_ir) == (9, 20, 10) and t10.parser_local_functions
    assert (t11.parser_max_opset, t11.parser_max_ir) == (25, 13)
    assert "Unique" in compat.parser_unsupported_ops(t86) and "BitwiseAnd" not in compat.parser_unsupported_ops(t86)
    assert "BitwiseAnd" in compat.parser_unsupported_ops(t10)
    newer = compat.caps_for_version("12.0")
    assert newer.parser_table == "11" and "12.0" in newer.parser_note


def test_a_probe_dict_from_before_the_parser_fields_gets_them_from_its_version():
    old = {k: v for k, v in TRT86.to_dict().items() if not k.startswith("parser_")}
    assert compat.Caps.from_dict(old).parser_max_opset == 17


def test_cpu_side_policy_per_version():
    t86, t10, t11 = (compat.caps_for_version(v) for v in ("8.6.0", "10.7.0", "11.0.0"))
    assert [compat.fp16_from_graph(c) for c in (t86, t10, t11)] == [False, False, True]
    assert [compat.calibrator_available(c) for c in (t86, t10, t11)] == [True, True, False]
    # auto: ModelOpt's opset-19 graphs only where the parser reads them, and only when installed
    assert compat.qdq_backend(t86, "auto", modelopt_installed=True) == "onnxruntime"
    assert compat.qdq_backend(t10, "auto", modelopt_installed=True) == "modelopt"
    assert compat.qdq_backend(t10, "auto", modelopt_installed=False) == "onnxruntime"
    assert compat.qdq_backend(None, "auto", modelopt_installed=True) == "modelopt"
    assert compat.qdq_backend(t11, "onnxruntime", modelopt_installed=True) == "onnxruntime"
    assert compat.qdq_backend(t86, "modelopt", modelopt_installed=False) == "modelopt"  # caller raises, naming the fix
    assert compat.plan_build(t11, "fp16").needs_fp16_graph and not compat.plan_build(t86, "fp16").needs_fp16_graph

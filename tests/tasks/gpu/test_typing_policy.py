"""TensorRT 10/11 policy on CPU: build typing, deprecations, FP16 and Q/DQ-over-FP16 graphs as the
CPU side prepares them (tasks/precision_inputs.py), the CUDA backend choice, and layers.json in
10.x's and 11.x's inspector formats (fixtures in data/)."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from tasks.errors import InfraError, ModelError
from tasks.gpu import build as gpu_build
from tasks.gpu import compat, cuda_backend
from tasks.gpu_client import GpuEnv
from tasks.package import LocalPackage
from tasks.spec import parse_spec
from tests.models import save, small_cnn
from tests.tasks.gpu import trt_double

DATA = Path(__file__).parent / "data"
V86, V10_7, V10_13, V11 = (compat.caps_for_version(v) for v in ("8.6.0", "10.7.0", "10.13.0", "11.1.0"))


# ---- typing and deprecations ---------------------------------------------------------------------

@pytest.mark.parametrize("caps, precision, graph, typing, strong, flags", [
    (V10_7, "fp16", "fp32", "weak", False, ["FP16"]),
    (V10_7, "fp16", "fp16", "weak", False, ["FP16"]),       # the FP16 graph, built as 8.6 would
    (V10_7, "int8", "fp16", None, True, []),                 # Q/DQ over FP16: strongly typed
    (V10_7, "int8", "fp32", None, False, ["INT8", "FP16"]),  # Q/DQ over FP32: INT8+FP16 as on 8.6
    (V10_7, "int8", "fp32", "strong", True, []),             # forced: INT8+FP32 (noted)
    (V10_7, "fp32", "fp32", "strong", True, []),
    (V11, "int8", "fp16", None, True, []),
    (V86, "int8", "fp32", None, False, ["INT8", "FP16"]),
])
def test_typing(caps, precision, graph, typing, strong, flags):
    plan = compat.plan_build(caps, precision, None, graph, typing)
    assert plan.strongly_typed is strong and plan.builder_flags == flags
    assert plan.typing == ("strong" if strong else "weak") and plan.to_dict()["typing"] == plan.typing


@pytest.mark.parametrize("caps, typing, words", [
    (V11, "weak", "strongly typed networks only"),
    (V86, "strong", "cannot build strongly typed networks"),
])
def test_impossible_typing_is_refused_with_a_fix(caps, typing, words):
    with pytest.raises(ModelError) as err:
        compat.plan_build(caps, "fp16", None, "fp16", typing)
    assert words in err.value.message and err.value.fix
    with pytest.raises(ModelError, match="unknown build typing"):
        compat.plan_build(V10_7, "fp32", None, "fp32", "medium")


def test_strongly_typed_int8_over_fp32_says_why_it_is_slower():
    plan = compat.plan_build(V11, "int8", "qdq", "fp32")
    assert plan.strongly_typed and any("calibration.high_precision: fp16" in n for n in plan.notes)
    assert not compat.plan_build(V11, "int8", "qdq", "fp16").notes


def test_deprecations_follow_the_workers_tensorrt():
    assert compat.plan_build(V10_7, "fp16").deprecations == []  # weak typing deprecated from 10.12
    (flag,) = compat.plan_build(V10_13, "fp16").deprecations
    assert "BuilderFlag FP16" in flag and "10.12" in flag
    calib = compat.plan_build(V10_13, "int8", "calibrator").deprecations
    assert len(calib) == 2 and any("implicit INT8 calibration" in d for d in calib)
    assert compat.plan_build(V86, "int8", "calibrator").deprecations == []
    assert compat.plan_build(V11, "fp16", None, "fp16").deprecations == []
    explicit = compat.BuildPlan("fp32", None, "fp32", network_flags=["EXPLICIT_BATCH"])
    assert "EXPLICIT_BATCH" in compat.deprecations(V10_7, explicit)[0]
    assert compat.deprecations(V86, explicit) == []


def test_fp16_source_and_qdq_high_precision():
    assert compat.fp16_graph_wanted(V11) and not compat.fp16_graph_wanted(V86) and not compat.fp16_graph_wanted(V10_13)
    assert compat.fp16_graph_wanted(V86, "graph")  # forced: the throughput comparison on the 8.6 machine
    with pytest.raises(ModelError, match="no FP16 builder flag") as err:
        compat.fp16_graph_wanted(V11, "flag")
    assert "fp16.source: auto" in err.value.fix
    assert [compat.int8_qdq_graph_precision(c) for c in (None, V86, V10_7, V11)] == ["fp32", "fp32", "fp16", "fp16"]
    assert compat.int8_qdq_graph_precision(V11, "fp32") == "fp32"
    with pytest.raises(ModelError, match="opset <= 17"):
        compat.int8_qdq_graph_precision(V86, "fp16")
    assert compat.int8_build_variants(V86) == [{"typing": "weak", "graph_precision": "fp32"}]
    assert compat.int8_build_variants(V11) == [{"typing": "strong", "graph_precision": "fp16"}]
    assert len(compat.int8_build_variants(V10_7)) == 2


# ---- what the CPU side prepares for 10/11 (tasks/precision_inputs.py) ------------------------------

def _package(tmp: Path) -> LocalPackage:
    root = tmp / "pkg"
    model = save(small_cnn(), root / "model.onnx")
    calib = root / "calibration"
    calib.mkdir()
    np.save(calib / "images.npy", np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    return LocalPackage("cnn", root, model, "ab" * 32, "etag", model.stat().st_size, f"file://{model}")


def _env(version: str) -> GpuEnv:
    return GpuEnv(tensorrt=version, gpu="none", compute_capability="9.0", driver="none", cuda_runtime="12.6",
                  python="3.9", interpreter="trt-python", caps=compat.caps_for_version(version).to_dict())


def _prepare(tmp: Path, version: str, precision: str, spec: dict):
    from tasks import precision_inputs
    from tasks.storage import open_storage

    storage = open_storage(f"file://{tmp / 'bucket'}")
    env = _env(version)
    return precision_inputs.prepare(storage, tensorrt=version, caps=env.policy(), target_key=env.target,
                                    spec=parse_spec(spec), package=_package(tmp), precision=precision, profiles=[],
                                    workdir=tmp / "work")


def test_fp16_for_trt11_is_a_graph_that_keeps_the_named_nodes_fp32_and_says_so(tmp_path):
    spec = {"fp16": {"keep_fp32_nodes": ["conv2"], "keep_fp32_op_types": ["Gemm"], "converter": "onnxruntime"}}
    prepared = _prepare(tmp_path, "11.1.0", "fp16", spec)
    assert prepared.graph_precision == "fp16" and prepared.onnx_path.name == "model.fp16.onnx"
    record = prepared.record["fp16"]
    assert record["converter"] == "onnxruntime" and record["keep_fp32_nodes"] == ["conv2"]
    assert record["keep_fp32_op_types"] == ["Gemm"] and record["keep_io_types"] is True
    model = onnx.load(str(prepared.onnx_path))
    weights = {i.name: i.data_type for i in model.graph.initializer}
    assert weights["w1"] == onnx.TensorProto.FLOAT16
    assert weights["w2"] == weights["wf"] == onnx.TensorProto.FLOAT  # conv2 and the Gemm stayed FP32
    assert _prepare(tmp_path / "b", "10.13.0", "fp16", {}).graph_precision == "fp32"  # the flag, on 10.x
    assert _prepare(tmp_path / "c", "8.6.0", "fp16", {"fp16": {"source": "graph"}}).graph_precision == "fp16"


def test_unknown_keep_fp32_node_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no node called") as err:
        _prepare(tmp_path, "11.1.0", "fp16", {"fp16": {"keep_fp32_nodes": ["nope"]}})
    assert "node names" in err.value.fix


@pytest.mark.parametrize("version, high", [("8.6.0", "fp32"), ("10.7.0", "fp16"), ("11.1.0", "fp16")])
def test_int8_qdq_graph_is_over_fp16_where_the_build_is_strongly_typed(tmp_path, version, high):
    prepared = _prepare(tmp_path, version, "int8", {"calibration": {"backend": "onnxruntime"}})
    assert prepared.int8_mode == "qdq" and prepared.graph_precision == high
    assert prepared.record["high_precision"] == high
    plan = compat.plan_build(compat.caps_for_version(version), "int8", "qdq", prepared.graph_precision)
    assert plan.strongly_typed is (high == "fp16")
    if high == "fp16":
        assert prepared.record["fp16"]["qdq"] is True and prepared.onnx_path.name == "model.qdq.fp16.onnx"


# ---- the CUDA backend ---------------------------------------------------------------------------------

def test_pycuda_is_taken_first_when_both_import(monkeypatch):
    trt_double.install(monkeypatch, cuda="both")
    api = cuda_backend.cuda_api()
    assert cuda_backend.backend_name() == "pycuda" and api is sys.modules["pycuda.driver"]
    assert cuda_backend.cuda_api() is api  # chosen once per process


def test_cuda_python_when_pycuda_does_not_import(monkeypatch):
    trt_double.install(monkeypatch, cuda="cuda-python")
    api = cuda_backend.cuda_api()
    assert cuda_backend.backend_name() == "cuda-python" and isinstance(api, cuda_backend.CudaPythonDriver)
    host = api.pagelocked_empty((2, 3), np.float32)
    host[...] = np.arange(6, dtype=np.float32).reshape(2, 3)
    dev, back = api.mem_alloc(host.nbytes), api.pagelocked_empty((2, 3), np.float32)
    stream = api.Stream()
    api.memcpy_htod_async(dev, host, stream)
    api.memcpy_dtoh_async(back, dev, stream)
    stream.synchronize()
    np.testing.assert_array_equal(back, host)
    dev.free()
    assert api.get_version() == (12, 6, 0) and api.Device(0).pci_bus_id() == "0000:00:00.0"


def test_no_bindings_or_a_wrong_setting_is_an_infra_error_with_the_fix(monkeypatch):
    trt_double.install(monkeypatch, cuda="none")
    with pytest.raises(InfraError) as err:
        cuda_backend.cuda_api()
    assert "pycuda" in err.value.message and "cuda-python" in err.value.message and "TRTFLOW_CUDA" in err.value.fix
    assert err.value.retriable is False
    trt_double.install(monkeypatch, cuda="cuda-python", force="pycuda")
    with pytest.raises(InfraError, match="pycuda: "):
        cuda_backend.cuda_api()  # forced, not silently replaced by the one that imports
    trt_double.install(monkeypatch, cuda="both", force="cupy")
    with pytest.raises(InfraError, match="names no CUDA backend"):
        cuda_backend.cuda_api()


def test_a_failing_cudart_call_names_the_call(monkeypatch):
    trt_double.install(monkeypatch, cuda="cuda-python")
    cudart = sys.modules["cuda"].cudart
    monkeypatch.setattr(cudart, "cudaMalloc", lambda n: (cudart.cudaError_t.cudaErrorMemoryAllocation, 0))
    with pytest.raises(InfraError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation \(out of memory\)"):
        cuda_backend.cuda_api().mem_alloc(1 << 40)


# ---- layers.json in 10.x's and 11.x's inspector formats --------------------------------------------

def test_layer_precisions_from_the_trt10_and_trt11_inspector_formats():
    ten = (DATA / "layers-trt10-int8-qdq-fp16-small-cnn.json").read_text()
    eleven = (DATA / "layers-trt11-int8-qdq-fp16-small-cnn.json").read_text()
    assert "Bindings" in json.loads(ten) and "I/O Tensors" in json.loads(eleven)
    for info in (ten, eleven):
        table = {r["name"]: r["precision"] for r in gpu_build.layer_table(info)}
        assert table["conv1 + relu1"] == table["fc"] == "int8"
        assert table["gap"] == table["flatten"] == "fp16"
        assert table["images_cast"] == "fp32" and table["logits_cast"] == "fp16"
        assert gpu_build.unknown_layers(info) == []
    assert gpu_build.layer_precisions(eleven) == gpu_build.layer_precisions(ten) == {"int8": 3, "fp16": 3, "fp32": 1}


def test_the_doubles_write_their_versions_inspector_format(monkeypatch, tmp_path):
    """The doubles' layers.json keeps the fixtures' shapes (what build.py parses is what 10/11 write)."""
    for version, key in ((trt_double.VERSIONS[10], "Bindings"), (trt_double.VERSIONS[11], "I/O Tensors")):
        trt_double.install(monkeypatch, version=version)
        assert isinstance(sys.modules["tensorrt"], types.ModuleType)
        engine = trt_double.ICudaEngine({"onnx": str(save(small_cnn(), tmp_path / f"{version}.onnx")),
                                         "profiles": [], "flags": [], "inputs": {}, "calibrated": None,
                                         "strongly_typed": True})
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt_double.LayerInformationFormat.JSON))
        assert key in info and info["Layers"]


def test_the_trt11_double_has_no_calibrator_api(monkeypatch):
    trt = trt_double.install(monkeypatch, version=trt_double.VERSIONS[11])
    caps = compat.caps_from_module(trt)
    assert caps.strongly_typed_only and not caps.fp16_flag and not caps.int8_calibrator and not caps.explicit_batch_flag
    assert caps.device_memory_size_v2 and not hasattr(trt, "IInt8EntropyCalibrator2")
    config = trt.Builder(None).create_builder_config()
    with pytest.raises(AttributeError, match="removed in TensorRT 11"):
        config.int8_calibrator = object()
    ten = compat.caps_from_module(trt_double.install(monkeypatch, version=trt_double.VERSIONS[10]))
    assert ten.strongly_typed and not ten.strongly_typed_only and ten.int8_calibrator and not ten.explicit_batch_flag

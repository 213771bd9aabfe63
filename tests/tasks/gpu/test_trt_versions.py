"""The whole ``engine`` verb against TensorRT-10- and TensorRT-11-shaped TEST DOUBLES (trt_double.py),
with pycuda and with cuda-python: fp32, fp16 from an FP16 graph, INT8 as Q/DQ over FP16, and the
refusals (calibrator and FP16 flag on 11, precision flags on strongly typed networks).

What is checked is trtflow's glue and policy (flags, typing, graphs handed over, response, layers,
runner), not TensorRT: the double's "engine" is onnxruntime running the ONNX graph it was given.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tasks.calibration import inputs_from_onnx, load_calibration_data
from tasks.fp16 import fp16_graph_from_onnx, fp16_qdq_graph_from_qdq
from tasks.gpu import build as gpu_build
from tasks.quantize import qdq_model_from_calibration
from tasks.spec import parse_spec
from tests.models import save, small_cnn
from tests.tasks.gpu import trt_double
from tests.tasks.gpu.test_gpu_glue import _eval_inputs, _reference, _request

TRT10, TRT11 = trt_double.VERSIONS[10], trt_double.VERSIONS[11]
DATA = Path(__file__).parent / "data"


@pytest.fixture
def gpu(monkeypatch):
    """``call(verb, request, tmp, version=..., cuda=...)``: runs a tasks.gpu verb in this process
    against the doubles of that TensorRT and those CUDA bindings; returns the response dict."""
    from tasks.gpu.__main__ import main

    def call(verb: str, request: dict, tmp: Path, version: str = TRT10, cuda: str = "pycuda", force=None) -> dict:
        trt_double.install(monkeypatch, version=version, cuda=cuda, force=force)
        req, resp = tmp / f"{verb}.req.json", tmp / f"{verb}.resp.json"
        req.write_text(json.dumps(request))
        assert main([verb, str(req), str(resp)]) == 0
        return json.loads(resp.read_text())

    return call


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """small_cnn as fp32, its FP16 graph, its Q/DQ graph (fp32) and the Q/DQ graph over FP16."""
    tmp = tmp_path_factory.mktemp("graphs")
    fp32 = save(small_cnn(), tmp / "model.onnx")
    calib = tmp / "calibration"
    calib.mkdir()
    np.save(calib / "images.npy", np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    spec = parse_spec({"calibration": {"backend": "onnxruntime"}})
    data = load_calibration_data(calib, spec, inputs_from_onnx(fp32))
    qdq = Path(qdq_model_from_calibration(fp32, data, spec, tmp / "model.qdq.onnx").out_path)
    return {"fp32": fp32, "fp16": fp16_graph_from_onnx(fp32, tmp / "model.fp16.onnx").path, "qdq": qdq,
            "qdq16": fp16_qdq_graph_from_qdq(qdq, tmp / "model.qdq.fp16.onnx").path}


def _eval(tmp: Path) -> Path:
    rng = np.random.default_rng(3)
    return _eval_inputs(tmp / "eval.npz", [1, 4], lambda n: {"images": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)})


def _layer_precisions_by_type(resp: dict) -> dict:
    rows = gpu_build.layer_table(Path(resp["layers"]["path"]).read_text())
    return {r["type"]: sorted({x["precision"] for x in rows if x["type"] == r["type"]}) for r in rows}


def _run(gpu, tmp, onnx_path, version, cuda="pycuda", force=None, **kw):
    inputs = _eval(tmp)
    req = _request(onnx_path, tmp / "engine", eval={"inputs": str(inputs), "outputs": str(tmp / "out.npz")},
                   bench={"warmup_ms": 1, "window_ms": 5, "iterations": 3, "shape": None}, **kw)
    return gpu("engine", req, tmp, version=version, cuda=cuda, force=force), inputs


@pytest.mark.parametrize("version, strong", [(TRT10, False), (TRT11, True)])
def test_fp32_engine(gpu, graphs, tmp_path, version, strong):
    resp, inputs = _run(gpu, tmp_path, graphs["fp32"], version)
    assert resp["ok"], resp
    engine = resp["engine"]
    assert engine["network_flags"] == [] and engine["builder_flags"] == []  # no EXPLICIT_BATCH on 10+ (the double asserts)
    assert engine["strongly_typed"] is strong and engine["typing"] == ("strong" if strong else "weak")
    assert engine["deprecations"] == []
    assert resp["layers"]["precisions"] == {"fp32": 7}
    got, want = np.load(resp["eval"]["outputs"]), _reference(graphs["fp32"], inputs)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert resp["bench"]["device_memory_bytes"] == 4096  # device_memory_size_v2 (11 has no v1)


@pytest.mark.parametrize("version, net", [(TRT10, ["STRONGLY_TYPED"]), (TRT11, [])])
def test_fp16_engine_from_the_fp16_graph_is_strongly_typed(gpu, graphs, tmp_path, version, net):
    resp, inputs = _run(gpu, tmp_path, graphs["fp16"], version, precision="fp16", graph_precision="fp16")
    assert resp["ok"], resp
    assert resp["engine"]["network_flags"] == net and resp["engine"]["builder_flags"] == []
    assert resp["engine"]["strongly_typed"] and resp["engine"]["deprecations"] == []
    by_type = _layer_precisions_by_type(resp)
    assert by_type["Conv"] == by_type["Gemm"] == by_type["Relu"] == ["fp16"]
    io = {t["name"]: t["dtype"] for t in resp["engine"]["io"]}
    assert io == {"images": "float", "logits": "float"}  # keep_io_types: callers feed FP32
    got, want = np.load(resp["eval"]["outputs"]), _reference(graphs["fp32"], inputs)
    for key in want:
        a, b = got[key].ravel(), want[key].ravel()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999


@pytest.mark.parametrize("version, net", [(TRT10, ["STRONGLY_TYPED"]), (TRT11, [])])
def test_int8_engine_is_qdq_over_fp16(gpu, graphs, tmp_path, version, net):
    resp, _ = _run(gpu, tmp_path, graphs["qdq16"], version, precision="int8", int8_mode="qdq", graph_precision="fp16")
    assert resp["ok"], resp
    engine = resp["engine"]
    assert engine["network_flags"] == net and engine["builder_flags"] == [] and engine["typing"] == "strong"
    by_type = _layer_precisions_by_type(resp)
    assert by_type["Conv"] == by_type["Gemm"] == ["int8"]
    # the layers TensorRT does not quantise run in FP16, as in the weakly typed INT8+FP16 build
    assert by_type["Relu"] == by_type["GlobalAveragePool"] == by_type["Flatten"] == ["fp16"]


def _float_inputs(model: onnx.ModelProto) -> dict:
    """node name -> ONNX elem types of its float inputs (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    return {n.name: [types[i] for i in n.input if i and types.get(i) in floats] for n in model.graph.node}


def test_the_int8_graph_handed_to_the_strongly_typed_build_has_fp16_unquantised_layers(graphs):
    model = onnx.load(str(graphs["qdq16"]))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19  # FP16 scales
    inputs = _float_inputs(model)
    unquantised = [n for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Cast")]
    assert {n.op_type for n in unquantised} == {"Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"}
    for node in unquantised:
        assert inputs[node.name] and set(inputs[node.name]) == {onnx.TensorProto.FLOAT16}, (node.name, inputs[node.name])
    scales = [i for i in model.graph.initializer if i.name.endswith("_scale")]
    assert scales and {s.data_type for s in scales} == {onnx.TensorProto.FLOAT16}
    # the model's I/O stays FP32: the same eval arrays feed every engine
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # and the FP32 Q/DQ graph, for comparison, is FP32 there (what 8.6 and weakly typed 10.x take)
    assert set(_float_inputs(onnx.load(str(graphs["qdq"])))["relu1"]) == {onnx.TensorProto.FLOAT}


def test_trt10_builds_weakly_typed_int8_fp16_from_an_fp32_qdq_graph_and_notes_the_deprecation(gpu, graphs, tmp_path):
    resp, _ = _run(gpu, tmp_path, graphs["qdq"], TRT10, precision="int8", int8_mode="qdq", graph_precision="fp32")
    assert resp["ok"], resp
    assert resp["engine"]["builder_flags"] == ["INT8", "FP16"] and resp["engine"]["typing"] == "weak"
    assert any("since 10.12" in d for d in resp["engine"]["deprecations"])
    assert _layer_precisions_by_type(resp)["Relu"] == ["fp16"]
    # both INT8 builds of strategy best on 10.x, as compat lists them
    from tasks.gpu import compat

    caps = compat.Caps.from_dict(resp["env"]["caps"])
    assert compat.int8_build_variants(caps) == [{"typing": "strong", "graph_precision": "fp16"},
                                                {"typing": "weak", "graph_precision": "fp32"}]


def test_trt10_calibrator_still_builds_with_a_deprecation(gpu, tmp_path):
    model = save(small_cnn(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c0.npz", images=np.zeros((8, 3, 32, 32), np.float32))
    profile = {"images": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}
    resp = gpu("engine", _request(model, tmp_path / "e", precision="int8", int8_mode="calibrator", profiles=[profile],
                                  calibration={"batches": [str(tmp_path / "c0.npz")], "cache_in": None,
                                               "cache_out": str(tmp_path / "c.cache")}), tmp_path, version=TRT10)
    assert resp["ok"], resp
    assert resp["engine"]["builder_flags"] == ["INT8", "FP16"] and resp["calibration"]["batches"] == 1
    assert any("implicit INT8 calibration" in d for d in resp["engine"]["deprecations"])


@pytest.mark.parametrize("kw, words", [
    (dict(precision="int8", int8_mode="calibrator"), "implicit INT8 calibration was removed in TensorRT 11"),
    (dict(precision="fp16"), "only from an FP16 ONNX graph"),
    (dict(precision="int8", int8_mode="qdq", typing="weak"), "strongly typed networks only"),
])
def test_trt11_refusals_name_the_fix(gpu, graphs, tmp_path, kw, words):
    resp = gpu("engine", _request(graphs["fp32"], tmp_path / "e", **kw), tmp_path, version=TRT11)
    assert not resp["ok"] and resp["error"]["kind"] == "model"
    assert words in resp["error"]["message"] and resp["error"]["fix"]


def test_trt11_int8_from_an_fp32_qdq_graph_builds_but_says_why_it_is_slow(gpu, graphs, tmp_path, caplog):
    resp, _ = _run(gpu, tmp_path, graphs["qdq"], TRT11, precision="int8", int8_mode="qdq", graph_precision="fp32")
    assert resp["ok"] and resp["engine"]["typing"] == "strong"
    assert _layer_precisions_by_type(resp)["Relu"] == ["fp32"]
    assert "unquantised layers are FP32" in " ".join(resp["engine"]["plan"]["notes"])


@pytest.mark.parametrize("cuda, force", [("cuda-python", None), ("both", "cuda-python")],
                         ids=["only-cuda-python-imports", "both-import-forced"])
def test_engine_verb_on_cuda_python(gpu, graphs, tmp_path, cuda, force):
    resp, inputs = _run(gpu, tmp_path, graphs["fp16"], TRT11, cuda=cuda, force=force, precision="fp16",
                        graph_precision="fp16")
    assert resp["ok"], resp
    assert resp["env"]["cuda_backend"] == "cuda-python" and resp["env"]["gpu"] == "Double GPU (cuda-python, no CUDA)"
    assert resp["env"]["cuda_runtime"] == "12.6" and resp["env"]["compute_capability"] == "9.0"
    got, want = np.load(resp["eval"]["outputs"]), _reference(graphs["fp32"], inputs)
    assert sorted(got.files) == sorted(want)
    lat = resp["bench"]["latency_ms"]
    assert lat["min"] == lat["max"] == 0.25  # each double launch takes 0.25 ms of GPU_CLOCK
    cudart = __import__("sys").modules["cuda"].cudart
    kinds = {k for _, k in cudart.calls}
    assert {int(cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), int(cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)} <= kinds

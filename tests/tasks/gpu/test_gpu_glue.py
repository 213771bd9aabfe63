"""tasks/gpu end to end on CPU, with TEST DOUBLES of tensorrt and pycuda (trt_double.py).

These check trtflow's own glue (the request and response protocol, profiles, flags, timing cache,
calibrator wiring, plan/layers files, runner, eval outputs, benchmark record), not TensorRT: the
double "engine" is onnxruntime. The same scenarios run against real TensorRT in tests/gpu on a GPU.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.models import save, small_cnn, two_input_model
from tests.tasks.gpu import trt_double


@pytest.fixture(params=["pycuda", "cuda-python"])
def gpu(monkeypatch, request):
    """Runs a tasks.gpu verb in this process against the doubles (8.6, with each CUDA backend's);
    returns the response dict."""
    trt_double.install(monkeypatch, cuda=request.param)
    from tasks.gpu.__main__ import main

    def call(verb: str, request: dict, tmp: Path) -> dict:
        req, resp = tmp / f"{verb}.req.json", tmp / f"{verb}.resp.json"
        req.write_text(json.dumps(request))
        assert main([verb, str(req), str(resp)]) == 0
        return json.loads(resp.read_text())

    return call


def _request(onnx_path: Path, out_dir: Path, **kw) -> dict:
    req = {"onnx_path": str(onnx_path), "out_dir": str(out_dir), "precision": "fp32", "int8_mode": None,
           "graph_precision": "fp32", "profiles": [], "default_opt_batch": 8, "default_max_batch": 32,
           "workspace_mib": 512, "optimization_level": 3, "hardware_compatibility": "none", "version_compatible": False,
           "timing_cache_in": None, "timing_cache_out": None, "calibration": None, "eval": None, "bench": None,
           "verbose": False}
    req.update(kw)
    return req


def _eval_inputs(path: Path, batches, make) -> Path:
    arrays = {}
    for i, n in enumerate(batches):
        for name, value in make(n).items():
            arrays[f"{i}:{name}"] = value
    np.savez(path, **arrays)
    return path


def _reference(onnx_path: Path, inputs: Path) -> dict:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    data = np.load(inputs)
    out = {}
    calls = sorted({k.split(":")[0] for k in data.files}, key=int)
    for c in calls:
        feeds = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith(f"{c}:")}
        for o, v in zip(sess.get_outputs(), sess.run(None, feeds)):
            out[f"{c}:{o.name}"] = v
    return out


def test_engine_build_eval_bench_response(gpu, tmp_path):
    model = save(small_cnn(), tmp_path / "m" / "model.onnx")
    rng = np.random.default_rng(0)
    inputs = _eval_inputs(tmp_path / "eval.npz", [1, 8],
                          lambda n: {"images": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)})
    out_dir = tmp_path / "engine"
    resp = gpu("engine", _request(model, out_dir, eval={"inputs": str(inputs), "outputs": str(out_dir / "eval_out.npz")},
                                  bench={"warmup_ms": 5, "window_ms": 10, "iterations": 10, "shape": None},
                                  timing_cache_out=str(tmp_path / "tc.out")), tmp_path)
    assert resp["ok"], resp
    env = resp["env"]
    assert env["tensorrt"] == "8.6.0" and env["compute_capability"] == "9.0" and env["caps"]["explicit_batch_flag"]
    engine = resp["engine"]
    plan = Path(engine["path"])
    assert plan == out_dir / "model.plan" and engine["bytes"] == plan.stat().st_size
    assert engine["sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert engine["builder_flags"] == [] and engine["strongly_typed"] is False
    assert engine["profiles"] == [{"images": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [32, 3, 32, 32]}}]
    assert {(t["name"], t["mode"], t["dtype"]) for t in engine["io"]} == {("images", "input", "float"),
                                                                            ("logits", "output", "float")}
    assert resp["timing_cache"]["saved_bytes"] == (tmp_path / "tc.out").stat().st_size > 0
    assert resp["timing_cache"]["loaded_bytes"] == 0
    layers = resp["layers"]
    assert Path(layers["path"]).exists() and json.loads(Path(layers["path"]).read_text())["Layers"]
    assert layers["precisions"] == {"fp32": 7}
    assert resp["calibration"] is None
    ev = resp["eval"]
    assert ev["calls"] == 2
    got, want = np.load(ev["outputs"]), _reference(model, inputs)
    assert sorted(got.files) == sorted(want) == ["0:logits", "1:logits"]
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    bench = resp["bench"]
    assert bench["shape"] == {"images": [8, 3, 32, 32]} and bench["batch"] == 8 and bench["iterations"] == 10
    lat = bench["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert bench["throughput_per_s"] == pytest.approx(8 * 1000 / lat["mean"], rel=1e-3)
    assert bench["device_memory_bytes"] == 4096

    # The timing cache goes back in; the `run` verb benchmarks the plan at another shape.
    again = gpu("engine", _request(model, tmp_path / "engine2", precision="fp16", timing_cache_in=str(tmp_path / "tc.out"),
                                   timing_cache_out=str(tmp_path / "tc2.out")), tmp_path)
    assert again["ok"] and again["engine"]["builder_flags"] == ["FP16"]
    assert again["timing_cache"]["loaded_bytes"] == (tmp_path / "tc.out").stat().st_size
    assert again["timing_cache"]["saved_bytes"] > again["timing_cache"]["loaded_bytes"]
    run = gpu("run", {"engine_path": str(plan), "bench": {"warmup_ms": 1, "window_ms": 5, "iterations": 3, "shape": {"images": [32, 3, 32, 32]}}},
              tmp_path)
    assert run["ok"] and run["bench"]["batch"] == 32 and run["eval"] is None
    outside = gpu("run", {"engine_path": str(plan), "bench": {"warmup_ms": 0, "window_ms": 5, "iterations": 1, "shape": {"images": [64, 3, 32, 32]}}},
                  tmp_path)
    assert outside["error"]["kind"] == "model" and "profiles" in outside["error"]["message"]

    merged = gpu("merge-cache", {"caches": [str(tmp_path / "tc.out"), str(tmp_path / "tc2.out"), str(tmp_path / "gone")],
                                 "out": str(tmp_path / "merged")}, tmp_path)
    assert merged["ok"] and merged["missing"] == [str(tmp_path / "gone")] and len(merged["combined"]) == 2
    assert set(json.loads((tmp_path / "merged").read_text())) == \
        set(json.loads((tmp_path / "tc.out").read_text())) | set(json.loads((tmp_path / "tc2.out").read_text()))


def test_two_inputs_int64_ids_run_as_int32(gpu, tmp_path):
    model = save(two_input_model(), tmp_path / "two.onnx")
    rng = np.random.default_rng(1)
    inputs = _eval_inputs(tmp_path / "eval.npz", [2, 5], lambda n: {
        "features": rng.standard_normal((n, 16)).astype(np.float32),
        "ids": rng.integers(0, 50, (n, 4)).astype(np.int64)})
    resp = gpu("engine", _request(model, tmp_path / "e", eval={"inputs": str(inputs), "outputs": str(tmp_path / "o.npz")}),
               tmp_path)
    assert resp["ok"], resp
    assert {t["name"]: t["dtype"] for t in resp["engine"]["io"]}["ids"] == "int32"
    assert set(resp["engine"]["profiles"][0]) == {"features", "ids"}
    got, want = np.load(resp["eval"]["outputs"]), _reference(model, inputs)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


def test_parser_error_names_the_node(gpu, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu_ok"),
         helper.make_node("NotAnOp", ["r"], ["y"], name="mystery_node", domain="trtflow.test")],
        "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("trtflow.test", 1)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bad.onnx"))
    resp = gpu("engine", _request(tmp_path / "bad.onnx", tmp_path / "e"), tmp_path)
    err = resp["error"]
    assert err["kind"] == "model"
    assert "'mystery_node' (NotAnOp, #1)" in err["message"] and "opset" in err["fix"]
    assert err["details"] and "mystery_node" in err["details"][0] and "NotAnOp" in err["details"][0]


def test_dynamic_spatial_dims_need_a_profile(gpu, tmp_path):
    model = small_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for axis in (2, 3):
        dims[axis].Clear()
        dims[axis].dim_param = "HW"[axis - 2]
    save(model, tmp_path / "hw.onnx")
    resp = gpu("engine", _request(tmp_path / "hw.onnx", tmp_path / "e"), tmp_path)
    assert resp["error"]["kind"] == "model"
    assert "'images' has dynamic dim 2" in resp["error"]["message"]
    assert resp["error"]["fix"].startswith("add a profile for images in trtflow.yaml")
    ok = gpu("engine", _request(tmp_path / "hw.onnx", tmp_path / "e", profiles=[
        {"images": {"min": [1, 3, 32, 32], "opt": [4, 3, 64, 64], "max": [8, 3, 128, 128]}}]), tmp_path)
    assert ok["ok"] and ok["engine"]["profiles"][0]["images"]["opt"] == [4, 3, 64, 64]


def test_calibrator_build_and_cache_reuse(gpu, tmp_path):
    model = save(small_cnn(), tmp_path / "m.onnx")
    profile = {"images": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}
    rng = np.random.default_rng(2)
    batches = []
    for i in range(3):
        np.savez(tmp_path / f"calib{i}.npz", images=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
        batches.append(str(tmp_path / f"calib{i}.npz"))
    cache = tmp_path / "calib.cache"
    req = _request(model, tmp_path / "e", precision="int8", int8_mode="calibrator", profiles=[profile],
                   calibration={"batches": batches, "cache_in": None, "cache_out": str(cache), "cache_key": "ignored"})
    resp = gpu("engine", req, tmp_path)
    assert resp["ok"], resp
    assert resp["engine"]["builder_flags"] == ["INT8", "FP16"]
    assert resp["calibration"]["batches"] == 3 and resp["calibration"]["reused"] is False
    assert resp["calibration"]["cache_bytes"] == cache.stat().st_size > 0
    assert resp["layers"]["precisions"] == {"int8": 7}

    reuse = gpu("engine", dict(req, out_dir=str(tmp_path / "e2"), calibration=dict(
        req["calibration"], batches=[], cache_in=str(cache), cache_out=str(tmp_path / "calib2.cache"))), tmp_path)
    assert reuse["ok"], reuse
    assert reuse["calibration"]["reused"] is True and reuse["calibration"]["batches"] == 0
    assert (tmp_path / "calib2.cache").read_bytes() == cache.read_bytes()

    np.savez(tmp_path / "small.npz", images=np.zeros((4, 3, 32, 32), np.float32))
    bad = gpu("engine", dict(req, calibration=dict(req["calibration"], batches=[str(tmp_path / "small.npz")])), tmp_path)
    assert bad["error"]["kind"] == "model" and "opt shape is [8, 3, 32, 32]" in bad["error"]["message"]


def test_fp16_graph_on_86_uses_the_flag_and_fp32_from_fp16_graph_is_refused(gpu, tmp_path):
    model = save(small_cnn(), tmp_path / "m.onnx")
    resp = gpu("engine", _request(model, tmp_path / "e", precision="fp16", graph_precision="fp16"), tmp_path)
    assert resp["ok"] and resp["engine"]["builder_flags"] == ["FP16"] and not resp["engine"]["strongly_typed"]
    bad = gpu("engine", _request(model, tmp_path / "e", precision="fp32", graph_precision="fp16"), tmp_path)
    assert bad["error"]["kind"] == "model"


def test_missing_model_is_infra(gpu, tmp_path):
    resp = gpu("engine", _request(tmp_path / "absent.onnx", tmp_path / "e"), tmp_path)
    assert resp["error"]["kind"] == "infra" and "absent.onnx" in resp["error"]["message"]

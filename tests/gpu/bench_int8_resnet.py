"""Benchmark (not run by CI): explicit vs implicit INT8 on a ResNet-50-sized model, against FP16.

Prints, for a random-weight ResNet-50 (v1.5, BN folded, built here with onnx.helper), the build time
and throughput at batch 32 and 128 of: FP16, INT8 with the implicit entropy calibrator, INT8 from
trtflow's Q/DQ graph and INT8 from onnxruntime's default Q/DQ graph (the one measured at >9 min to
build on TensorRT 8.6). Then the ratios issue 4 asks for: INT8/FP16 throughput at 32 and 128 and the
Q/DQ vs implicit build-time ratio.

Each step is a separate call so that every command stays under the device's 10-minute limit; the
files live in OUT between calls (the warm machine keeps them)::

    P=/opt/trt/bin/trt-python; B="-m tests.gpu.bench_int8_resnet /tmp/r50"
    $P $B prepare              # model, calibration data, both Q/DQ graphs, calibrator batches (CPU)
    $P $B fp16 calibrator      # two builds + benchmarks
    $P $B qdq                  # trtflow's Q/DQ graph
    $P $B ort-default          # onnxruntime's default Q/DQ graph, killed after --timeout s
    $P $B report               # the table and ratios (also written to OUT/results.json)

Python 3.9-compatible; imports what the TensorRT interpreter has (no Prefect, no Pillow).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BATCHES = (32, 128)
PROFILE = {"images": {"min": [1, 3, 224, 224], "opt": [128, 3, 224, 224], "max": [128, 3, 224, 224]}}


def resnet50(seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50 v1.5 as torchvision exports it after BN folding (Conv+bias, Relu, MaxPool, Add,
    GlobalAveragePool, Flatten, Gemm); random weights scaled so activations stay O(1) through 16 blocks."""
    rng = np.random.default_rng(seed)
    inits: List[onnx.TensorProto] = []
    nodes: List[onnx.NodeProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, relu: bool, gain: float = 1.0) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) * gain * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        if not relu:
            return f"{name}.out"
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    x = conv("images", 3, 64, 7, 2, "conv1", relu=True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for stage, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
        for i in range(blocks):
            s = stride if i == 0 else 1
            name = f"layer{stage}.{i}"
            y = conv(x, cin, width, 1, 1, f"{name}.conv1", relu=True)
            y = conv(y, width, width, 3, s, f"{name}.conv2", relu=True)
            y = conv(y, width, width * 4, 1, 1, f"{name}.conv3", relu=False, gain=0.2)  # like a small BN gamma
            shortcut = x
            if i == 0:
                shortcut = conv(x, cin, width * 4, 1, s, f"{name}.downsample", relu=False)
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.add"], name=f"{name}.add"))
            nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"], name=f"{name}.relu"))
            x, cin = f"{name}.out", width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="avgpool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    wf = (rng.standard_normal((classes, 2048)) * np.sqrt(1.0 / 2048)).astype(np.float32)
    inits.extend([numpy_helper.from_array(wf, "fc.weight"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtflow-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _request(onnx_path: Path, out_dir: Path, precision: str, int8_mode=None, calibration=None) -> dict:
    return {"onnx_path": str(onnx_path), "out_dir": str(out_dir), "precision": precision, "int8_mode": int8_mode,
            "graph_precision": "fp32", "profiles": [PROFILE], "default_opt_batch": 128, "default_max_batch": 128,
            "workspace_mib": 8192, "optimization_level": 3, "hardware_compatibility": "none",
            "version_compatible": False, "timing_cache_in": None, "timing_cache_out": None,
            "calibration": calibration, "eval": None, "bench": {"warmup": 20, "iterations": 100, "shape": None},
            "verbose": False}


def _results(out: Path) -> Dict[str, dict]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save(out: Path, key: str, value: dict) -> None:
    results = _results(out)
    results[key] = value
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))


def prepare(out: Path, samples: int) -> None:
    from tasks.calibration import calibration_batches, synthetic_calibration_data
    from tasks.quantize import ORT_DEFAULT, qdq_model_from_calibration
    from tasks.spec import parse_spec
    from tests.models import save

    out.mkdir(parents=True, exist_ok=True)
    model_path = save(resnet50(), out / "resnet50.onnx")
    spec = parse_spec({"profiles": [PROFILE], "calibration": {"synthetic": True, "max_samples": samples,
                                                               "batch_size": 128}})
    inputs = [{"name": "images", "dtype": "float32", "shape": ["N", 3, 224, 224]}]
    data = synthetic_calibration_data(spec, inputs, [PROFILE])
    info = {"samples": data.samples}
    for label, placement in (("qdq", "tensorrt"), ("ort-default", ORT_DEFAULT)):
        t = time.monotonic()
        r = qdq_model_from_calibration(model_path, data, spec, out / f"resnet50.{label}.onnx", placement=placement)
        info[label] = {"seconds": round(time.monotonic() - t, 1), "qdq_nodes": r.qdq_nodes,
                       "quantized_nodes": len(r.quantized_nodes), "residual_adds": len(r.residual_adds)}
    batches = calibration_batches(data, 128, out / "batches", profiles=[PROFILE])
    info["batches"] = [str(b) for b in batches]
    _save(out, "prepare", info)
    print(json.dumps(info, indent=1))


def build(out: Path, step: str, timeout: float) -> None:
    from tasks.errors import TrtflowError
    from tasks.gpu_client import run_gpu

    prep = _results(out).get("prepare")
    if prep is None:
        sys.exit("run the prepare step first")
    if step == "fp16":
        req = _request(out / "resnet50.onnx", out / step, "fp16")
    elif step == "calibrator":
        req = _request(out / "resnet50.onnx", out / step, "int8", "calibrator",
                       {"batches": prep["batches"], "cache_in": None, "cache_out": str(out / "calibrator.cache")})
    else:
        req = _request(out / f"resnet50.{step}.onnx", out / step, "int8", "qdq")
    started = time.monotonic()
    try:
        resp = run_gpu("engine", req, out / f"{step}-work", timeout).response
    except TrtflowError as err:
        record = {"error": str(err), "wall_seconds": round(time.monotonic() - started, 1)}
        _save(out, step, record)
        print(json.dumps(record, indent=1))
        return
    record = {"build_seconds": resp["engine"]["build_seconds"], "flags": resp["engine"]["builder_flags"],
              "layers": resp["layers"]["precisions"], f"throughput_{BATCHES[-1]}": resp["bench"]["throughput_per_s"]}
    for batch in BATCHES[:-1]:
        ran = run_gpu("run", {"engine_path": resp["engine"]["path"],
                              "bench": {"warmup": 20, "iterations": 100, "shape": {"images": [batch, 3, 224, 224]}}},
                      out / f"{step}-work", 600).response
        record[f"throughput_{batch}"] = ran["bench"]["throughput_per_s"]
    _save(out, step, record)
    print(json.dumps(record, indent=1))


def report(out: Path) -> None:
    r = _results(out)
    rows = ["fp16", "calibrator", "qdq", "ort-default"]
    print(f"{'engine':12} {'build s':>9} " + " ".join(f"{'b' + str(b) + ' img/s':>12}" for b in BATCHES) + "  layers")
    for key in rows:
        e = r.get(key)
        if not e:
            print(f"{key:12} (not run)")
        elif "error" in e:
            print(f"{key:12} failed after {e['wall_seconds']} s: {e['error'][:120]}")
        else:
            print(f"{key:12} {e['build_seconds']:9.1f} " + " ".join(f"{e['throughput_' + str(b)]:12.0f}" for b in BATCHES)
                  + f"  {e['layers']}")
    ratios = {}
    fp16 = r.get("fp16", {})
    for key in ("calibrator", "qdq", "ort-default"):
        e = r.get(key, {})
        for b in BATCHES:
            if fp16.get(f"throughput_{b}") and e.get(f"throughput_{b}"):
                ratios[f"{key}/fp16 throughput at batch {b}"] = round(e[f"throughput_{b}"] / fp16[f"throughput_{b}"], 3)
        if e.get("build_seconds") and r.get("calibrator", {}).get("build_seconds"):
            ratios[f"{key}/implicit build time"] = round(e["build_seconds"] / r["calibrator"]["build_seconds"], 3)
    print(json.dumps({"prepare": r.get("prepare", {}), "ratios": ratios}, indent=1))
    _save(out, "ratios", ratios)


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("steps", nargs="+", choices=["prepare", "fp16", "calibrator", "qdq", "ort-default", "report"])
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (synthetic)")
    parser.add_argument("--timeout", type=float, default=540, help="seconds before a build is killed")
    args = parser.parse_args(argv)
    for step in args.steps:
        if step == "prepare":
            prepare(args.out, args.samples)
        elif step == "report":
            report(args.out)
        else:
            build(args.out, step, args.timeout)


if __name__ == "__main__":
    main(sys.argv[1:])

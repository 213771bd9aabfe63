"""Measure 7 (issue 13): peak RSS of validation + reference outputs for a ~2 GB external-data model.

Goal: peak RSS <= 1.5x the model's size. Not run by CI. Runs here (CPU) or on the GPU machine::

    python bench/memory_external.py [--gib 2] [--dir /tmp/trtflow-mem]      # prints one JSON line

The model is built with onnx helpers: four MatMul weights (``[8192, 16384]`` float32, 512 MiB each
at 2 GiB), their bytes streamed into ``model.onnx.data`` chunk by chunk so the builder itself never
holds them. Each stage then runs in a fresh interpreter (``--stage``) that reports its own peak RSS
(``ru_maxrss``), so one stage's garbage never counts against the next; the files are removed after.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
WIDTH = 8192


def build_model(pkg: Path, gib: float) -> int:
    """model.onnx + model.onnx.data under ``pkg`` (MatMul chain, external weights); returns total bytes."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    pkg.mkdir(parents=True, exist_ok=True)
    layers = 4
    wide = max(256, int(gib * 1024 ** 3 / (layers * WIDTH * 4)) // 256 * 256)  # columns of the odd layers
    dims = [WIDTH, wide] * (layers // 2) + [WIDTH]
    rng = np.random.default_rng(0)
    inits, nodes, offset = [], [], 0
    with open(pkg / "model.onnx.data", "wb") as data:
        for i in range(layers):
            rows, cols = dims[i], dims[i + 1]
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[rows, cols])
            t.data_location = TensorProto.EXTERNAL
            for start in range(0, rows, 512):  # 512 rows at a time: at most 32 MiB in memory
                block = rng.standard_normal((min(512, rows - start), cols), dtype=np.float32)
                block *= np.float32(1.0 / np.sqrt(rows))  # in place: stays float32 (a float64 scale would promote)
                data.write(block.tobytes())
            length = rows * cols * 4
            for k, v in (("location", "model.onnx.data"), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=k, value=v)
            offset += length
            inits.append(t)
            nodes.append(helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                                          ["y" if i == layers - 1 else f"h{i + 1}"], name=f"matmul{i}"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtflow-bench")
    model.ir_version = 8
    onnx.save(model, str(pkg / "model.onnx"))
    assert (pkg / "model.onnx.data").stat().st_size == offset, "external data does not match its offsets"
    return (pkg / "model.onnx").stat().st_size + (pkg / "model.onnx.data").stat().st_size


def _package(pkg: Path):
    from tasks.package import LocalPackage
    from tasks.storage import sha256_file

    model = pkg / "model.onnx"
    return LocalPackage(name=pkg.name, root=pkg, model_path=model, model_sha256=sha256_file(model), model_etag="",
                        model_size=model.stat().st_size, source_uri=str(model))


def run_stage(stage: str, pkg: Path) -> dict:
    """One stage as convert-model runs it (tasks/ functions), in this interpreter."""
    from tasks import accuracy
    from tasks.spec import ModelSpec
    from tasks.validate import validate_model

    import psutil

    spec = ModelSpec()
    package = _package(pkg)
    baseline = psutil.Process().memory_info().rss  # the interpreter with trtflow, onnx and onnxruntime imported
    t = time.perf_counter()
    report = validate_model(package.model_path, spec, package.root, caps="8.6")
    out = {"stage": stage, "validation_ok": report.ok, "errors": [e.message for e in report.errors][:3]}
    if stage == "reference":
        eval_set = accuracy.eval_inputs(package, spec, package.model_path, report.profiles,
                                        out_path=pkg.parent / "eval.inputs.npz")
        accuracy.reference_outputs(package.model_path, eval_set, out_path=pkg.parent / "eval.reference.npz")
        out["eval_samples"] = eval_set.samples
    out["seconds"] = round(time.perf_counter() - t, 2)
    out["baseline_rss_bytes"] = baseline
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/trtflow-mem"))
    ap.add_argument("--stage", choices=["validate", "reference"], help="internal: run one stage here")
    args = ap.parse_args()
    pkg = args.dir / "big"
    if args.stage:
        print(json.dumps(run_stage(args.stage, pkg)))
        return 0
    try:
        size = build_model(pkg, args.gib)
        stages = {}
        for stage in ("validate", "reference"):  # reference = validation + eval inputs + ONNX Runtime outputs
            proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--dir", str(args.dir)],
                                  capture_output=True, text=True)
            stages[stage] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                {"error": proc.stderr[-2000:]}
        peak = max(s.get("peak_rss_bytes", 0) for s in stages.values())
        print(json.dumps({"measure": "memory", "model_bytes": size, "model_gib": round(size / 1024 ** 3, 3),
                          "stages": stages, "peak_rss_bytes": peak, "ratio": round(peak / size, 3), "goal": "<= 1.5",
                          "ok": peak <= 1.5 * size}))
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

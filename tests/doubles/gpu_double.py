"""TEST DOUBLE of tasks/gpu: answers the GPU subprocess protocol with onnxruntime, not TensorRT.

It lets the flows run end to end on a CPU machine. The "engine" it writes is the ONNX file behind a
header that says so; its benchmark times onnxruntime on the CPU. Knobs (environment):
  TRTFLOW_DOUBLE_FAIL=crash|model|oom     fail every engine call that way
  TRTFLOW_DOUBLE_FAIL_ONLY=fp16           ... but only builds of that precision
  TRTFLOW_DOUBLE_NONDETERMINISTIC=1       each build's plan differs (as TensorRT's tactic choice can)
  TRTFLOW_DOUBLE_NOISE_<PRECISION>=0.5    add that much relative noise to that precision's outputs
  TRTFLOW_DOUBLE_TRT_VERSION=10.8.0       the TensorRT version its probe reports (default 0.0.0-double);
                                          8.x also refuses what TensorRT 8.6's parser refuses (_parser_refusal)
  TRTFLOW_DOUBLE_TRACE=<file>             append "<verb> <precision> <start> <end>" lines (concurrency tests)
  TRTFLOW_DOUBLE_BLOCK=<file>             engine: write "<pid>" there, then "build" for 600 s (kill tests)
  TRTFLOW_DOUBLE_ENV_DUMP=<file>          write the environment it was given as JSON (allow-list tests)
  TRTFLOW_DOUBLE_LEAK=<text>              engine: print <text> to its log and fail with it (scrub tests)
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

DOUBLE_HEADER = b"TRTFLOW TEST DOUBLE ENGINE - not a TensorRT plan\n"
ENV = {"tensorrt": os.environ.get("TRTFLOW_DOUBLE_TRT_VERSION") or "0.0.0-double", "gpu": "trtflow test double (no GPU)", "compute_capability": "0.0",
       "driver": "none", "cuda_runtime": "none", "python": sys.version.split()[0], "interpreter": sys.executable,
       "gpu_uuid": os.environ.get("CUDA_VISIBLE_DEVICES", "double-0"), "memory_total_mib": 0,
       "caps": {"fp16_flag": True, "int8_flag": True, "int8_calibrator": True, "strongly_typed": False,
                "engine_inspector": False}}


def _parser_refusal(req: dict):
    """With TRTFLOW_DOUBLE_TRT_VERSION 8.x, what TensorRT 8.6 refuses and trtflow's adapt step must
    have rewritten: IR > 8, opset > 17, a Slice with computed axes, input dims sharing a dim_param
    that the profile sizes differently. Returns (message, stage) or None."""
    import onnx

    if not ENV["tensorrt"].startswith("8."):
        return None
    model = onnx.load(req["onnx_path"], load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if model.ir_version > 8:
        return f"Unsupported model IR version: {model.ir_version}, max supported IR version: 8", ""
    if opset > 17:
        return f"opset version {opset} is not supported (max 17)", ""
    consts = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Slice" and len(n.input) > 3 and n.input[3] and n.input[3] not in consts:
            return "This version of TensorRT does not support dynamic axes.", n.name
    for profile in req.get("profiles") or []:
        for vi in model.graph.input:
            seen = {}
            for axis, d in enumerate(vi.type.tensor_type.shape.dim):
                rng = profile.get(vi.name)
                if d.dim_param and rng:
                    sizes = (rng["min"][axis], rng["opt"][axis], rng["max"][axis])
                    if seen.setdefault(d.dim_param, sizes) != sizes:
                        return f"{vi.name}: Input dimensions with this name are inconsistent ({d.dim_param})", ""
    return None


def _ort_measure(sess, shapes: dict, s) -> dict:
    """One shape timed on onnxruntime's host clock, assembled by tasks/gpu/bench.py's own record
    functions, so the record has the real method's keys (no CUDA: no graph, copies of 0 ms)."""
    from tasks.gpu import bench

    feeds = {i.name: np.zeros(shapes[i.name], dtype=np.int64 if "int64" in i.type else np.float32)
             for i in sess.get_inputs()}

    def run_ms(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            sess.run(None, feeds)
        return (time.perf_counter() - t) * 1e3

    n = max(3, min(int(s.iterations), 10))
    batch = int(next(iter(shapes.values()))[0]) if shapes else 1
    tput = bench.throughput_windows(run_ms, 2, min(s.windows, 3), batch, s.cov_limit, 0)
    lat = bench.latency_stats([run_ms(1) for _ in range(n)])
    zero = bench.latency_stats([0.0])
    host = {"host_latency_ms": lat, "h2d_ms": zero, "d2h_ms": zero}
    graph = {"used": False, "reason": "test double: no CUDA"}
    return bench.measure_record(shapes, batch, s, graph, tput, lat, host,
                                {"device_memory_bytes": 1024 * batch, "activation_bytes": 512 * batch, "io_bytes": 0})


def _bench(sess, req: dict) -> dict:
    from tasks.gpu import bench

    s = bench.BenchSettings.from_request(req["bench"])
    profile = (req.get("profiles") or [{}])[0]
    shapes = {i.name: list(profile.get(i.name, {}).get("opt") or [d if isinstance(d, int) else 1 for d in i.shape])
              for i in sess.get_inputs()}
    record = dict(_ort_measure(sess, shapes, s), method="test double: onnxruntime on the CPU, host clock",
                  sweep=None, layer_times=None)
    first = sess.get_inputs()[0].name
    if s.sweep and first in profile:
        lo, opt, hi = (profile[first][k][0] for k in ("min", "opt", "max"))
        batches = sorted({int(b) for b in s.sweep if lo <= int(b) <= hi}) if isinstance(s.sweep, list) else \
            bench.sweep_batches(lo, opt, hi)
        points = [bench.sweep_point(_ort_measure(sess, {n: ([b] + v[1:]) if n in profile else v
                                                        for n, v in shapes.items()}, s)) for b in batches]
        record["sweep"] = bench.sweep_record(first, points, s.p99_target_ms)
    if s.layer_times:  # the file's place in the protocol; no per-layer times without TensorRT
        path = Path(req["out_dir"]) / "layer_times.json"
        path.write_text(json.dumps({"iterations": 0, "total_ms": 0.0, "layers": [], "note": "test double"}))
        record["layer_times"] = {"path": str(path), "layers": 0, "total_ms": 0.0}
    return record


def _engine(req: dict) -> dict:
    import onnxruntime as ort

    refusal = _parser_refusal(req)
    if refusal:
        from tasks.fixes import fix_for_parser_error

        message, node = refusal
        fix = fix_for_parser_error(message, node, "Slice" if node else "", ENV["tensorrt"])
        return {"ok": False, "error": {"kind": "model", "fix": fix.fix, "details": [{"fix": fix.to_dict()}],
                                       "message": f"TensorRT {ENV['tensorrt']}'s ONNX parser rejected the model "
                                                  f"at node {node!r}: {message} (double)"}}
    fail = os.environ.get("TRTFLOW_DOUBLE_FAIL")
    if os.environ.get("TRTFLOW_DOUBLE_FAIL_ONLY", req["precision"]) != req["precision"]:
        fail = None
    block = os.environ.get("TRTFLOW_DOUBLE_BLOCK")
    if block:
        Path(block).write_text(str(os.getpid()))
        time.sleep(600)  # stands in for a long TensorRT build; the tests kill it long before
    leak = os.environ.get("TRTFLOW_DOUBLE_LEAK")
    if leak:
        print(f"double: building with {leak}", file=sys.stderr, flush=True)
        return {"ok": False, "error": {"kind": "infra", "message": f"double: failed near {leak}", "fix": None,
                                       "details": [leak]}}
    if fail == "crash":
        ctypes.string_at(0)  # a real segfault, as a crashing TensorRT build would give
    if fail == "model":
        return {"ok": False, "error": {"kind": "model", "message": "double: parser rejected node 'conv1'",
                                       "fix": "double: check the opset", "details": ["node conv1 (Conv)"]}}
    if fail == "oom":
        return {"ok": False, "error": {"kind": "infra", "message": "double: CUDA out of memory", "fix": None, "details": []}}
    start = time.time()
    out_dir = Path(req["out_dir"]); out_dir.mkdir(parents=True, exist_ok=True)
    plan = out_dir / "model.plan"
    with open(plan, "wb") as f:
        f.write(DOUBLE_HEADER)
        f.write(Path(req["onnx_path"]).read_bytes())
        if os.environ.get("TRTFLOW_DOUBLE_NONDETERMINISTIC"):
            f.write(os.urandom(16))
    if req.get("timing_cache_out"):
        prior = Path(req["timing_cache_in"]).read_bytes() if req.get("timing_cache_in") and Path(req["timing_cache_in"]).exists() else b""
        Path(req["timing_cache_out"]).write_bytes(prior + b"double-cache-entry\n")
    from tasks.cpu_threads import session_options  # TRTFLOW_CPU_THREADS, as trtflow's own CPU sessions

    sess = ort.InferenceSession(req["onnx_path"], session_options(), providers=["CPUExecutionProvider"])
    result = {"ok": True, "env": ENV,
              "engine": {"path": str(plan), "bytes": plan.stat().st_size,
                         "sha256": hashlib.sha256(plan.read_bytes()).hexdigest(),
                         "build_seconds": 0.0, "strongly_typed": False, "builder_flags": [req["precision"].upper()],
                         "profiles": req.get("profiles", []),
                         "io": [{"name": i.name, "mode": "input", "dtype": i.type, "shape": i.shape} for i in sess.get_inputs()]
                         + [{"name": o.name, "mode": "output", "dtype": o.type, "shape": o.shape} for o in sess.get_outputs()]},
              "timing_cache": {"loaded_bytes": 0, "saved_bytes": 0}, "layers": {"path": None, "precisions": {}},
              "calibration": None, "eval": None, "bench": None}
    if req.get("eval"):
        noise = float(os.environ.get(f"TRTFLOW_DOUBLE_NOISE_{req['precision'].upper()}", "0"))
        rng = np.random.default_rng(0)
        data = np.load(req["eval"]["inputs"])
        calls = sorted({k.split(":", 1)[0] for k in data.files}, key=int)
        outs = {}
        for c in calls:
            feeds = {k.split(":", 1)[1]: data[k] for k in data.files if k.split(":", 1)[0] == c}
            for o, v in zip(sess.get_outputs(), sess.run(None, feeds)):
                if noise and np.issubdtype(v.dtype, np.floating):
                    v = v + noise * np.abs(v).mean() * rng.standard_normal(v.shape).astype(v.dtype)
                outs[f"{c}:{o.name}"] = v
        np.savez(req["eval"]["outputs"], **outs)
        result["eval"] = {"outputs": req["eval"]["outputs"], "calls": len(calls), "seconds": 0.0}
    if req.get("bench"):
        result["bench"] = _bench(sess, req)
    result["engine"]["build_seconds"] = time.time() - start
    trace = os.environ.get("TRTFLOW_DOUBLE_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(f"engine {req['precision']} {start} {time.time()}\n")
    return result


def main(argv) -> int:
    verb, req_path, resp_path = argv[-3:]
    dump = os.environ.get("TRTFLOW_DOUBLE_ENV_DUMP")
    if dump:
        Path(dump).write_text(json.dumps(dict(os.environ)))
    req = json.loads(Path(req_path).read_text())
    if verb == "probe":
        resp = {"ok": True, "env": ENV}
    elif verb == "engine":
        resp = _engine(req)
    elif verb == "merge-cache":
        with open(req["out"], "wb") as out:
            for c in req["caches"]:
                if Path(c).exists():
                    out.write(Path(c).read_bytes())
        resp = {"ok": True}
    else:
        resp = {"ok": False, "error": {"kind": "infra", "message": f"double: unknown verb {verb}"}}
    Path(resp_path).write_text(json.dumps(resp))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

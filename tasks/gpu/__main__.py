"""``python -m tasks.gpu <verb> request.json response.json``: the GPU subprocess protocol.

Always writes the response: ``{"ok": true, ...}`` or ``{"ok": false, "error": {"kind": "model" |
"infra", "message", "fix", "details"}}``. Logs go to stderr (the client keeps them as build.log),
TensorRT's own messages included (WARNING and up; all of them with ``"verbose": true``).

Verbs and their requests:

``probe`` ``{}`` -> ``{"env": {tensorrt, gpu, compute_capability, driver, cuda_runtime, cuda_backend,
python, interpreter, gpu_uuid, memory_total_mib, caps: {...}}}`` (``caps``: tasks/gpu/compat.py ``Caps``;
``cuda_backend``: "pycuda" | "cuda-python", tasks/gpu/cuda_backend.py, TRTFLOW_CUDA forces one).

``engine`` -> build, then optionally run the eval inputs and benchmark, in one process::

    onnx_path          absolute path; an FP32 model, a Q/DQ model, or an FP16 graph
    out_dir            absolute; model.plan and layers.json are written here
    precision          "fp32" | "fp16" | "int8"
    int8_mode          "qdq" | "calibrator" | null (int8 only; null means qdq)
    graph_precision    "fp32" | "fp16" (an FP16 ONNX graph, or for int8 a Q/DQ graph over FP16: strongly typed)
    typing             "weak" | "strong" | null (null: the graph decides, compat.plan_build)
    profiles           [{input: {"min": [...], "opt": [...], "max": [...]}}]; [] -> a default profile
                       for a dynamic dim 0 (1 / default_opt_batch / default_max_batch)
    default_opt_batch, default_max_batch, workspace_mib, optimization_level (null: TensorRT's default)
    hardware_compatibility "none" | "ampere_plus";  version_compatible bool
    timing_cache_in    path or null (loaded if present);  timing_cache_out: path or null
    calibration        {"batches": [npz], "cache_in": path|null, "cache_out": path} | null (calibrator mode)
    eval               {"inputs": npz "<i>:<input>", "outputs": npz to write "<i>:<output>"} | null
    bench              null, or tasks/gpu/bench.py BenchSettings: {"warmup_ms", "window_ms", "windows",
                       "iterations", "cuda_graph", "cov_limit", "max_reruns", "layer_times",
                       "sweep": bool | [batch sizes], "p99_target_ms", "shape": null | {input: shape},
                       "layer_times_path": null (default <out_dir>/layer_times.json)}; all optional
    verbose            bool

-> ``{"env", "engine": {path, bytes, sha256, build_seconds, strongly_typed, typing, deprecations,
builder_flags, profiles, io}, "timing_cache": {loaded_bytes, saved_bytes}, "layers": {path, precisions}, "calibration":
{cache_bytes, reused} | null, "eval": {outputs, calls, seconds} | null, "bench": {method, shape, batch,
iterations, warmup_ms, cuda_graph: {used, reason}, throughput_per_s (enqueue-ahead), throughput: {per_s,
windows_per_s, cov, stable, reruns, attempt_covs, inferences_per_window, windows}, latency_ms (GPU compute:
{mean, p50, p90, p99, min, max}), host_latency_ms, h2d_ms, d2h_ms (same keys), device_memory_bytes,
activation_bytes, io_bytes, sweep: {input, points: [{batch, throughput_per_s, cov, latency_ms: {p50, p99},
host_latency_ms: {p50, p99}, cuda_graph, device_memory_bytes, activation_bytes, io_bytes}], p99_target_ms,
largest_batch_under_target} | null, layer_times: {path, layers, total_ms} | null} | null}``

``run`` ``{"engine_path", "version_compatible"?, "eval"?, "bench"?}`` -> ``{"env", "io", "eval", "bench"}``:
eval/benchmark an engine built earlier (e.g. at another batch size; layer times beside the engine).

``merge-cache`` ``{"caches": [paths], "out": path}`` -> ``{"out", "bytes", "combined", "skipped",
"missing"}``: combine timing caches (ITimingCache.combine, ignore_mismatch) into ``out``.

Python 3.9-compatible.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from tasks.errors import InfraError, TrtflowError

log = logging.getLogger("trtflow.gpu")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _env(trt: Any) -> Dict[str, Any]:
    from tasks.gpu import compat
    from tasks.gpu.runtime import device_info

    env = device_info(trt)
    env["caps"] = compat.caps_from_module(trt).to_dict()
    return env


def probe(request: Dict[str, Any]) -> Dict[str, Any]:
    """What this worker offers."""
    from tasks.gpu.build import import_tensorrt

    trt = import_tensorrt()
    env = _env(trt)
    log.info("TensorRT %s on %s (sm %s), driver %s, Python %s", env["tensorrt"], env["gpu"],
             env["compute_capability"], env["driver"], env["python"])
    return {"env": env}


def _eval_and_bench(runner: Any, request: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    from tasks.gpu.bench import bench_engine
    from tasks.gpu.check import run_eval

    out: Dict[str, Any] = {"eval": None, "bench": None}
    ev = request.get("eval")
    if ev:
        out["eval"] = run_eval(runner, str(ev["inputs"]), str(ev["outputs"]))
    b = request.get("bench")
    if b:
        out["bench"] = bench_engine(runner, b, layers_path=Path(b.get("layer_times_path") or out_dir / "layer_times.json"))
    return out


def engine(request: Dict[str, Any]) -> Dict[str, Any]:
    """Build an engine, then run the eval inputs and the benchmark on it."""
    from tasks.gpu.build import build_engine, import_tensorrt, make_logger
    from tasks.gpu.runtime import EngineRunner, cuda_init

    trt = import_tensorrt()
    logger = make_logger(trt, bool(request.get("verbose")))
    env = _env(trt)
    cuda_init()
    built = build_engine(request, trt=trt, logger=logger)
    response: Dict[str, Any] = {"env": env}
    response.update(built.response)
    response.update({"eval": None, "bench": None})
    if request.get("eval") or request.get("bench"):
        runner = EngineRunner(built.engine, trt=trt, runtime=built.runtime)
        try:
            response.update(_eval_and_bench(runner, request, Path(request["out_dir"])))
        finally:
            runner.close()
    return response


def run(request: Dict[str, Any]) -> Dict[str, Any]:
    """Eval/benchmark an existing engine file."""
    from tasks.gpu.build import import_tensorrt, make_logger
    from tasks.gpu.runtime import EngineRunner

    trt = import_tensorrt()
    logger = make_logger(trt, bool(request.get("verbose")))
    env = _env(trt)
    runner = EngineRunner.from_file(str(request["engine_path"]), logger=logger,
                                    version_compatible=bool(request.get("version_compatible")))
    response: Dict[str, Any] = {"env": env, "io": None}
    from tasks.gpu.build import engine_io

    response["io"] = engine_io(trt, runner.engine)
    try:
        response.update(_eval_and_bench(runner, request, Path(str(request["engine_path"])).parent))
    finally:
        runner.close()
    return response


def merge_cache(request: Dict[str, Any]) -> Dict[str, Any]:
    """Combine timing caches."""
    from tasks.gpu.build import merge_timing_caches
    from tasks.gpu.runtime import cuda_init

    cuda_init()
    return merge_timing_caches(request)


VERBS: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
    "probe": probe, "engine": engine, "run": run, "merge-cache": merge_cache,
}


def _classify(err: BaseException) -> TrtflowError:
    """An unexpected exception as an error record: CUDA memory trouble and everything else are infra."""
    text = f"{type(err).__name__}: {err}"
    details: List[str] = [traceback.format_exc()]
    if type(err).__name__ == "MemoryError" or "out of memory" in str(err).lower():
        return InfraError(f"CUDA out of memory: {text}",
                          fix="Retry on a GPU with more free memory, or lower build.workspace_mib or the profiles' max shapes.",
                          details=details)
    return InfraError(f"unexpected error in the GPU step: {text}",
                      fix="See build.log for the traceback; retry, and report it if it repeats.", details=details)


def _write_response(path: str, response: Dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(response, indent=2, sort_keys=True, default=str))
    os.replace(tmp, target)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit code (0 whenever a response was written)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        sys.stderr.write("usage: python -m tasks.gpu {probe|engine|run|merge-cache} request.json response.json\n")
        return 2
    verb, request_path, response_path = args
    request: Dict[str, Any] = {}
    try:
        request = json.loads(Path(request_path).read_text())
    except (OSError, ValueError) as err:
        _setup_logging(False)
        _write_response(response_path, {"ok": False, "error": InfraError(
            f"cannot read the GPU request {request_path}: {err}", fix="Retry; the flow writes it before each call.").to_dict()})
        return 0
    _setup_logging(bool(request.get("verbose")))
    handler = VERBS.get(verb)
    try:
        if handler is None:
            raise InfraError(f"unknown GPU verb {verb!r}.",
                             fix=f"Use one of {', '.join(VERBS)}; the flow and the GPU worker may run different trtflow versions.")
        log.info("tasks.gpu %s (Python %s, %s)", verb, sys.version.split()[0], sys.executable)
        response = handler(request)
        response = dict(response, ok=True)
    except TrtflowError as err:
        log.error("%s: %s", type(err).__name__, err)
        for line in err.details:
            log.error("  %s", line)
        response = {"ok": False, "error": err.to_dict()}
    except Exception as err:  # noqa: BLE001 - the protocol promises a response for every failure
        log.exception("unexpected error")
        response = {"ok": False, "error": _classify(err).to_dict()}
    _write_response(response_path, response)
    return 0


if __name__ == "__main__":
    sys.exit(main())

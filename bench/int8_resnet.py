"""INT8 vs FP16 on a ResNet-50-sized model: build time and throughput (not run by CI).

Builds, through trtflow's GPU subprocess (tasks.gpu_client, one process per engine), an FP16
engine, an INT8 engine with TensorRT's implicit calibrator, and an INT8 engine from an explicit Q/DQ
model, all with one profile (min 1 / opt --opt-batch / max largest --batches), then times each at
every batch size. Prints build seconds, throughput, INT8/FP16 throughput ratios and the Q/DQ vs
implicit build-time ratio. Results accumulate in --results, so the variants can run in separate
calls (each device command is limited to 10 minutes) and the table covers all of them.

On the lent H100 (TRT_PYTHON defaults to the interpreter running this)::

    python3 bench/export_resnet.py --out /tmp/bench/resnet50.onnx
    /opt/trt/bin/trt-python bench/int8_resnet.py --onnx /tmp/bench/resnet50.onnx --only fp16
    /opt/trt/bin/trt-python bench/int8_resnet.py --onnx /tmp/bench/resnet50.onnx --only int8-calib
    /opt/trt/bin/trt-python bench/int8_resnet.py --onnx /tmp/bench/resnet50.onnx --qdq /tmp/bench/resnet50.qdq.onnx --only int8-qdq

The Q/DQ model comes from tasks/quantize.py (``qdq_model_from_calibration``); pass its path. With
``--qdq-ort PATH --only int8-qdq-ort`` the same is timed for onnxruntime's default Q/DQ placement (the
measured >9 min build), for the comparison issue 4 asks about.
Calibration data for the implicit calibrator is random (speed only: accuracy is not measured here).
Python 3.9-compatible (runs under the TensorRT interpreter).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasks.errors import TrtflowError  # noqa: E402
from tasks.gpu_client import run_gpu  # noqa: E402

VARIANTS = ("fp16", "int8-calib", "int8-qdq", "int8-qdq-ort")


def _input(onnx_path: Path):
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    vi = next(i for i in model.graph.input if i.name not in init)
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
    return vi.name, dims


def _shape(dims: List[int], batch: int) -> List[int]:
    return [batch] + [d if d > 0 else 1 for d in dims[1:]]


def _calibration_batches(folder: Path, name: str, shape: List[int], count: int) -> List[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"calib{i:02d}.npz"
        if not path.exists():
            np.savez(path, **{name: rng.standard_normal(shape).astype(np.float32)})
        paths.append(str(path))
    return paths


def run_variant(variant: str, args: argparse.Namespace) -> Dict:
    """Build one variant's engine and time it at every batch size."""
    onnx_path = {"int8-qdq": args.qdq, "int8-qdq-ort": args.qdq_ort}.get(variant, args.onnx)
    if onnx_path is None:
        raise SystemExit(f"{variant} needs --{'qdq' if variant == 'int8-qdq' else 'qdq-ort'} PATH (a Q/DQ model from "
                         f"tasks/quantize.py)")
    name, dims = _input(onnx_path)
    batches = sorted(args.batches)
    profile = {name: {"min": _shape(dims, 1), "opt": _shape(dims, args.opt_batch), "max": _shape(dims, batches[-1])}}
    work = args.workdir / variant
    request = {
        "onnx_path": str(onnx_path), "out_dir": str(work), "precision": "fp16" if variant == "fp16" else "int8",
        "int8_mode": {"int8-calib": "calibrator", "int8-qdq": "qdq", "int8-qdq-ort": "qdq"}.get(variant),
        "graph_precision": "fp32",
        "profiles": [profile], "default_opt_batch": args.opt_batch, "default_max_batch": batches[-1],
        "workspace_mib": args.workspace_mib, "optimization_level": args.optimization_level,
        "hardware_compatibility": "none", "version_compatible": False,
        "timing_cache_in": None, "timing_cache_out": None, "calibration": None, "eval": None,
        "bench": {"warmup": args.warmup, "iterations": args.iterations, "shape": {name: _shape(dims, batches[0])}},
        "verbose": args.verbose,
    }
    if variant == "int8-calib":
        # The calibrator runs at the calibration profile's opt shape: batches must have exactly that shape.
        request["calibration"] = {
            "batches": _calibration_batches(args.workdir / "calibration", name, _shape(dims, args.opt_batch), args.calib_batches),
            "cache_in": None, "cache_out": str(work / "calibration.cache")}
    started = time.monotonic()
    call = run_gpu("engine", request, work, args.timeout)
    wall = time.monotonic() - started
    resp = call.response
    benches = {batches[0]: resp["bench"]}
    for batch in batches[1:]:
        ran = run_gpu("run", {"engine_path": resp["engine"]["path"],
                              "bench": {"warmup": args.warmup, "iterations": args.iterations,
                                        "shape": {name: _shape(dims, batch)}}}, work, args.timeout, log_name="run.log")
        benches[batch] = ran.response["bench"]
    return {
        "variant": variant, "onnx": str(onnx_path), "tensorrt": resp["env"]["tensorrt"], "gpu": resp["env"]["gpu"],
        "build_seconds": resp["engine"]["build_seconds"], "process_seconds": round(wall, 1),
        "builder_flags": resp["engine"]["builder_flags"], "engine_bytes": resp["engine"]["bytes"],
        "layers": resp["layers"]["precisions"], "opt_batch": args.opt_batch,
        "bench": {str(b): {"throughput_per_s": r["throughput_per_s"], "p50_ms": r["latency_ms"]["p50"],
                           "p99_ms": r["latency_ms"]["p99"], "device_memory_bytes": r["device_memory_bytes"]}
                  for b, r in benches.items()},
    }


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(results: Dict[str, Dict], batches: List[int]) -> str:
    """The compact summary printed at the end."""
    lines = []
    head = f"{'variant':<11} {'build s':>8} " + " ".join(f"{'thr@' + str(b):>10} {'p50ms@' + str(b):>10}" for b in batches) \
        + "  layers"
    lines.append(head)
    lines.append("-" * len(head))
    for variant in VARIANTS:
        r = results.get(variant)
        if not r:
            continue
        cells = []
        for b in batches:
            x = r["bench"].get(str(b))
            cells.append(f"{x['throughput_per_s']:>10.0f} {x['p50_ms']:>10.3f}" if x else f"{'-':>10} {'-':>10}")
        lines.append(f"{variant:<11} {r['build_seconds']:>8.1f} " + " ".join(cells) + f"  {r['layers']}")
    fp16 = results.get("fp16")
    lines.append("")
    for variant in ("int8-calib", "int8-qdq", "int8-qdq-ort"):
        r = results.get(variant)
        if r and fp16:
            ratios = ", ".join(f"batch {b}: {_ratio(r['bench'].get(str(b), {}).get('throughput_per_s'), fp16['bench'].get(str(b), {}).get('throughput_per_s'))}"
                               for b in batches)
            lines.append(f"{variant} / fp16 throughput: {ratios}")
    calib = results.get("int8-calib")
    for variant in ("int8-qdq", "int8-qdq-ort"):
        qdq = results.get(variant)
        if calib and qdq:
            lines.append(f"{variant} vs implicit build time: {qdq['build_seconds']:.1f} s / {calib['build_seconds']:.1f} s "
                         f"= {_ratio(qdq['build_seconds'], calib['build_seconds'])} (target for int8-qdq: <= 2x)")
    any_r = next(iter(results.values()), None)
    if any_r:
        lines.append(f"TensorRT {any_r['tensorrt']} on {any_r['gpu']}, profile opt batch {any_r['opt_batch']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, help="FP32 ResNet-50-sized model (bench/export_resnet.py)")
    parser.add_argument("--qdq", type=Path, default=None, help="its Q/DQ model (tasks/quantize.py, trtflow placement)")
    parser.add_argument("--qdq-ort", type=Path, default=None,
                        help="optional baseline: the Q/DQ model with onnxruntime's default placement "
                             "(qdq_model_from_calibration(..., placement='onnxruntime-default'))")
    parser.add_argument("--only", default="fp16,int8-calib,int8-qdq", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--batches", default="32,128", help="batch sizes to time (the largest is the profile's max)")
    parser.add_argument("--opt-batch", type=int, default=128, help="profile opt batch = calibration batch")
    parser.add_argument("--calib-batches", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--workspace-mib", type=int, default=8192)
    parser.add_argument("--optimization-level", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench/work"))
    parser.add_argument("--results", type=Path, default=None, help="JSON to accumulate into (default WORKDIR/results.json)")
    parser.add_argument("--timeout", type=float, default=590.0, help="per GPU subprocess, seconds")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",") if b]
    wanted = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    results_path = args.results or args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for variant in wanted:
        sys.stdout.write(f"== {variant}\n")
        sys.stdout.flush()
        try:
            results[variant] = run_variant(variant, args)
        except TrtflowError as err:
            sys.stdout.write(f"{variant} failed: {err}\n")
            for line in err.details[-5:]:
                sys.stdout.write(f"  {line}\n")
            continue
        sys.stdout.write(json.dumps(results[variant], indent=1) + "\n")
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, sort_keys=True))
    sys.stdout.write("\n" + table(results, sorted(args.batches)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

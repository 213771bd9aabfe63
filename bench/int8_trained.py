"""INT8 on a trained CNN through the whole convert-model flow (not run by CI).

Builds, under whatever TRT_PYTHON names (TensorRT 8.6 on the H100):
  trained-qdq    precisions int8/fp16/fp32, strategy all, INT8 by explicit Q/DQ (tasks/quantize.py)
  trained-calib  the same model, INT8 by TensorRT's implicit entropy calibrator
  outliers       fallback chain: calibration data with rare 200x outliers ruins min-max INT8 scales,
                 so INT8 fails its gate and FP16 becomes latest
and prints accuracy vs the FP32 ONNX Runtime reference, build seconds and batch throughput.

    TRT_PYTHON=/opt/trt/bin/trt-python PYTHONPATH=/opt/py312:. python3 bench/int8_trained.py --bucket /tmp/int8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.convert import convert_model  # noqa: E402
from flows.params import ConvertRequest  # noqa: E402
from tasks.package import latest_key  # noqa: E402
from tasks.storage import LocalStorage  # noqa: E402
from tests import models, trained  # noqa: E402

BATCH = 256
COMMON = f"""
profiles:
  - images: {{min: [1, 3, 16, 16], opt: [{BATCH}, 3, 16, 16], max: [{BATCH}, 3, 16, 16]}}
bench: {{warmup: 50, iterations: 500}}
"""


def add_package(bucket: Path, name: str, yaml_text: str, model, calib: np.ndarray, evalx: np.ndarray) -> None:
    root = bucket / "models" / name
    models.save(model, root / "model.onnx")
    (root / "trtflow.yaml").write_text(yaml_text)
    (root / "calibration").mkdir(parents=True, exist_ok=True)
    np.save(root / "calibration" / "images.npy", calib)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    np.save(root / "eval" / "images.npy", evalx)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", type=Path, default=Path("/tmp/trtflow-int8"))
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here too")
    args = ap.parse_args()
    model, eval_x, eval_y, calib_x = trained.train_small_cnn()
    outliers = calib_x.copy()
    outliers[::16] *= 200.0
    add_package(args.bucket, "trained-qdq", COMMON + "precisions: [int8, fp16, fp32]\nstrategy: all\n"
                "calibration: {mode: qdq, method: minmax}\n", model, calib_x, eval_x)
    add_package(args.bucket, "trained-calib", COMMON + "precisions: [int8, fp16, fp32]\nstrategy: all\n"
                f"calibration: {{mode: calibrator, batch_size: {BATCH}}}\n", model, np.concatenate([calib_x, calib_x]), eval_x)
    add_package(args.bucket, "outliers", COMMON + "precisions: [int8, fp16, fp32]\nstrategy: fallback\n"
                "calibration: {mode: qdq, method: minmax}\n", model, outliers, eval_x)
    store = LocalStorage(args.bucket)
    rows = []
    for name in ("trained-qdq", "trained-calib", "outliers"):
        t0 = time.time()
        summary = convert_model(ConvertRequest(model_uri=str(args.bucket / "models" / name), force=True))
        wall = time.time() - t0
        conversion = store.read_json(store.read_json(latest_key(name))["conversion"])
        for precision, r in conversion["precisions"].items():
            metrics = (r.get("gate") or {}).get("metrics", {}).get("logits", {})
            bench = r.get("bench") or {}
            rows.append({"package": name, "precision": precision, "result": r["result"],
                         "cosine": metrics.get("cosine"), "top1": metrics.get("top1"),
                         "build_s": (r.get("engine") or {}).get("build_seconds"),
                         "p50_ms": (bench.get("latency_ms") or {}).get("p50"),
                         "throughput": bench.get("throughput_per_s"), "layers": (r.get("layers") or {}).get("precisions"),
                         "mode": (r.get("prepared") or {}).get("mode")})
        print(f"{name}: {summary['status']} latest={summary['latest']['precision']} in {wall:.1f} s", flush=True)
    print(f"\n{'package':14} {'prec':5} {'mode':10} {'result':12} {'cosine':>9} {'top1':>6} {'build s':>8} "
          f"{'p50 ms':>8} {'img/s':>10}  layers")
    for r in rows:
        def f(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "—"
        print(f"{r['package']:14} {r['precision']:5} {str(r['mode'] or '-'):10} {r['result']:12} {f(r['cosine'], '.6f'):>9} "
              f"{f(r['top1'], '.3f'):>6} {f(r['build_s'], '.1f'):>8} {f(r['p50_ms'], '.3f'):>8} "
              f"{f(r['throughput'], ',.0f'):>10}  {r['layers']}")
    by = {(r["package"], r["precision"]): r for r in rows}
    fp16 = by.get(("trained-qdq", "fp16"), {}).get("throughput")
    for key in (("trained-qdq", "int8"), ("trained-calib", "int8")):
        t = by.get(key, {}).get("throughput")
        if t and fp16:
            print(f"{key[0]} int8/fp16 throughput at batch {BATCH}: {t / fp16:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

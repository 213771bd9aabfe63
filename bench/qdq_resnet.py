"""Q/DQ models of a ResNet-50-sized ONNX for bench/int8_resnet.py (not run by CI).

Writes <out>/resnet50.qdq.onnx (trtflow's TensorRT placement, tasks/quantize.py) and
<out>/resnet50.qdq-ort.onnx (onnxruntime's default placement with float biases, the >9 min build),
both calibrated min-max on the same random images (speed is measured, not accuracy).

    PYTHONPATH=/opt/py312:. python3 bench/qdq_resnet.py --onnx /tmp/bench/resnet50.onnx --out /tmp/bench
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.calibration import CalibrationData  # noqa: E402
from tasks.quantize import ORT_DEFAULT, check_qdq_structure, qdq_model_from_calibration  # noqa: E402
from tasks.spec import parse_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--name", default="resnet50", help="output file stem: <out>/<name>.qdq.onnx")
    ap.add_argument("--chw", default="", help="C,H,W of the calibration images where the model's are dynamic, "
                                              "e.g. 3,640,640 (the detector: at 1x1 its Concats do not line up)")
    args = ap.parse_args()
    import onnx

    graph_input = onnx.load(str(args.onnx), load_external_data=False).graph.input[0]
    dims = ([int(v) for v in args.chw.split(",")] if args.chw
            else [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim][1:])
    images = np.random.default_rng(0).normal(0, 1, [args.samples] + dims).astype(np.float32)
    data = CalibrationData({graph_input.name: images}, hashlib.sha256(images.tobytes()).hexdigest(), synthetic=True)
    spec = parse_spec({"calibration": {"method": "minmax", "backend": "onnxruntime", "synthetic": True}})
    variants = [(f"{args.name}.qdq.onnx", "tensorrt")] + \
        ([] if args.skip_ort else [(f"{args.name}.qdq-ort.onnx", ORT_DEFAULT)])
    for fname, placement in variants:
        t0 = time.time()
        result = qdq_model_from_calibration(args.onnx, data, spec, args.out / fname, placement=placement)
        problems = check_qdq_structure(args.out / fname)
        print(f"{fname}: placement {placement}, Q/DQ nodes {result.qdq_nodes}, quantised nodes "
              f"{len(result.quantized_nodes)}, {time.time() - t0:.1f} s, structure problems: {problems or 'none'}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""CPU check of exported zoo packages before the GPU run: validation for a TensorRT version, the
adapt step's rewrites, the eval data through ONNX Runtime, and the INT8 calibration data.

    python3 bench/zoo/check_zoo.py --bucket /tmp/zoo [--only resnet50,...] [--trt 8.6]

Uses trtflow's own modules (run from the repository root, PYTHONPATH=.). One JSON line per
package; exit 1 when any package would not reach the GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tasks import accuracy, adapt, calibration, validate
from tasks.gpu.compat import caps_for_version
from tasks.package import LocalPackage
from tasks.spec import load_spec


def sanitise_effect(model: Path, eval_npz: Path, ref_npz: Path, work: Path) -> dict:
    """Sanitise 'always' on the original: node counts and the largest output difference on the eval
    data against the unsanitised reference (evidence for whether 'always' does harm)."""
    import numpy as np
    import onnx

    sanitised, record = adapt.sanitise(onnx.load(str(model), load_external_data=False))
    if not record.applied:
        return {"applied": False, "why": record.why}
    out = model.with_name(model.stem + ".sanitised-check.onnx") if adapt._has_external_data(sanitised) \
        else work / (model.parent.name + ".sanitised.onnx")
    onnx.save_model(sanitised, str(out))
    try:
        import onnxruntime as ort

        calls = accuracy.load_calls(eval_npz)

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        ref = accuracy.load_calls(ref_npz)
        worst = 0.0
        for feeds, expected in zip(calls, ref):
            got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            for name, arr in expected.items():
                worst = max(worst, float(np.max(np.abs(got[name].astype(np.float64) - arr.astype(np.float64)))))
        return {"applied": True, "nodes": f"{record.before} -> {record.after}", "max_abs_diff": worst}
    finally:
        if out.parent == model.parent:
            out.unlink()


def check(pkg: Path, trt: str, work: Path, sanitise_always: bool = False) -> dict:
    spec = load_spec(pkg / "trtflow.yaml")
    model = pkg / "model.onnx"
    caps = caps_for_version(trt)
    report = validate.validate_model(model, spec, pkg, caps=caps)
    out = {"model": pkg.name, "validation_errors": [f"{i.code}: {i.message[:160]}" for i in report.errors],
           "warnings": report.warning_codes()}
    result = adapt.adapt_for_target(model, work / pkg.name, caps, report.profiles or [], sanitise_mode="on-failure")
    out["adapt"] = [f"{r.name}: {r.before} -> {r.after}" + ("" if r.applied else " (not applied)") for r in result.records]
    if result.changed:  # what reaches the parser is the adapted model: judge that one
        out["original_errors"] = [i.code for i in report.errors]
        report = validate.validate_model(result.path, spec, pkg, caps=caps)
        out["validation_errors"] = [f"{i.code}: {i.message[:160]}" for i in report.errors]
    local = LocalPackage(pkg.name, pkg, result.path, "-", "-", model.stat().st_size, str(pkg))
    eval_set = accuracy.eval_inputs(local, spec, model_path=result.path, profiles=report.profiles or None,
                                    out_path=work / f"{pkg.name}.eval.npz")
    ref = accuracy.reference_outputs(result.path, eval_set, work / f"{pkg.name}.ref.npz")
    out["eval"] = {"samples": eval_set.samples, "synthetic": eval_set.synthetic, "reference": ref.name}
    if sanitise_always:
        out["sanitise_always"] = sanitise_effect(result.path, work / f"{pkg.name}.eval.npz", ref, work)
    if "int8" in [str(p) for p in spec.precisions]:
        inputs = calibration.inputs_from_onnx(str(result.path))
        data = calibration.load_calibration_data(local.data_dir(spec.calibration.data), spec, inputs,
                                                 report.profiles or None)
        out["calibration"] = {"samples": data.samples, "inputs": data.input_names}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bucket", type=Path, default=Path("/tmp/zoo"))
    ap.add_argument("--only", default="")
    ap.add_argument("--trt", default="8.6")
    ap.add_argument("--sanitise-always", action="store_true", help="also compare a sanitised copy's outputs")
    args = ap.parse_args()
    only = {n for n in args.only.split(",") if n}
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in sorted((args.bucket / "models").iterdir()):
            if not pkg.is_dir() or (only and pkg.name not in only):
                continue
            try:
                row = check(pkg, args.trt, Path(tmp), args.sanitise_always)
                bad += bool(row["validation_errors"])
            except Exception as err:  # noqa: BLE001 - report every package, not the first failure
                row = {"model": pkg.name, "error": f"{type(err).__name__}: {str(err)[:400]}"}
                bad += 1
            print(json.dumps(row, default=str), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

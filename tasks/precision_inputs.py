"""What one precision's build needs besides the model: the Q/DQ graph or calibrator batches for
INT8, an FP16 graph where TensorRT is strongly typed only. CPU work, done before the GPU step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from tasks.errors import ModelError
from tasks.gpu import compat
from tasks.limits import run_limited
from tasks.package import LocalPackage
from tasks.spec import ModelSpec
from tasks.storage import Storage


@dataclass
class Prepared:
    onnx_path: Path
    int8_mode: Optional[str] = None
    graph_precision: str = "fp32"
    calibrator: Optional[dict] = None  # the engine request's "calibration" field
    record: dict = field(default_factory=dict)  # what the manifest says about calibration


def _fp16_graph(package: LocalPackage, spec: ModelSpec, workdir: Path) -> Prepared:
    from tasks.fp16 import fp16_graph_from_onnx

    f16 = spec.fp16
    out = fp16_graph_from_onnx(package.model_path, Path(workdir) / "model.fp16.onnx", keep_io_types=f16.keep_io_types,
                               op_block_list=f16.keep_fp32_op_types, node_block_list=f16.keep_fp32_nodes,
                               converter=f16.converter)
    return Prepared(out.path, graph_precision="fp16", record={"fp16": out.to_record()})


def prepare(storage: Storage, *, tensorrt: str, caps: compat.Caps, target_key: Optional[str], spec: ModelSpec,
            package: LocalPackage, precision: str, profiles: List[dict], workdir: Path) -> Prepared:
    """Make the inputs of one precision's engine build, for the target TensorRT (on the CPU pool).

    Args:
        tensorrt: the target TensorRT version ("8.6.1", "10.8"), a GPU worker's or the setting's.
        caps: the target's TensorRT policy (tasks/gpu/compat.py): a worker's probed caps, or what the
            configured target version offers when no worker is known.
        target_key: ``sm_XX-trtVER`` of that worker, for the calibrator cache (None: no cache reuse).

    Raises:
        ModelError: INT8 without calibration data (and without ``calibration.synthetic: true``), the
            implicit calibrator on a TensorRT without it, a Q/DQ graph TensorRT would reject.
    """
    if precision == "fp16" and compat.fp16_graph_wanted(caps, spec.fp16.source):
        return _fp16_graph(package, spec, workdir)  # TensorRT 11 has no FP16 flag: FP16 comes from the graph
    if precision != "int8":
        return Prepared(package.model_path)

    from tasks import calibration, quantize
    mode = spec.calibration.mode
    if mode == "calibrator" and not compat.calibrator_available(caps):
        raise ModelError(f"calibration.mode 'calibrator' needs TensorRT's implicit INT8 calibrator, which TensorRT "
                         f"{tensorrt} no longer has.", fix="Use calibration.mode: qdq (explicit quantisation).")
    folder = package.data_dir(spec.calibration.data)
    # Here, not only in the limited child: the default chain starts with int8, so a package without
    # calibration data is the common case, and starting a process to find no files cost 2 s or more.
    calibration.calibration_files(folder, spec.calibration)
    # Calibration and quantisation run under spec.limits (tasks/limits.py): huge data or a model that
    # never finishes fails this precision with a ModelError instead of hanging the worker.
    data = run_limited("calibration", calibration.load_calibration_data, folder, spec,
                       calibration.inputs_from_onnx(package.model_path), profiles=profiles, limits=spec.limits)
    record = {"mode": mode, "method": spec.calibration.method, "data_sha256": data.sha256, "samples": data.samples,
              "synthetic": data.synthetic, "synthetic_calibration": data.synthetic}
    if data.synthetic:
        record["note"] = data.note
    if mode == "calibrator":
        batch_size = calibration.calibration_batch_size(spec, profiles)  # must be the profile's opt batch
        batches = run_limited("calibration", calibration.calibration_batches, data, batch_size,
                              Path(workdir) / "calib-batches", profiles=profiles, limits=spec.limits)
        from tasks.engine import calibrator_cache

        cache_in, key = calibrator_cache(storage, name=package.name, model_sha=package.weights_sha256,
                                         data_sha=data.sha256, target=target_key,
                                         workdir=workdir)
        cache_out = Path(workdir) / "calibration.cache"
        record.update(cache_key=key, cache_reused=cache_in is not None, batches=len(batches))
        return Prepared(package.model_path, int8_mode="calibrator",
                        calibrator={"batches": [str(b) for b in batches], "cache_in": str(cache_in) if cache_in else None,
                                    "cache_out": str(cache_out), "cache_key": key},
                        record=record)
    key = quantize.qdq_cache_key(package.name, package.weights_sha256, data.sha256, spec, tensorrt=tensorrt)
    qdq_path = Path(workdir) / "model.qdq.onnx"
    reused = quantize.fetch_cached_qdq(storage, key, qdq_path)
    if not reused:
        result = run_limited("quantisation", quantize.qdq_model_from_calibration, package.model_path, data, spec,
                             qdq_path, tensorrt=tensorrt, limits=spec.limits)
        quantize.store_cached_qdq(storage, key, qdq_path, result)
        record.update(backend=result.backend, qdq_nodes=result.qdq_nodes, excluded=result.excluded_nodes)
    problems = quantize.check_qdq_structure(qdq_path)
    if problems:
        raise ModelError("the Q/DQ model would be rejected or mis-built by TensorRT: " + "; ".join(problems),
                         fix="Report this with the model; meanwhile use calibration.mode: calibrator on TensorRT <= 10.")
    record.update(qdq_key=key, qdq_reused=reused)
    high = compat.int8_qdq_graph_precision(caps, spec.calibration.high_precision)
    record["high_precision"] = high
    if high == "fp16":  # strongly typed INT8: the unquantised layers run in FP16 only if the graph says so
        from tasks.fp16 import fp16_qdq_graph_from_qdq

        out = fp16_qdq_graph_from_qdq(qdq_path, Path(workdir) / "model.qdq.fp16.onnx",
                                      op_block_list=spec.fp16.keep_fp32_op_types, node_block_list=spec.fp16.keep_fp32_nodes)
        record["fp16"] = out.to_record()
        return Prepared(out.path, int8_mode="qdq", graph_precision="fp16", record=record)
    return Prepared(qdq_path, int8_mode="qdq", record=record)

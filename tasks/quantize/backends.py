"""Quantisation backends: onnxruntime.quantization and NVIDIA ModelOpt, chosen by compat.qdq_backend."""
from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import numpy as np
import onnx

from tasks.calibration import CalibrationData, CalibrationReader, inputs_from_onnx
from tasks.cpu_threads import calibration_sessions
from tasks.errors import InfraError, ModelError
from tasks.gpu.compat import Caps, caps_for_version, modelopt_qdq_readable, qdq_backend
from tasks.spec import ModelSpec
from tasks.quantize.graph import ORT_DEFAULT, WEIGHTED_OPS, _CHUNK_SAMPLES
from tasks.quantize.placement import Placement

log = logging.getLogger("trtflow.quantize")

def _modelopt_available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def choose_backend(spec: ModelSpec, tensorrt: Union[str, Caps, None] = None) -> str:
    """``onnxruntime`` or ``modelopt`` as ``calibration.backend`` says (the policy: compat.qdq_backend).

    auto: ModelOpt when importable, except for a target (``tensorrt``: its version or Caps, when
    known) whose parser cannot read ModelOpt's opset >= 19 / IR 10 graphs (TensorRT 8.6).

    Raises:
        InfraError: the spec asks for ModelOpt and this worker does not have it (not retried).
    """
    wanted = spec.calibration.backend
    caps = tensorrt if isinstance(tensorrt, Caps) or tensorrt is None else caps_for_version(str(tensorrt))
    # import ModelOpt (slow) only where the answer depends on it
    installed = (wanted == "modelopt" or (wanted == "auto" and modelopt_qdq_readable(caps))) and _modelopt_available()
    chosen = qdq_backend(caps, wanted, installed)
    if chosen == "modelopt" and not installed:
        raise InfraError("calibration.backend is 'modelopt', but NVIDIA ModelOpt is not installed on this worker.",
                         fix="pip install 'trtflow[modelopt]' on the worker, or set calibration.backend: auto.",
                         retriable=False)
    if chosen == "modelopt" and not modelopt_qdq_readable(caps):
        log.warning("calibration.backend is modelopt, whose opset-19 Q/DQ graphs TensorRT %s may not read", caps.version)
    return chosen


def _ort_batch(model: onnx.ModelProto, data: CalibrationData) -> Tuple[int, bool]:
    """(batch size, pad) for onnxruntime's calibration runs: a static batch dim fixes it."""
    static = [i.shape[0] for i in inputs_from_onnx(model) if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0]
    if static:
        return int(static[0]), True
    return max(1, min(16, data.samples)), False


def _stride(batches: int, batch: int, chunk_samples: int = _CHUNK_SAMPLES) -> int:
    """Batches per collect_data call: the largest divisor of ``batches`` within ``chunk_samples``."""
    limit = max(1, chunk_samples // batch)
    return max(d for d in range(1, min(limit, batches) + 1) if batches % d == 0)


# Samples whose activations onnxruntime's histogram calibrators (entropy, percentile) hold at once.
# quantize_static collects in strides of CalibStridedMinMax batches for every method, and the
# histogram collector merges across strides; at min-max's 64 samples, ConvNeXt-T at 224x224 ran out
# of the stage's 16 GiB (limits.cpu_memory_mib) in a BFCArena allocation (histograms copy each tensor).
_HISTOGRAM_CHUNK_SAMPLES = 8


_OUT_OF_MEMORY = re.compile(r"Failed to allocate memory|bad_alloc|out of memory", re.I)


def _quantize_onnxruntime(model_path: Path, data: CalibrationData, spec: ModelSpec, placement: Placement,
                          out_path: Path, workdir: Path, style: str = "tensorrt") -> Dict[str, dict]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(model_path), load_external_data=False)
    batch, pad = _ort_batch(model, data)
    reader = CalibrationReader(data, batch_size=batch, pad=pad)
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[spec.calibration.method]
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "AddQDQPairToWeight": True,
        "DedicatedQDQPair": False,
        "MatMulConstBOnly": True,
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS) + ["Add"],
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1, "MatMul": -1},
        "CalibStridedMinMax": _stride(len(reader), batch, _CHUNK_SAMPLES if spec.calibration.method == "minmax"
                                      else _HISTOGRAM_CHUNK_SAMPLES),
        "CalibPercentile": spec.calibration.percentile,
    }
    kwargs: Dict[str, Any] = dict(
        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(WEIGHTED_OPS) + ["Add"], per_channel=True,
        reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        nodes_to_quantize=placement.nodes_to_quantize, nodes_to_exclude=placement.excluded,
        calibrate_method=method, extra_options=extra,
        use_external_data_format=any(t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
                                     for t in model.graph.initializer))
    if style == ORT_DEFAULT:
        # onnxruntime's own placement (every op it knows, inputs and outputs; INT8 weight initialisers),
        # with only what TensorRT needs to parse it at all: float biases, symmetric activations.
        kwargs.update(op_types_to_quantize=None, nodes_to_quantize=None)
        extra = {k: extra[k] for k in ("ActivationSymmetric", "WeightSymmetric", "QuantizeBias", "CalibStridedMinMax",
                                       "CalibPercentile")}
        kwargs["extra_options"] = extra
    params = inspect.signature(quantize_static).parameters
    if "calibration_providers" in params:
        kwargs["calibration_providers"] = ["CPUExecutionProvider"]
    cache = workdir / "ranges.json"
    if "calibration_cache_path" in params:
        kwargs["calibration_cache_path"] = str(cache)
    chatter = io.StringIO()
    try:
        # onnxruntime's calibrators print progress to stdout; keep it in the log instead
        with contextlib.redirect_stdout(chatter), calibration_sessions():
            quantize_static(str(model_path), str(out_path), reader, **kwargs)
    except MemoryError as err:
        raise InfraError(f"onnxruntime ran out of memory calibrating the model: {err}",
                         fix="Run on a worker with more memory or lower calibration.max_samples.") from err
    except Exception as err:  # noqa: BLE001 - onnxruntime raises ValueError/RuntimeError/its own Fail types
        if _OUT_OF_MEMORY.search(str(err)):
            # the stage's own address-space limit, most often: the same again would fail the same way
            raise ModelError(f"onnxruntime ran out of memory calibrating the model with the {spec.calibration.method} "
                             f"method (this stage may use limits.cpu_memory_mib = {spec.limits.cpu_memory_mib} MiB): "
                             f"{type(err).__name__}: {str(err)[:300]}",
                             fix="Raise limits.cpu_memory_mib in trtflow.yaml (the worker needs that much memory), "
                                 "or lower calibration.max_samples.") from err
        raise ModelError(f"onnxruntime could not calibrate and quantise the model with the {spec.calibration.method} "
                         f"method: {type(err).__name__}: {err}",
                         fix="Try calibration.method minmax (the percentile histograms fail on constant tensors), "
                             "exclude the node named, or use calibration.mode: calibrator on TensorRT <= 10.") from err
    finally:
        if chatter.getvalue().strip():
            log.debug("onnxruntime.quantization: %s", chatter.getvalue().strip())
    ranges: Dict[str, dict] = {}
    if cache.exists():
        try:
            from onnxruntime.quantization.calibrate import load_tensors_data

            for name, td in load_tensors_data(cache).data.items():
                lo, hi = td.range_value
                ranges[name] = {"min": float(np.min(lo)), "max": float(np.max(hi))}
        except Exception as err:  # noqa: BLE001 - the ranges are a report, not needed for the model
            log.warning("could not read onnxruntime's calibration ranges: %s", err)
    return ranges


def _quantize_modelopt(model_path: Path, data: CalibrationData, spec: ModelSpec, placement: Placement,
                       out_path: Path, workdir: Path) -> Dict[str, dict]:
    """NVIDIA ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``) with its own TensorRT placement.

    Keyword arguments are filtered by the installed version's signature (the API grew over releases).
    Non-quantised layers stay FP32 here (``high_precision_dtype="fp32"``), so that one cached Q/DQ
    graph serves every target: 8.6 and weakly typed 10.x run them in FP16 through the FP16 flag; for
    strongly typed builds (10+/11) precision_inputs turns the float part into FP16 afterwards
    (tasks/fp16.fp16_qdq_graph_from_qdq), which is what ``high_precision_dtype="fp16"`` does after
    calibrating in FP32, and the same for both backends.
    """
    from modelopt.onnx.quantization import quantize as mo_quantize

    method = {"minmax": "max", "entropy": "entropy"}.get(spec.calibration.method)
    if method is None:
        raise ModelError(f"ModelOpt has no {spec.calibration.method!r} calibration for INT8.",
                         fix="Use calibration.method minmax or entropy, or calibration.backend: onnxruntime.")
    wanted = dict(quantize_mode="int8", calibration_data=dict(data.arrays), calibration_method=method,
                  calibration_eps=["cpu"],
                  # ModelOpt reads these as regular expressions: anchor and escape the exact names
                  nodes_to_exclude=[f"^{re.escape(n)}$" for n in placement.excluded] or None,
                  op_types_to_exclude=list(spec.calibration.exclude_op_types) or None,
                  output_path=str(out_path), high_precision_dtype="fp32", log_level="WARNING")
    params = inspect.signature(mo_quantize).parameters
    accepts_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in wanted.items() if k in params or accepts_any}
    mo_quantize(str(model_path), **kwargs)
    if not out_path.exists():
        raise InfraError(f"ModelOpt wrote no model at {out_path}.", fix="Check the ModelOpt version and its log.")
    return {}

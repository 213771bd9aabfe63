"""The stage: calibrate, place Q/DQ, restore versions TensorRT reads, write statistics."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import onnx

from tasks.calibration import CalibrationData, inputs_from_onnx
from tasks.errors import ModelError
from tasks.gpu.compat import PORTABLE_MAX_IR, Caps
from tasks.spec import ModelSpec
from tasks.quantize.graph import MIN_IR_FOR_OPSET, MIN_OPSET, ORT_DEFAULT, PLACEMENT, _opset, has_qdq
from tasks.quantize.result import QuantizeResult, quantize_recipe, stats_path_for
from tasks.quantize.placement import Placement, _keep_float, plan_placement
from tasks.quantize.lint import assert_qdq_structure, qdq_summary
from tasks.quantize.backends import _quantize_modelopt, _quantize_onnxruntime, choose_backend

log = logging.getLogger("trtflow.quantize")

def _explicit_kernel_shapes(model: onnx.ModelProto) -> bool:
    """Give every Conv/ConvTranspose a ``kernel_shape`` attribute taken from its weight.

    ONNX makes the attribute optional, but once Q/DQ puts the weight behind a DequantizeLinear,
    TensorRT 8.6's parser takes the kernel size from the attribute alone and rejects the node
    ("The input tensor shape misaligns with the input kernel shape"; measured on the H100).
    Returns whether anything changed.
    """
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    changed = False
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in weights \
                and not any(a.name == "kernel_shape" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("kernel_shape", weights[node.input[1]][2:]))
            changed = True
    return changed


@contextlib.contextmanager
def _current_folder(folder: Path) -> Iterator[None]:
    """``contextlib.chdir`` (Python 3.11), for tasks' Python 3.9 floor. Process-wide: the
    quantisation stage runs in a child interpreter of its own (tasks/limits.run_limited)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _prepare_model(model_path: Path, workdir: Path) -> Tuple[Path, onnx.ModelProto]:
    """The model as the quantiser should see it: opset >= 13 and shapes inferred where possible."""
    model = onnx.load(str(model_path))
    path = model_path
    if _opset(model) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as err:  # noqa: BLE001 - the converter raises several types
            raise ModelError(f"the model's opset {_opset(model)} is below {MIN_OPSET}, which per-channel INT8 needs, "
                             f"and converting it failed: {err}",
                             fix=f"Export the model with opset >= {MIN_OPSET} (17 suits TensorRT 8.6).") from None
        path = workdir / "model.opset13.onnx"
        onnx.save(model, str(path))
    if _explicit_kernel_shapes(model):
        path = workdir / "model.kernel-shapes.onnx"
        onnx.save(model, str(path))
    # Symbolic shape inference lets the quantiser see shapes through ops ONNX's own inference skips.
    # Graph optimisation stays off: it renames and fuses nodes, which would break exclude_nodes.
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = workdir / "model.pre.onnx"
        # where inference stays incomplete, onnxruntime saves the partial model with its weights as
        # external data into the current folder (sym_shape_infer_temp.onnx + <uuid>.data): a worker's
        # folder would collect a copy of every such model, so it runs inside the stage's workdir
        with _current_folder(workdir):
            quant_pre_process(str(path), str(pre), skip_optimization=True)
        return pre, onnx.load(str(pre))
    except Exception as err:  # noqa: BLE001 - pre-processing is an optional improvement
        log.warning("quantisation pre-processing skipped: %s", err)
        return path, model


def _use_existing_qdq(model_path: Path, out_path: Path, data: CalibrationData, recipe: str,
                      started: float) -> QuantizeResult:
    """A model that already holds Q/DQ nodes (quantisation-aware training), copied after the check."""
    shutil.copyfile(model_path, out_path)
    assert_qdq_structure(out_path)
    counts, quantized, stats = qdq_summary(out_path)
    result = QuantizeResult(str(out_path), "existing", "existing", "existing", counts, quantized, [], [],
                            data.sha256, data.synthetic, "the model already held Q/DQ nodes; used as they are",
                            None, time.monotonic() - started, recipe)
    _write_stats(result, stats, {})
    return result


def _write_qdq_model(model_path: Path, original: onnx.ModelProto, data: CalibrationData, spec: ModelSpec,
                     out_path: Path, chosen: str, style: str) -> Tuple[Placement, Dict[str, dict]]:
    """Place, calibrate with backend ``chosen`` and save the Q/DQ model; returns the placement and
    the calibrated ranges."""
    with tempfile.TemporaryDirectory(prefix="trtflow-qdq-") as tmp:
        work = Path(tmp)
        prepared_path, prepared = _prepare_model(model_path, work)
        plan = plan_placement(prepared, spec.calibration.exclude_nodes,
                              spec.calibration.exclude_op_types)
        if not plan.weighted:
            raise ModelError("the model has no Conv, ConvTranspose, Gemm or MatMul with constant weights left to "
                             "quantise, so INT8 cannot speed it up.",
                             fix="Drop int8 from precisions (or exclude fewer nodes).")
        raw = work / "model.qdq.onnx"
        if chosen == "modelopt":
            ranges = _quantize_modelopt(prepared_path, data, spec, plan, raw, work)
        else:
            ranges = _quantize_onnxruntime(prepared_path, data, spec, plan, raw, work, style=style)
        model = onnx.load(str(raw))
        if style == PLACEMENT:
            _keep_float(model, plan)
        _restore_versions(model, original)
        model.metadata_props.extend([
            onnx.StringStringEntryProto(key="trtflow.qdq.placement", value=style),
            onnx.StringStringEntryProto(key="trtflow.qdq.method", value=spec.calibration.method),
            onnx.StringStringEntryProto(key="trtflow.calibration.sha256", value=data.sha256)])
        assert_qdq_structure(model)
        large = model.ByteSize() > 1_800_000_000
        onnx.save(model, str(out_path), save_as_external_data=large,
                  location=out_path.name + ".data" if large else None)
    return plan, ranges


def qdq_model_from_calibration(model_path: Union[str, Path], data: CalibrationData, spec: ModelSpec,
                               out_path: Union[str, Path], backend: Optional[str] = None, *,
                               placement: str = "tensorrt", tensorrt: Union[str, Caps, None] = None,
                               model: Optional[onnx.ModelProto] = None) -> QuantizeResult:
    """Calibrate ``model_path`` on ``data`` and write a TensorRT-ready Q/DQ model to ``out_path``
    (calibration statistics beside it, see :func:`stats_path_for`).

    ``model``: ``model_path`` already loaded (without external data), so it is not parsed again.
    ``tensorrt``: the target TensorRT (version or Caps) when known; it steers ``calibration.backend: auto``
    (see :func:`choose_backend`). ``placement="onnxruntime-default"`` (onnxruntime backend only) makes the Q/DQ graph onnxruntime
    would make by itself (biases float, activations symmetric so that TensorRT parses it): for
    benchmarks that compare build time and speed with trtflow's placement, not for production.

    A model that already holds Q/DQ nodes (quantisation-aware training) is copied unchanged
    (``backend="existing"``) after the structure check.

    Raises:
        ModelError: calibration data that does not match the model's inputs, unknown exclude_nodes,
            nothing quantisable, or a result that fails :func:`check_qdq_structure`.
        InfraError: ``calibration.backend: modelopt`` without ModelOpt installed.
    """
    started = time.monotonic()
    model_path, out_path = Path(model_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    original = model if model is not None else onnx.load(str(model_path), load_external_data=False)
    names = [i.name for i in inputs_from_onnx(original)]
    if sorted(names) != sorted(data.arrays):
        raise ModelError(f"the calibration data feeds inputs {sorted(data.arrays)}, the model has {sorted(names)}.",
                         fix="Key calibration arrays by the model's input names.")
    recipe = quantize_recipe(spec, tensorrt)

    if has_qdq(original):
        return _use_existing_qdq(model_path, out_path, data, recipe, started)

    if placement not in ("tensorrt", ORT_DEFAULT):
        raise ValueError(f"placement must be 'tensorrt' or {ORT_DEFAULT!r}, not {placement!r}")
    chosen = "onnxruntime" if placement == ORT_DEFAULT else (backend or choose_backend(spec, tensorrt))
    style = PLACEMENT if placement == "tensorrt" else ORT_DEFAULT
    if chosen == "modelopt":
        style = "modelopt"
    plan, ranges = _write_qdq_model(model_path, original, data, spec, out_path, chosen, style)
    counts, quantized, stats = qdq_summary(out_path)
    if style == PLACEMENT:
        # nodes that merely share a quantised tensor (e.g. a Transpose beside a Conv) are not "quantised"
        quantized = [n for n in quantized if n in set(plan.nodes_to_quantize)]
    result = QuantizeResult(
        out_path=str(out_path), method=spec.calibration.method, backend=chosen,
        placement=style, qdq_nodes=counts, quantized_nodes=quantized, excluded_nodes=list(plan.excluded),
        residual_adds=sorted(plan.residual_adds) if style == PLACEMENT else [],
        data_sha256=data.sha256, synthetic=data.synthetic, note=data.note, seconds=round(time.monotonic() - started, 3),
        recipe=recipe)
    _write_stats(result, stats, ranges)
    log.info("Q/DQ model %s: %d quantised nodes, %s, %d excluded, %.1f s", out_path.name, len(quantized), counts,
             len(result.excluded_nodes), result.seconds)
    return result


def _restore_versions(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Keep an IR version every TensorRT parser reads (compat.PORTABLE_MAX_IR) wherever the opset allows it."""
    opset = _opset(model)
    if opset in MIN_IR_FOR_OPSET:
        model.ir_version = max(min(model.ir_version, PORTABLE_MAX_IR), MIN_IR_FOR_OPSET[opset])
    if model.ir_version > PORTABLE_MAX_IR:
        log.warning("the Q/DQ model has IR version %d (opset %d; the original had IR %d); TensorRT 8.6 reads IR <= %d",
                    model.ir_version, opset, original.ir_version, PORTABLE_MAX_IR)


def _write_stats(result: QuantizeResult, scales: Dict[str, dict], ranges: Dict[str, dict]) -> None:
    tensors = {}
    for name in sorted(set(scales) | set(ranges)):
        tensors[name] = {**ranges.get(name, {}), **scales.get(name, {})}
    path = stats_path_for(result.out_path)
    result.stats_path = str(path)  # before the dump: the stored record points at its statistics
    path.write_text(json.dumps({"result": result.to_dict(), "tensors": tensors}, indent=1, sort_keys=True))

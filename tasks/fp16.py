"""An FP16 ONNX graph for strongly typed TensorRT builds (TensorRT 11 has no FP16 builder flag).

Uses ``onnxruntime.transformers.float16.convert_float_to_float16`` (shipped with onnxruntime), which
converts float tensors and initialisers to float16, keeps ops that need float32 (its default block
list: TopK, NonMaxSuppression, Range, CumSum, ...) in float32 with Casts around them, and with
``keep_io_types`` leaves the model's inputs and outputs float32 so callers feed the same arrays.

Weights beyond float16's range are clamped to +-65504 and tiny ones flushed by the converter; the
counts are logged, since such a model may need to stay FP32.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import numpy_helper

from tasks.errors import ModelError

log = logging.getLogger("trtflow.fp16")

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-08
_LARGE = 1_800_000_000  # bytes: above this the model is written with external data (protobuf's 2 GB limit)


def _toposort(graph: onnx.GraphProto) -> None:
    """Order ``graph.node`` so every node follows its producers (the converter appends its Casts last)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: List[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            # inputs produced inside subgraphs (If/Loop bodies) reach outer names only; outer ones suffice here
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:
            missing = sorted({i for n in rest for i in n.input if i not in available})
            raise ModelError(f"the FP16 graph cannot be ordered: tensors {', '.join(missing[:5])} have no producer.",
                             fix="Check the original model with onnx.checker; it may be malformed.")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _range_report(model: onnx.ModelProto) -> Dict[str, int]:
    """How many float32 weights fall outside float16's range (clamped) or below its smallest step (flushed)."""
    over = under = 0
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        a = np.abs(numpy_helper.to_array(init))
        over += int((a > FP16_MAX).sum())
        under += int(((a > 0) & (a < FP16_MIN_POSITIVE)).sum())
    return {"clamped": over, "flushed": under}


def fp16_graph_from_onnx(model_path: Union[str, Path], out_path: Union[str, Path], keep_io_types: bool = True,
                         op_block_list: Optional[Sequence[str]] = None,
                         node_block_list: Optional[Sequence[str]] = None) -> Path:
    """Write an FP16 version of ``model_path`` to ``out_path`` and return ``out_path``.

    Args:
        keep_io_types: keep graph inputs and outputs float32 (Casts inside the graph).
        op_block_list: op types to keep in float32 (default: the converter's list).
        node_block_list: node names to keep in float32.

    Raises:
        ModelError: the model already holds Q/DQ nodes (convert before quantising, not after), or the
            conversion fails.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model_path, out_path = Path(model_path), Path(out_path)
    model = onnx.load(str(model_path))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ModelError("the model already holds Q/DQ nodes; an FP16 conversion would change their scales' type.",
                         fix="Build INT8 from the Q/DQ model as it is, or convert the float model before quantising.")
    report = _range_report(model)
    if report["clamped"] or report["flushed"]:
        log.warning("FP16 conversion: %d weights exceed +-%g and are clamped, %d are below %g and flush to zero",
                    report["clamped"], FP16_MAX, report["flushed"], FP16_MIN_POSITIVE)
    ir_version = model.ir_version
    large = model.ByteSize() > _LARGE
    try:
        converted = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=large,
                                             op_block_list=list(op_block_list) if op_block_list is not None else None,
                                             node_block_list=list(node_block_list) if node_block_list else None)
    except Exception as err:  # noqa: BLE001 - the converter raises assorted errors on odd graphs
        raise ModelError(f"converting the model to FP16 failed: {err}",
                         fix="Build FP16 with TensorRT's FP16 flag (TensorRT <= 10), or export an FP16 model.") from None
    _toposort(converted.graph)
    converted.ir_version = ir_version  # the converter adds no op that needs a newer IR; TensorRT 8.6 reads <= 8
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(out_path), save_as_external_data=large,
              location=out_path.name + ".data" if large else None)
    log.info("FP16 graph written to %s", out_path)
    return out_path

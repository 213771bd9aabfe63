"""Graph helpers and constants shared by placement, structure lint and the stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Union

import onnx


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PLACEMENT = "trt-weighted-inputs+residual-v2"  # part of the cache recipe: bump when placement changes
ORT_DEFAULT = "onnxruntime-default"  # onnxruntime's own placement, kept for benchmarks that compare the two
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute)
MIN_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8}  # oldest IR each opset allows; TensorRT 8.6 reads <= 8
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_CHUNK_SAMPLES = 64  # samples whose activations onnxruntime keeps at once during calibration

ModelLike = Union[onnx.ModelProto, str, Path]


def _load(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model))


def _constants(model: onnx.ModelProto) -> set:
    names = {i.name for i in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return names


def _producers(model: onnx.ModelProto) -> Dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model: onnx.ModelProto) -> Dict[str, List[onnx.NodeProto]]:
    out: Dict[str, List[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def _weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """The per-channel axis TensorRT expects for the weight (input 1) of a weighted op."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    return rank - 1  # MatMul: [.., K, N], channels are N

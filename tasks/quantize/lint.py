"""The structure lint: a Q/DQ graph TensorRT would reject or mis-build is caught before the GPU build."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import onnx
from onnx import numpy_helper

from tasks.errors import ModelError
from tasks.quantize.graph import (ModelLike, QDQ_OPS, WEIGHTED_OPS, _attr, _constants, _consumers, _load,
                                  _producers, _weight_axis)

def _init_array(model: onnx.ModelProto, name: str) -> Optional[np.ndarray]:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            value = _attr(n, "value")
            return numpy_helper.to_array(value) if value is not None else None
    return None


def check_qdq_structure(model: ModelLike) -> List[str]:
    """Problems that make TensorRT reject or mis-build a Q/DQ model; empty when it is fine.

    Checks: no quantised bias (an int32 tensor into a DequantizeLinear), zero points present, int8
    and all zero (symmetric), positive scales, per-tensor activations, per-channel weight axes that
    match the consuming op (Conv 0, ConvTranspose 1, Gemm 0/1 by ``transB``, MatMul last).
    """
    m = _load(model)
    problems: List[str] = []
    consumers = _consumers(m)
    producers = _producers(m)
    consts = _constants(m)

    def where(node: onnx.NodeProto) -> str:
        return f"{node.op_type} {node.name or node.output[0]!r}"

    for node in m.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        data = _init_array(m, node.input[0]) if node.input[0] in consts else None
        if node.op_type == "DequantizeLinear" and data is not None and data.dtype == np.int32:
            users = ", ".join(f"{c.op_type} {c.name!r}" for c in consumers.get(node.output[0], []))
            problems.append(f"{where(node)} dequantises an int32 tensor (a quantised bias) feeding {users or 'nothing'}: "
                            f"TensorRT accepts only float biases")
            continue
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{where(node)} has no zero point (ONNX then means uint8; TensorRT needs an int8 zero point of 0)")
        else:
            zp = _init_array(m, node.input[2])
            if zp is None:
                problems.append(f"{where(node)} has a zero point that is not a constant")
            else:
                if zp.dtype != np.int8:
                    problems.append(f"{where(node)} uses {zp.dtype.name} zero points: TensorRT needs int8")
                if np.any(zp != 0):
                    problems.append(f"{where(node)} is asymmetric (zero point {zp.ravel()[:4].tolist()}): TensorRT "
                                    f"needs zero points of 0")
        scale = _init_array(m, node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            problems.append(f"{where(node)} has a scale that is not a constant")
            continue
        if np.any(~(scale > 0)):
            problems.append(f"{where(node)} has non-positive scales")
        if node.op_type != "DequantizeLinear":
            continue
        # per-channel axes: where does this DQ's output go?
        source = node.input[0]
        q = producers.get(source)
        weight = source if source in consts else (q.input[0] if q is not None and q.op_type == "QuantizeLinear"
                                                  and q.input[0] in consts else None)
        for user in consumers.get(node.output[0], []):
            is_weight = (user.op_type in WEIGHTED_OPS and len(user.input) > 1 and user.input[1] == node.output[0]
                         and weight is not None)
            if scale.size > 1 and not is_weight:
                problems.append(f"{where(node)} quantises an activation per-channel ({scale.size} scales) for "
                                f"{user.op_type} {user.name!r}: TensorRT supports per-tensor activations only")
            if is_weight and scale.size > 1:
                w = _init_array(m, weight)
                rank = w.ndim if w is not None else 0
                axis = _attr(node, "axis", 1)
                axis = axis + rank if axis < 0 else axis
                want = _weight_axis(user, rank)
                if axis != want:
                    problems.append(f"{where(node)} quantises the weight of {user.op_type} {user.name!r} along axis "
                                    f"{axis}; its output channels are axis {want}")
                elif w is not None and w.shape[axis] != scale.size:
                    problems.append(f"{where(node)} has {scale.size} scales for {w.shape[axis]} channels")
    for node in m.graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias_src = producers.get(node.input[2])
            if bias_src is not None and bias_src.op_type == "DequantizeLinear":
                msg = f"{node.op_type} {node.name!r} takes its bias through {where(bias_src)}: TensorRT needs a float bias"
                if not any(msg.split(" takes")[0] in p for p in problems):
                    problems.append(msg)
    return problems


def assert_qdq_structure(model: ModelLike) -> None:
    """Raise ModelError listing every problem ``check_qdq_structure`` finds."""
    problems = check_qdq_structure(model)
    if problems:
        raise ModelError("the Q/DQ model would be rejected or mis-built by TensorRT: " + "; ".join(problems),
                         fix="Quantise with trtflow's defaults (biases float, symmetric INT8, per-channel weights) "
                             "or fix the Q/DQ nodes named.", details=problems)


def qdq_summary(model: ModelLike) -> Tuple[Dict[str, int], List[str], Dict[str, dict]]:
    """(Q/DQ node counts, names of the non-Q/DQ nodes that read a dequantised input, activation scale per tensor)."""
    m = _load(model)
    producers = _producers(m)
    consts = _constants(m)
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0}
    for n in m.graph.node:
        if n.op_type in counts:
            counts[n.op_type] += 1
    quantized = [n.name for n in m.graph.node if n.op_type not in QDQ_OPS
                 and any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)]
    stats: Dict[str, dict] = {}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            scale = _init_array(m, n.input[1])
            if scale is not None and scale.size == 1:
                s = float(scale.ravel()[0])
                stats[n.input[0]] = {"scale": s, "amax": s * 127.0}
    return counts, quantized, stats

"""Where Q/DQ pairs go (the package docstring says why): TensorRT's placement rules."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import onnx

from tasks.errors import ModelError
from tasks.quantize.graph import QDQ_OPS, WEIGHTED_OPS, _constants, _consumers, _producers

log = logging.getLogger("trtflow.quantize")

@dataclass
class Placement:
    """Which nodes get Q/DQ on their inputs, which residual Add inputs are quantised, what stays float."""

    weighted: List[str] = field(default_factory=list)
    residual_adds: Dict[str, int] = field(default_factory=dict)  # Add name -> index of the input TensorRT fuses (kept float)
    excluded: List[str] = field(default_factory=list)

    @property
    def nodes_to_quantize(self) -> List[str]:
        return self.weighted + list(self.residual_adds)


def plan_placement(model: onnx.ModelProto, exclude_nodes: Sequence[str] = (),
                   exclude_op_types: Sequence[str] = ()) -> Placement:
    """The TensorRT-oriented Q/DQ placement of the module docstring, for ``model``.

    Raises:
        ModelError: ``exclude_nodes`` names nodes the model does not have.
    """
    names = [n.name for n in model.graph.node]
    unknown = sorted(set(exclude_nodes) - set(names))
    if unknown:
        raise ModelError(f"calibration.exclude_nodes names {', '.join(unknown)}, which the model has no nodes called.",
                         fix="Use node names from the ONNX graph (e.g. as Netron shows them).")
    types_present = {n.op_type for n in model.graph.node}
    for t in sorted(set(exclude_op_types) - types_present):
        log.warning("calibration.exclude_op_types: the model has no %s nodes", t)
    excluded = [n.name for n in model.graph.node if n.name in set(exclude_nodes) or n.op_type in set(exclude_op_types)]
    excluded_set = set(excluded)
    consts = _constants(model)
    producers = _producers(model)
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}

    weighted = [n.name for n in model.graph.node
                if n.op_type in WEIGHTED_OPS and n.name not in excluded_set and len(n.input) > 1
                and n.input[1] in consts and n.input[0] not in consts]
    weighted_set = set(weighted)

    depth: Dict[str, int] = {}
    for n in model.graph.node:  # ONNX graphs are topologically sorted
        depth[n.name] = 1 + max((depth.get(producers[i].name, 0) for i in n.input if i in producers), default=0)

    def silu_input(node: Optional[onnx.NodeProto]) -> Optional[str]:
        """x when ``node`` is the Mul of SiLU (x * Sigmoid(x)) and x feeds nothing else: TensorRT fuses
        Conv + Sigmoid + Mul into one kernel, so the block's residual Add fuses like Conv -> Add."""
        if node is None or node.op_type != "Mul" or len(node.input) != 2:
            return None
        for x, gate in (node.input, node.input[::-1]):
            sig = producers.get(gate)
            if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x \
                    and {c.name for c in consumers.get(x, [])} == {sig.name, node.name}:
                return x
        return None

    def fused_conv(tensor: str) -> Optional[onnx.NodeProto]:
        """The quantised Conv TensorRT would fuse an Add into, when ``tensor`` is its only use."""
        node = producers.get(tensor)
        if node is not None and node.op_type == "BatchNormalization" and len(consumers.get(tensor, [])) == 1:
            tensor, node = node.input[0], producers.get(node.input[0])  # Conv -> BN -> Add fuses as well
        x = silu_input(node) if len(consumers.get(tensor, [])) == 1 else None
        if x is not None:  # Conv [-> BN] -> SiLU -> Add (YOLO bottlenecks)
            node = producers.get(x)
            if node is not None and node.op_type == "BatchNormalization":
                x, node = node.input[0], producers.get(node.input[0])
            if node is None or node.op_type != "Conv" or node.name not in weighted_set:
                return None
            return node
        if node is None or node.op_type != "Conv" or node.name not in weighted_set:
            return None
        if len(consumers.get(tensor, [])) != 1 or tensor in outputs:
            return None
        return node

    residual: Dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type != "Add" or len(n.input) != 2 or n.name in excluded_set:
            continue
        if any(i in consts or not i for i in n.input):
            continue  # a bias or constant offset, not a skip connection
        convs = [fused_conv(i) for i in n.input]
        if convs[0] is None and convs[1] is None:
            continue
        if convs[0] is not None and convs[1] is not None:
            fused = 0 if depth[convs[0].name] >= depth[convs[1].name] else 1
        else:
            fused = 0 if convs[0] is not None else 1
        residual[n.name] = fused
    return Placement(weighted, residual, excluded)


def _remove_unused(model: onnx.ModelProto) -> None:
    """Drop Q/DQ nodes whose outputs nobody reads, then initialisers nobody reads."""
    outputs = {o.name for o in model.graph.output}
    changed = True
    while changed:
        changed = False
        used = {i for n in model.graph.node for i in n.input} | outputs
        for n in list(model.graph.node):
            if n.op_type in QDQ_OPS and not any(o in used for o in n.output):
                model.graph.node.remove(n)
                changed = True
    used = {i for n in model.graph.node for i in n.input} | outputs
    for init in list(model.graph.initializer):
        if init.name not in used:
            model.graph.initializer.remove(init)


def _float_input(model: onnx.ModelProto, node: onnx.NodeProto, index: int) -> bool:
    """Feed ``node``'s input ``index`` the float tensor behind a Q->DQ pair; True when one was bypassed."""
    producers = _producers(model)
    dq = producers.get(node.input[index])
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    q = producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return False
    node.input[index] = q.input[0]
    return True


def _keep_float(model: onnx.ModelProto, placement: Placement) -> None:
    by_name = {n.name: n for n in model.graph.node}
    for add, fused in placement.residual_adds.items():
        if add in by_name:
            _float_input(model, by_name[add], fused)
    for name in placement.excluded:
        node = by_name.get(name)
        if node is not None:
            for i in range(len(node.input)):
                if node.input[i]:
                    _float_input(model, node, i)
    _remove_unused(model)

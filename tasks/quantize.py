"""Explicit INT8: a Q/DQ ONNX model that TensorRT accepts, builds quickly and runs fast.

``qdq_model_from_calibration`` calibrates the model on the package's calibration data and inserts
QuantizeLinear/DequantizeLinear pairs with onnxruntime.quantization (or NVIDIA ModelOpt's ONNX PTQ
when it is installed and the spec allows). The same graph serves every TensorRT version: 8.6 builds
it with the INT8 (+FP16) flags, 10 and 11 build it strongly typed. ``check_qdq_structure`` is the
guard before the GPU build; ``QdqCache`` keeps Q/DQ models in the bucket so each is made once.

Placement, and why (TensorRT developer guide, "Q/DQ Layer-Placement Recommendations"; NVIDIA
ModelOpt's ONNX INT8 defaults; onnxruntime's QDQ quantiser source):

1. Quantise the inputs of weighted ops only: Conv, ConvTranspose, Gemm and MatMul with a constant
   weight. Activations per-tensor, weights per-channel (Conv axis 0, ConvTranspose 1, Gemm 0 with
   ``transB=1`` else 1, MatMul the last axis), all symmetric INT8 with zero points 0: TensorRT
   rejects non-zero zero points and uint8.
2. No Q/DQ on the outputs of weighted ops, nor around ReLU/Clip, pooling, Flatten/Reshape, Concat,
   Softmax. onnxruntime's default op list quantises the inputs and outputs of every op it knows, and
   with symmetric activations it keeps each Relu with a Q/DQ pair on both sides. On ResNet-50 that
   gives Conv -> Q/DQ -> Relu -> Q/DQ -> Conv, an Add with three Q/DQ pairs, pairs around MaxPool,
   GlobalAveragePool and Flatten. In explicit mode TensorRT may not drop a Q/DQ pair that changes the
   arithmetic, so every extra pair either splits a fusion it would otherwise make (Conv+ReLU,
   Conv+Add+ReLU: "do not simulate ReLU fusion", "be conservative when adding Q/DQ") or adds layers
   and INT8<->float reformats, each of which the builder times for every tactic and format. That is
   our reading of the measured >9 min Q/DQ ResNet-50 build on TensorRT 8.6 against ~3 min implicit
   (a hypothesis until measured: bench/qdq_resnet.py and bench/int8_resnet.py build both placements
   and print build times and throughput). On the bars CNN of tests/trained.py onnxruntime's default
   placement has 11 Q + 15 DQ nodes (Q/DQ between every Conv and its Relu, around pooling, Flatten
   and the model output) against 8 + 8 here; on tests/resnet50.py, 123 + 177 against 108 + 108.
3. Weights stay FP32 with a Q->DQ pair on them (``AddQDQPairToWeight``) instead of onnxruntime's
   default INT8 initialiser -> DQ: TensorRT documents that Q/DQ weights "must be specified using a
   floating-point data type" and quantises them itself with the Q layer's scale (ModelOpt does the same).
4. Biases stay float (``QuantizeBias: False``): TensorRT 8.6 rejects an int32 bias feeding a
   DequantizeLinear ("only activation types allowed as input"; measured on the H100).
5. Residual Adds: TensorRT fuses a Conv with the element-wise Add that follows it (and the ReLU
   after), and the fused kernel is INT8-in/INT8-out only when the Add's *other* (residual) input is
   quantised ("quantize the residual input in skip-connections"). We quantise exactly that input and
   leave the Conv-side input float. When both inputs come from Convs (ResNet's projection shortcut)
   the deeper branch is the one TensorRT fuses, so the shorter one is quantised (as ModelOpt does).
6. One shared Q/DQ pair per tensor (``DedicatedQDQPair: False``): a block input that feeds a Conv
   and a residual Add gets one scale, which the residual fusion needs.
7. Activation x activation MatMuls (attention) stay float (``MatMulConstBOnly``): quantising them
   well needs model-specific care (ModelOpt's MHA handling), not a default.
8. Nodes named in ``calibration.exclude_nodes`` or of a type in ``exclude_op_types`` keep float
   inputs even where a shared pair would have fed them quantised values.

onnxruntime's calibration runs with ``CalibStridedMinMax`` chunks so that the activations kept in
memory stay bounded (all of them for all samples would not fit for ResNet-sized models).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper

from tasks.calibration import CalibrationData, CalibrationReader, inputs_from_onnx
from tasks.errors import InfraError, ModelError
from tasks.gpu.compat import Caps, caps_for_version, modelopt_qdq_readable, qdq_backend
from tasks.package import qdq_key
from tasks.spec import ModelSpec
from tasks.storage import Storage

log = logging.getLogger("trtflow.quantize")

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PLACEMENT = "trt-weighted-inputs+residual-v2"  # part of the cache recipe: bump when placement changes
ORT_DEFAULT = "onnxruntime-default"  # onnxruntime's own placement, kept for benchmarks that compare the two
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute)
MIN_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8}  # oldest IR each opset allows; TensorRT 8.6 reads <= 8
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
_CHUNK_SAMPLES = 64  # samples whose activations onnxruntime keeps at once during calibration

ModelLike = Union[onnx.ModelProto, str, Path]


# ---- result ---------------------------------------------------------------------------------------
@dataclass
class QuantizeResult:
    """What ``qdq_model_from_calibration`` made (a small JSON-able record; the model is at ``out_path``)."""

    out_path: str
    method: str
    backend: str
    placement: str
    qdq_nodes: Dict[str, int]
    quantized_nodes: List[str]
    excluded_nodes: List[str]
    residual_adds: List[str]
    data_sha256: str
    synthetic: bool = False
    note: Optional[str] = None
    stats_path: Optional[str] = None
    seconds: float = 0.0
    recipe: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizeResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def stats_path_for(model_path: Union[str, Path]) -> Path:
    """Where the calibration statistics of a Q/DQ model lie: ``<model>.stats.json`` beside it."""
    p = Path(model_path)
    return p.with_name(p.name + ".stats.json")


def quantize_recipe(spec: ModelSpec, tensorrt: Optional[str] = None) -> str:
    """Hash of everything besides model and data that changes the Q/DQ model (part of its cache key),
    the backend as :func:`choose_backend` resolves it here (``auto`` differs between workers)."""
    c = spec.calibration
    relevant = {"placement": PLACEMENT, "method": c.method, "backend": choose_backend(spec, tensorrt),
                "exclude_nodes": sorted(c.exclude_nodes),
                "exclude_op_types": sorted(c.exclude_op_types),
                "percentile": c.percentile if c.method == "percentile" else None}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


# ---- graph helpers --------------------------------------------------------------------------------
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


# ---- placement ------------------------------------------------------------------------------------
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

    def fused_conv(tensor: str) -> Optional[onnx.NodeProto]:
        """The quantised Conv TensorRT would fuse an Add into, when ``tensor`` is its only use."""
        node = producers.get(tensor)
        if node is not None and node.op_type == "BatchNormalization" and len(consumers.get(tensor, [])) == 1:
            tensor, node = node.input[0], producers.get(node.input[0])  # Conv -> BN -> Add fuses as well
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


# ---- structure check ------------------------------------------------------------------------------
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


# ---- quantisation backends ------------------------------------------------------------------------
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


def _stride(batches: int, batch: int) -> int:
    limit = max(1, _CHUNK_SAMPLES // batch)
    return max(d for d in range(1, min(limit, batches) + 1) if batches % d == 0)


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
        "CalibStridedMinMax": _stride(len(reader), batch),
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
        with contextlib.redirect_stdout(chatter):
            quantize_static(str(model_path), str(out_path), reader, **kwargs)
    except MemoryError as err:
        raise InfraError(f"onnxruntime ran out of memory calibrating the model: {err}",
                         fix="Run on a worker with more memory or lower calibration.max_samples.") from err
    except Exception as err:  # noqa: BLE001 - onnxruntime raises ValueError/RuntimeError/its own Fail types
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
    Non-quantised layers stay FP32 (``high_precision_dtype="fp32"``) so that the graph builds on every
    TensorRT; the FP16 builder flag (or tasks/fp16.py) handles FP16.
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


# ---- the stage ------------------------------------------------------------------------------------
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
        quant_pre_process(str(path), str(pre), skip_optimization=True)
        return pre, onnx.load(str(pre))
    except Exception as err:  # noqa: BLE001 - pre-processing is an optional improvement
        log.warning("quantisation pre-processing skipped: %s", err)
        return path, model


def qdq_model_from_calibration(model_path: Union[str, Path], data: CalibrationData, spec: ModelSpec,
                               out_path: Union[str, Path], backend: Optional[str] = None, *,
                               placement: str = "tensorrt", tensorrt: Optional[str] = None) -> QuantizeResult:
    """Calibrate ``model_path`` on ``data`` and write a TensorRT-ready Q/DQ model to ``out_path``
    (calibration statistics beside it, see :func:`stats_path_for`).

    ``tensorrt``: the target TensorRT version when known; it steers ``calibration.backend: auto``
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
    original = onnx.load(str(model_path), load_external_data=False)
    names = [i.name for i in inputs_from_onnx(original)]
    if sorted(names) != sorted(data.arrays):
        raise ModelError(f"the calibration data feeds inputs {sorted(data.arrays)}, the model has {sorted(names)}.",
                         fix="Key calibration arrays by the model's input names.")
    recipe = quantize_recipe(spec, tensorrt)

    if has_qdq(original):
        shutil.copyfile(model_path, out_path)
        assert_qdq_structure(out_path)
        counts, quantized, stats = qdq_summary(out_path)
        result = QuantizeResult(str(out_path), "existing", "existing", "existing", counts, quantized, [], [],
                                data.sha256, data.synthetic, "the model already held Q/DQ nodes; used as they are",
                                None, time.monotonic() - started, recipe)
        _write_stats(result, stats, {})
        return result

    if placement not in ("tensorrt", ORT_DEFAULT):
        raise ValueError(f"placement must be 'tensorrt' or {ORT_DEFAULT!r}, not {placement!r}")
    chosen = "onnxruntime" if placement == ORT_DEFAULT else (backend or choose_backend(spec, tensorrt))
    style = PLACEMENT if placement == "tensorrt" else ORT_DEFAULT
    if chosen == "modelopt":
        style = "modelopt"
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
    """Keep an IR version TensorRT 8.6 can read (<= 8) wherever the opset allows it."""
    opset = _opset(model)
    if opset in MIN_IR_FOR_OPSET:
        model.ir_version = max(min(model.ir_version, 8), MIN_IR_FOR_OPSET[opset])
    if model.ir_version > 8:
        log.warning("the Q/DQ model has IR version %d (opset %d; the original had IR %d); TensorRT 8.6 reads IR <= 8",
                    model.ir_version, opset, original.ir_version)


def _write_stats(result: QuantizeResult, scales: Dict[str, dict], ranges: Dict[str, dict]) -> None:
    tensors = {}
    for name in sorted(set(scales) | set(ranges)):
        tensors[name] = {**ranges.get(name, {}), **scales.get(name, {})}
    path = stats_path_for(result.out_path)
    result.stats_path = str(path)  # before the dump: the stored record points at its statistics
    path.write_text(json.dumps({"result": result.to_dict(), "tensors": tensors}, indent=1, sort_keys=True))


# ---- bucket cache ---------------------------------------------------------------------------------
@dataclass
class QdqCache:
    """A Q/DQ model and its statistics in the bucket, keyed by model sha + data sha + method (+ recipe)."""

    storage: Storage
    key: str

    @property
    def stats_key(self) -> str:
        return self.key + ".stats.json"

    def get(self, dest: Union[str, Path]) -> Optional[QuantizeResult]:
        """Download the model to ``dest`` (statistics beside it); None when the bucket has no complete entry."""
        if self.storage.head(self.key) is None or self.storage.head(self.stats_key) is None:
            return None
        dest = Path(dest)
        self.storage.download(self.key, dest)
        if self.storage.head(self.key + ".data") is not None:
            self.storage.download(self.key + ".data", dest.with_name(dest.name + ".data"))
        stats = stats_path_for(dest)
        self.storage.download(self.stats_key, stats)
        record = json.loads(stats.read_text()).get("result", {})
        result = QuantizeResult.from_dict(record)
        result.out_path, result.stats_path = str(dest), str(stats)
        log.info("reusing Q/DQ model %s", self.storage.url(self.key))
        return result

    def put(self, result: QuantizeResult) -> str:
        """Upload the model (and external data) first and the statistics last: a reader that finds the
        statistics finds a complete entry."""
        path = Path(result.out_path)
        data = path.with_name(path.name + ".data")
        if data.exists():
            self.storage.upload(data, self.key + ".data")
        self.storage.upload(path, self.key, content_type="application/octet-stream")
        self.storage.upload(Path(result.stats_path or stats_path_for(path)), self.stats_key,
                            content_type="application/json")
        return self.storage.url(self.key)


def qdq_cache(storage: Storage, name: str, model_sha: str, data_sha: str, method: str,
              recipe: Optional[str] = None) -> QdqCache:
    """The cache entry of one Q/DQ model. Pass ``recipe`` (:func:`quantize_recipe`) so that a changed
    exclusion list or placement never reuses an older model; ``method`` alone keys by method only."""
    tag = f"{method}-{recipe}" if recipe else method
    return QdqCache(storage, qdq_key(name, model_sha, data_sha, tag))


def qdq_cache_key(name: str, model_sha: str, data_sha: str, spec: ModelSpec, tensorrt: Optional[str] = None) -> str:
    """``tasks.package.qdq_key`` with the method tagged by :func:`quantize_recipe`."""
    return qdq_key(name, model_sha, data_sha, f"{spec.calibration.method}-{quantize_recipe(spec, tensorrt)}")


def fetch_cached_qdq(storage: Storage, key: str, dest: Union[str, Path]) -> bool:
    """Download the cached Q/DQ model at ``key`` to ``dest``; False when there is none."""
    return QdqCache(storage, key).get(dest) is not None


def store_cached_qdq(storage: Storage, key: str, path: Union[str, Path], result: QuantizeResult) -> str:
    """Upload the Q/DQ model at ``path`` and its statistics under ``key``."""
    if Path(result.out_path) != Path(path):
        result = QuantizeResult.from_dict({**result.to_dict(), "out_path": str(path)})
    return QdqCache(storage, key).put(result)

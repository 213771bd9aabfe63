"""An FP16 ONNX graph for strongly typed TensorRT builds (TensorRT 11 has no FP16 builder flag), and
the Q/DQ graph over FP16 that a strongly typed INT8 build needs so its unquantised layers run in FP16.

Two converters, NVIDIA's first (the migration guide's replacement for BuilderFlag.FP16):
- ModelOpt AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``) when installed: it keeps
  nodes whose outputs or initialisers overflow FP16 in FP32 (data-driven), adds the Casts, keeps the
  I/O types with ``keep_io_types``.
- otherwise onnxruntime's ``convert_float_to_float16`` (shipped with onnxruntime), with a block
  list chosen for TensorRT (``TENSORRT_FP16_OP_BLOCK_LIST``) instead of its default, which keeps
  TopK, Range, CumSum, Min/Max and Upsample in FP32 (casts around them) for onnxruntime's CPU
  kernels' sake, not TensorRT's.

Either way the spec's ``fp16.keep_fp32_op_types`` / ``fp16.keep_fp32_nodes`` stay FP32 (the FP16
counterpart of ``calibration.exclude_*``), and the result (``Fp16Graph``) records what was done for
the manifest. Weights beyond float16's range are clamped to +-65504 and tiny ones flushed; the
counts are logged and recorded, since such a model may need to stay FP32.
"""
from __future__ import annotations

import inspect
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import numpy_helper

from tasks.errors import ModelError

log = logging.getLogger("trtflow.fp16")

FP16_MAX = 65504.0
FP16_MIN_POSITIVE = 5.96e-08
_LARGE = 1_800_000_000  # bytes: above this the model is written with external data (protobuf's 2 GB limit)
CONVERTERS = ("auto", "modelopt", "onnxruntime")
QDQ_FP16_MIN_OPSET = 19  # QuantizeLinear/DequantizeLinear take float16 scales from opset 19

# Ops kept FP32 by default, each for a reason that holds on TensorRT (unlike onnxruntime's default
# list, which blocks TopK/Range/CumSum/Min/Max/Upsample for its CPU kernels):
TENSORRT_FP16_OP_BLOCK_LIST = [
    # ai.onnx.ml operators: no TensorRT importer, and their attributes are float32 by definition
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
    "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
    "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier", "TreeEnsembleRegressor",
    "TreeEnsemble", "ZipMap",
    # box coordinates in pixels (up to thousands) lose whole pixels in FP16's 11-bit mantissa
    "NonMaxSuppression", "RoiAlign",
    # random generators' dtype attribute must match the tensor type the converter leaves it
    "RandomUniformLike", "RandomNormalLike",
]


@dataclass
class Fp16Graph:
    """What ``fp16_graph_from_onnx`` / ``fp16_qdq_graph_from_qdq`` wrote, for the manifest."""

    path: Path
    converter: str                      # "modelopt-autocast" | "onnxruntime"
    keep_io_types: bool
    keep_fp32_op_types: List[str] = field(default_factory=list)
    keep_fp32_nodes: List[str] = field(default_factory=list)
    clamped_weights: int = 0
    flushed_weights: int = 0
    qdq: bool = False                   # a Q/DQ graph whose unquantised part became FP16

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def to_record(self) -> Dict[str, Any]:
        record = asdict(self)
        record["path"] = self.path.name
        return record


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
    if over or under:
        log.warning("FP16 conversion: %d weights exceed +-%g and are clamped, %d are below %g and flush to zero",
                    over, FP16_MAX, under, FP16_MIN_POSITIVE)
    return {"clamped": over, "flushed": under}


def _modelopt_autocast() -> Any:
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return convert_to_mixed_precision


def _converter(wanted: str) -> str:
    if wanted not in CONVERTERS:
        raise ModelError(f"unknown FP16 converter {wanted!r}.", fix=f"Set fp16.converter to one of {', '.join(CONVERTERS)}.")
    if wanted == "onnxruntime":
        return "onnxruntime"
    if _modelopt_autocast() is not None:
        return "modelopt-autocast"
    if wanted == "modelopt":
        from tasks.errors import InfraError

        raise InfraError("fp16.converter is 'modelopt', but NVIDIA ModelOpt is not installed on this worker.",
                         fix="pip install 'trtflow[modelopt]' on the worker, or set fp16.converter: auto.", retriable=False)
    return "onnxruntime"


def _autocast(model_path: Path, keep_io_types: bool, op_types: List[str], nodes: List[str]) -> onnx.ModelProto:
    convert = _modelopt_autocast()
    wanted = dict(onnx_path=str(model_path), low_precision_type="fp16", keep_io_types=keep_io_types,
                  # AutoCast reads node names as regular expressions: anchor and escape the exact names
                  nodes_to_exclude=[f"^{re.escape(n)}$" for n in nodes] or None,
                  op_types_to_exclude=op_types or None)
    params = inspect.signature(convert).parameters  # the API grew over releases: pass what this one takes
    return convert(**{k: v for k, v in wanted.items() if k in params})


def _onnxruntime_fp16(model: onnx.ModelProto, keep_io_types: bool, op_types: List[str], nodes: List[str],
                      large: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=large,
                                         op_block_list=TENSORRT_FP16_OP_BLOCK_LIST + op_types,
                                         node_block_list=nodes or None)
    _toposort(converted.graph)  # the converter appends its Casts after their consumers
    return converted


def _check_names(model: onnx.ModelProto, nodes: Sequence[str]) -> None:
    unknown = sorted(set(nodes) - {n.name for n in model.graph.node})
    if unknown:
        raise ModelError(f"fp16.keep_fp32_nodes names {', '.join(unknown)}, which the model has no node called.",
                         fix="Use the ONNX node names (e.g. from Netron or onnx.load(...).graph.node).")


def fp16_graph_from_onnx(model_path: Union[str, Path], out_path: Union[str, Path], keep_io_types: bool = True,
                         op_block_list: Optional[Sequence[str]] = None,
                         node_block_list: Optional[Sequence[str]] = None, converter: str = "auto") -> Fp16Graph:
    """Write an FP16 version of ``model_path`` to ``out_path``.

    Args:
        keep_io_types: keep graph inputs and outputs float32 (Casts inside the graph).
        op_block_list: op types to keep in float32 (spec ``fp16.keep_fp32_op_types``), beside
            ``TENSORRT_FP16_OP_BLOCK_LIST`` (onnxruntime) or AutoCast's own choice.
        node_block_list: node names to keep in float32 (spec ``fp16.keep_fp32_nodes``).
        converter: auto (AutoCast where ModelOpt is installed, else onnxruntime) | modelopt | onnxruntime.

    Raises:
        ModelError: the model already holds Q/DQ nodes (use ``fp16_qdq_graph_from_qdq``), unknown
            node names, or the conversion fails.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    model = onnx.load(str(model_path))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ModelError("the model already holds Q/DQ nodes; an FP16 conversion would change their scales' type.",
                         fix="Build INT8 from the Q/DQ model as it is, or convert the float model before quantising.")
    op_types, nodes = list(op_block_list or []), list(node_block_list or [])
    _check_names(model, nodes)
    chosen = _converter(converter)
    report = _range_report(model)
    large = model.ByteSize() > _LARGE
    try:
        converted = (_autocast(model_path, keep_io_types, op_types, nodes) if chosen == "modelopt-autocast"
                     else _onnxruntime_fp16(model, keep_io_types, op_types, nodes, large))
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the converters raise assorted errors on odd graphs
        raise ModelError(f"converting the model to FP16 ({chosen}) failed: {err}",
                         fix="Keep the failing node or op type in FP32 (fp16.keep_fp32_nodes / keep_fp32_op_types), "
                             "or build FP16 with TensorRT's FP16 flag (TensorRT <= 10).") from None
    _toposort(converted.graph)  # inserted Casts may follow their consumers (onnxruntime's do); a no-op otherwise
    converted.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(converted.opset_import))
    _save(converted, out_path, large)
    return Fp16Graph(out_path, chosen, keep_io_types, op_types, nodes, report["clamped"], report["flushed"])


def fp16_qdq_graph_from_qdq(qdq_path: Union[str, Path], out_path: Union[str, Path], keep_io_types: bool = True,
                            op_block_list: Optional[Sequence[str]] = None,
                            node_block_list: Optional[Sequence[str]] = None) -> Fp16Graph:
    """Write the Q/DQ graph ``qdq_path`` (calibrated in FP32) with its unquantised part in FP16: what
    a strongly typed INT8 build needs for the layers TensorRT does not run in INT8 to run in FP16,
    as the weakly typed INT8+FP16 build does. ModelOpt's ``high_precision_dtype="fp16"`` does the
    same after calibrating in FP32.

    Scales become float16, which QuantizeLinear/DequantizeLinear take from opset 19 (TensorRT 10+
    parses it): the graph is moved to opset 19 with onnx's version converter where it is older.
    onnxruntime's converter is used (AutoCast refuses graphs with Q/DQ nodes in the ModelOpt
    releases we read), with ``TENSORRT_FP16_OP_BLOCK_LIST``.

    Raises:
        ModelError: the graph holds no Q/DQ nodes, cannot move to opset 19, or cannot be converted.
    """
    from onnx import version_converter

    qdq_path, out_path = Path(qdq_path), Path(out_path)
    model = onnx.load(str(qdq_path))
    if not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        raise ModelError(f"{qdq_path.name} holds no Q/DQ nodes.", fix="Quantise the model first (tasks.quantize).")
    op_types, nodes = list(op_block_list or []), list(node_block_list or [])
    _check_names(model, nodes)
    report = _range_report(model)
    large = model.ByteSize() > _LARGE
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    try:
        if opset < QDQ_FP16_MIN_OPSET:
            model = version_converter.convert_version(model, QDQ_FP16_MIN_OPSET)
        converted = _onnxruntime_fp16(model, keep_io_types, op_types, nodes, large)
    except Exception as err:  # noqa: BLE001 - the version converter and float16 converter raise assorted errors
        raise ModelError(f"converting the Q/DQ graph's float part to FP16 failed: {err}",
                         fix="Keep the failing node in FP32 (fp16.keep_fp32_nodes), or build INT8 weakly typed "
                             "(INT8+FP16 flags, TensorRT <= 10).") from None
    converted.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(converted.opset_import))
    _save(converted, out_path, large)
    return Fp16Graph(out_path, "onnxruntime", keep_io_types, op_types, nodes, report["clamped"], report["flushed"],
                     qdq=True)


def _save(model: onnx.ModelProto, out_path: Path, large: bool) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path), save_as_external_data=large, location=out_path.name + ".data" if large else None)
    log.info("FP16 graph written to %s", out_path)

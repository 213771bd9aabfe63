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

One concern per module: graph.py (helpers, constants), placement.py, lint.py (structure check),
backends.py (onnxruntime / ModelOpt), stage.py (``qdq_model_from_calibration``), cache.py (bucket),
result.py (the record and the cache recipe). Everything public is re-exported here.
"""
from __future__ import annotations

from tasks.quantize.graph import (MIN_IR_FOR_OPSET, MIN_OPSET, ModelLike, ORT_DEFAULT, PLACEMENT, QDQ_OPS,
                                  WEIGHTED_OPS, has_qdq)  # noqa: F401
from tasks.quantize.result import QuantizeResult, quantize_recipe, stats_path_for  # noqa: F401
from tasks.quantize.placement import Placement, plan_placement  # noqa: F401
from tasks.quantize.lint import assert_qdq_structure, check_qdq_structure, qdq_summary  # noqa: F401
from tasks.quantize.backends import choose_backend  # noqa: F401
from tasks.quantize.stage import qdq_model_from_calibration  # noqa: F401
from tasks.quantize.cache import QdqCache, fetch_cached_qdq, qdq_cache, qdq_cache_key, store_cached_qdq  # noqa: F401

__all__ = ["MIN_IR_FOR_OPSET", "MIN_OPSET", "ModelLike", "ORT_DEFAULT", "PLACEMENT", "Placement", "QDQ_OPS",
           "QdqCache", "QuantizeResult", "WEIGHTED_OPS", "assert_qdq_structure", "check_qdq_structure",
           "choose_backend", "fetch_cached_qdq", "has_qdq", "plan_placement", "qdq_cache", "qdq_cache_key",
           "qdq_model_from_calibration", "qdq_summary", "quantize_recipe", "stats_path_for", "store_cached_qdq"]

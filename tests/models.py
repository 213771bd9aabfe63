"""A registry of tiny ONNX models built in code (no model hub is reachable).

Python 3.9-compatible and importing only onnx and numpy: the GPU tests import it under the
TensorRT interpreter too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # TensorRT 8.6's parser reads IR <= 8 models; newer onnx writes 10 by default


def _model(graph: onnx.GraphProto, opset: int = OPSET) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="trtflow-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def small_cnn(dynamic_batch: bool = True, num_classes: int = 10, channels: int = 8, size: int = 32,
              seed: int = 0) -> onnx.ModelProto:
    """images float32 [N,3,size,size] -> logits float32 [N,num_classes]: Conv-Relu-Conv-Relu-GAP-Gemm."""
    rng = np.random.default_rng(seed)
    batch = "N" if dynamic_batch else 1
    w1 = rng.normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (channels,)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (channels * 2, channels, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (channels * 2,)).astype(np.float32)
    wf = rng.normal(0, 0.3, (num_classes, channels * 2)).astype(np.float32)
    bf = rng.normal(0, 0.1, (num_classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, num_classes])],
        [_init("w1", w1), _init("b1", b1), _init("w2", w2), _init("b2", b2), _init("wf", wf), _init("bf", bf)],
    )
    return _model(graph)


def two_input_model(vocab: int = 50, dim: int = 16, seq: int = 4, seed: int = 1) -> onnx.ModelProto:
    """features float32 [N,dim] and ids int64 [N,seq] -> out float32 [N,dim].

    out = MatMul(features, W) + mean over seq of Embedding[ids]. Two inputs of different dtypes,
    including int64 (which TensorRT narrows to int32).
    """
    rng = np.random.default_rng(seed)
    emb = rng.normal(0, 1, (vocab, dim)).astype(np.float32)
    w = rng.normal(0, 0.5, (dim, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["g"], name="embed", axis=0),
        helper.make_node("ReduceMean", ["g"], ["gm"], name="pool", axes=[1], keepdims=0),
        helper.make_node("MatMul", ["features", "w"], ["mm"], name="proj"),
        helper.make_node("Add", ["mm", "gm"], ["out"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", seq])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", dim])],
        [_init("emb", emb), _init("w", w)],
    )
    return _model(graph)


def save(model: onnx.ModelProto, path: Path, external_data: Optional[str] = None) -> Path:
    """Write ``model`` to ``path``; with ``external_data`` the weights go to that file beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data, size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


# ---- the validation registry: models that are wrong in one named way ----------------------------
def dynamic_hw_cnn(num_classes: int = 10, channels: int = 8) -> onnx.ModelProto:
    """small_cnn with images [N,3,H,W]: dynamic spatial dims need a profile in trtflow.yaml."""
    model = small_cnn(dynamic_batch=True, num_classes=num_classes, channels=channels)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].Clear()
    dims[2].dim_param = "H"
    dims[3].Clear()
    dims[3].dim_param = "W"
    onnx.checker.check_model(model, full_check=True)
    return model


def relu_model(opset: int = OPSET, ir_version: int = IR_VERSION, width: int = 4) -> onnx.ModelProto:
    """x float32 [N,width] -> y = Relu(x); built at any opset/IR (e.g. one too new for TensorRT 8.6)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="trtflow-tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def unique_op_model() -> onnx.ModelProto:
    """x float32 [8] -> Unique(x): valid ONNX (ONNX Runtime runs it) that TensorRT's parser lacks."""
    graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"], name="unique", sorted=1)], "unique",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["U"])])
    return _model(graph)


def custom_op_model(width: int = 4) -> onnx.ModelProto:
    """x [N,width] -> MatMul -> com.example Mystery -> MatMul: onnxruntime's symbolic shape inference
    cannot see through the custom op ("Incomplete symbolic shape inference"), as with the zoo's detector."""
    w = _init("w", np.eye(width, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm1"),
         helper.make_node("Mystery", ["y"], ["z"], name="mystery", domain="com.example"),
         helper.make_node("MatMul", ["z", "w"], ["out"], name="mm2")], "custom_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.example", 1)])
    model.ir_version = IR_VERSION
    return model


def save_with_external_location(model: onnx.ModelProto, path: Path, location: str, write_data: bool = True,
                                truncate_bytes: int = 0) -> Path:
    """Write ``model`` with every initializer's external_data entries set by hand to ``location``.

    onnx.save_model refuses hostile locations such as ``../weights.bin``, so the TensorProto entries
    are written directly. With ``write_data`` the weights go to ``location`` resolved against the
    model's folder (which may lie outside it: the file then exists, but outside the package);
    ``truncate_bytes`` cuts that many bytes off its end.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # leave the caller's copy alone
    blob = bytearray()
    for tensor in model.graph.initializer:
        raw = numpy_helper.to_array(tensor).tobytes()
        offset = len(blob)
        blob += raw
        for name in ("float_data", "int64_data", "int32_data", "raw_data"):
            tensor.ClearField(name)
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = tensor.external_data.add()
            entry.key = key
            entry.value = value
    if write_data:
        target = path.parent / location
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(blob[:len(blob) - truncate_bytes]))
    path.write_bytes(model.SerializeToString())
    return path


def truncated_file(path: Path, keep: float = 0.5) -> Path:
    """small_cnn saved and then cut to ``keep`` of its bytes (an interrupted upload)."""
    path = save(small_cnn(), path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def not_onnx_file(path: Path, kind: str = "html") -> Path:
    """A file that is not ONNX: ``html`` (an error page saved as a model) or ``zip`` (a PyTorch checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    else:
        path.write_bytes(b"<html><body><h1>403 Forbidden</h1></body></html>\n")
    return path


# ---- the adaptation registry (tasks/adapt.py): graphs as exporters write them ------------------
def shared_param_cnn(param: str = "?") -> onnx.ModelProto:
    """small_cnn with images [N, 3, ?, ?]: both spatial dims share one dim_param (as some exporters
    write unnamed dynamic dims), though a profile may give them different ranges."""
    model = dynamic_hw_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param = param
    dims[3].dim_param = param
    onnx.checker.check_model(model, full_check=True)
    return model


def shared_batch_text_model(vocab: int = 30, dim: int = 8) -> onnx.ModelProto:
    """input_ids and attention_mask int64 [B, S] (batch and sequence shared by both inputs) ->
    pooled float32 [B, dim]: masked mean of an embedding, as a BERT-style encoder's inputs."""
    rng = np.random.default_rng(3)
    emb = rng.normal(0, 1, (vocab, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["g"], name="embed", axis=0),
        helper.make_node("Cast", ["attention_mask"], ["m"], name="mask_cast", to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"], name="mask_unsqueeze"),
        helper.make_node("Mul", ["g", "m3"], ["gm"], name="mask_mul"),
        helper.make_node("ReduceSum", ["gm", "axis1"], ["pooled"], name="pool", keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "shared_batch_text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["B", dim])],
        [_init("emb", emb), _init("axis2", np.array([2], np.int64)), _init("axis1", np.array([1], np.int64))],
    )
    return _model(graph)


def reduce_mean_model(opset: int = 18, ir_version: int = IR_VERSION) -> onnx.ModelProto:
    """x float32 [N, 4, 6] -> ReduceMean over axis 2 (axes an input since opset 18) -> Relu.
    At opset 18+ the version converter must move the axes back into an attribute for opset 17."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["m"], name="mean", keepdims=1),
         helper.make_node("Relu", ["m"], ["y"], name="relu")], "reduce_mean",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1])],
        [_init("axes", np.array([2], np.int64))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="trtflow-tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def float8_weight_model(ir_version: int = 9) -> onnx.ModelProto:
    """relu_model plus a FLOAT8E4M3FN initializer dequantized into the graph: a real IR 9 feature,
    so its IR must not be lowered to 8."""
    w = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, [4], [1.0, 2.0, 0.5, 1.0])
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w8", "scale"], ["w"], name="dq"),
         helper.make_node("Mul", ["x", "w"], ["y"], name="mul")], "float8_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [w, _init("scale", np.array(1.0, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], producer_name="trtflow-tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def dynamic_axes_slice_model(width: int = 8) -> onnx.ModelProto:
    """x float32 [N, width] -> Slice whose starts/ends/axes come from a constant subgraph
    (Constant -> Add / Cast), as exporters write `x[:, 2:-2]` with computed indices: TensorRT 8.6's
    parser refuses it ("does not support dynamic axes"); constant folding resolves it."""
    nodes = [
        helper.make_node("Constant", [], ["axes_raw"], name="axes_const",
                         value=_init("axes_raw", np.array([0], np.int64))),
        helper.make_node("Add", ["axes_raw", "one"], ["axes"], name="axes_add"),
        helper.make_node("Constant", [], ["starts_f"], name="starts_const",
                         value=_init("starts_f", np.array([2.0], np.float32))),
        helper.make_node("Cast", ["starts_f"], ["starts"], name="starts_cast", to=TensorProto.INT64),
        helper.make_node("Neg", ["starts"], ["ends"], name="ends_neg"),
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["s"], name="dyn_slice"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "dynamic_axes_slice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width - 4])],
        [_init("one", np.array([1], np.int64))])
    return _model(graph)


def endless_loop_model(trip_count: int = 10**12, width: int = 4) -> onnx.ModelProto:
    """x float32 [1,width] -> y: a Loop adding 1 to x ``trip_count`` times (valid ONNX that never ends in practice).

    Passes onnx.checker and TensorRT-oriented validation; ONNX Runtime runs it for as long as it is let.
    """
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"], name="step")],
        "loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [1]),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [1]),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, width])],
        [_init("one", np.ones((1, width), np.float32))],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], name="endless", body=body)],
        "endless_loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [_init("trips", np.array([trip_count], np.int64)), _init("cond", np.array([True]))],
    )
    return _model(graph)


def wild_export_model(width: int = 8, ir_version: int = 10) -> onnx.ModelProto:
    """The graph shapes real exports hit at once: IR ``ir_version`` at opset 17 (today's onnx
    writes 10), x float32 [?, ?] whose batch and width share the dim_param '?' (a profile gives
    them different ranges), and a Slice with computed axes (dynamic_axes_slice_model)."""
    model = dynamic_axes_slice_model(width)
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "?"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_param = "?"
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "w_out"
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def instance_norm_model(channels: int = 4, size: int = 8) -> onnx.ModelProto:
    """x float32 [N, C, H, W] -> InstanceNormalization -> Relu: TensorRT 8.6 imports it through its
    InstanceNormalization_TRT plugin (registered by init_libnvinfer_plugins)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("InstanceNormalization", ["x", "scale", "bias"], ["n"], name="inorm", epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "instance_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, size, size])],
        [_init("scale", rng.uniform(0.5, 1.5, channels).astype(np.float32)),
         _init("bias", rng.normal(0, 0.1, channels).astype(np.float32))])
    return _model(graph)


def _conv_silu(prefix: str, src: str, cin: int, cout: int, rng: np.random.Generator, inits: list,
               stride: int = 1) -> tuple:
    """Conv -> Sigmoid -> Mul (SiLU, as torch exports nn.SiLU at opset 17): (nodes, output name)."""
    w = rng.normal(0, 0.3, (cout, cin, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.05, (cout,)).astype(np.float32)
    inits += [_init(f"{prefix}.w", w), _init(f"{prefix}.b", b)]
    nodes = [helper.make_node("Conv", [src, f"{prefix}.w", f"{prefix}.b"], [f"{prefix}.c"], name=f"{prefix}.conv",
                              pads=[1, 1, 1, 1], strides=[stride, stride]),
             helper.make_node("Sigmoid", [f"{prefix}.c"], [f"{prefix}.s"], name=f"{prefix}.sigmoid"),
             helper.make_node("Mul", [f"{prefix}.c", f"{prefix}.s"], [f"{prefix}.y"], name=f"{prefix}.mul")]
    return nodes, f"{prefix}.y"


def silu_detector(size: int = 16, channels: int = 8, boxes: int = 4) -> onnx.ModelProto:
    """A YOLO-style detector in miniature: images [N,3,S,S] -> Conv-SiLU stem -> Split into two
    halves, one through a Conv-SiLU and a residual Add, Concat back -> head Conv -> box decoder
    (Reshape -> Softmax over the distribution bins -> Concat with the class scores) -> out [N, A, 4*boxes+2]."""
    rng = np.random.default_rng(11)
    inits: list = []
    half = channels // 2
    stem, s = _conv_silu("stem", "images", 3, channels, rng, inits, stride=2)
    block, b = _conv_silu("block", "split.b", half, half, rng, inits)
    head_c = 4 * boxes + 2
    wh = rng.normal(0, 0.3, (head_c, channels, 1, 1)).astype(np.float32)
    inits += [_init("head.w", wh), _init("split.sizes", np.array([half, half], np.int64)),
              _init("box.shape", np.array([0, 4, boxes, -1], np.int64)),
              _init("cls.shape", np.array([0, 2, -1], np.int64)), _init("box.flat", np.array([0, 4 * boxes, -1], np.int64))]
    nodes = stem + [helper.make_node("Split", [s, "split.sizes"], ["split.a", "split.b"], name="csp.split", axis=1)]
    nodes += block + [
        helper.make_node("Add", ["split.b", b], ["block.res"], name="block.add"),
        helper.make_node("Concat", ["split.a", "block.res"], ["csp.cat"], name="csp.concat", axis=1),
        helper.make_node("Conv", ["csp.cat", "head.w"], ["head.out"], name="head.conv"),
        helper.make_node("Slice", ["head.out", "dec.zero", "dec.boxend", "dec.axis"], ["box.raw"], name="dec.slice_box"),
        helper.make_node("Slice", ["head.out", "dec.boxend", "dec.end", "dec.axis"], ["cls.raw"], name="dec.slice_cls"),
        helper.make_node("Reshape", ["box.raw", "box.shape"], ["box.bins"], name="dec.reshape_box"),
        helper.make_node("Softmax", ["box.bins"], ["box.prob"], name="dec.softmax", axis=2),
        helper.make_node("Reshape", ["box.prob", "box.flat"], ["box.out"], name="dec.reshape_flat"),
        helper.make_node("Reshape", ["cls.raw", "cls.shape"], ["cls.flat"], name="dec.reshape_cls"),
        helper.make_node("Sigmoid", ["cls.flat"], ["cls.out"], name="dec.sigmoid"),
        helper.make_node("Concat", ["box.out", "cls.out"], ["out"], name="dec.concat", axis=1),
    ]
    inits += [_init("dec.zero", np.array([0], np.int64)), _init("dec.boxend", np.array([4 * boxes], np.int64)),
              _init("dec.end", np.array([head_c], np.int64)), _init("dec.axis", np.array([1], np.int64))]
    graph = helper.make_graph(
        nodes, "silu_detector",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", head_c, (size // 2) ** 2])], inits)
    return _model(graph)


def gelu_opset20_model() -> onnx.ModelProto:
    """x float32 [N,4] -> Gelu at opset 20 (IR 9): onnx.version_converter cannot take Gelu (new in
    opset 20) down to TensorRT 8.6's opset 17, so validation and adaptation must refuse it by name."""
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], name="gelu")], "gelu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 9
    return model

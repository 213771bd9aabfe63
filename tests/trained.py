"""A tiny CNN trained in the test suite, on CPU, in a few seconds: a model whose accuracy means something.

Random-weight models say nothing about INT8 accuracy (their logits are noise, so "top-1 agreement"
is a coin toss on near-ties). This one learns a synthetic but real task: 16x16 RGB images holding a
bar in one of four orientations (horizontal, vertical, diagonal, anti-diagonal) at a random place,
length, thickness and colour, on a noisy background. The network has the shapes that matter for
INT8 on TensorRT: Conv+ReLU, a residual Add, a strided Conv, global average pooling and a Gemm head.

Training is plain numpy (im2col convolutions, hand-written backward pass, Adam). torch would make the
code shorter, but PyPI's default Linux torch wheel pulls in gigabytes of CUDA libraries, which would
make CI far slower than the few seconds this takes.

Python 3.9-compatible and importing only numpy and onnx: the GPU tests import it under the TensorRT
interpreter too.

    images float32 [N,3,16,16] -> conv1 -> relu1 -> conv2 -> add(+relu1) -> relu2 -> conv3 (stride 2)
                               -> relu3 -> gap -> flatten -> fc -> logits float32 [N,4]
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
from typing import Dict, Iterator, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 16
CLASSES = ("horizontal", "vertical", "diagonal", "anti-diagonal")
OPSET = 17
IR_VERSION = 8  # TensorRT 8.6's parser reads IR <= 8


# ---- data ---------------------------------------------------------------------------------------
def make_bars(n: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images [n,3,16,16] float32 (roughly zero-mean, unit-scale) and labels [n] int64."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    images = rng.normal(0.0, 0.12, size=(n, 3, SIZE, SIZE)).astype(np.float32)
    images += rng.uniform(-0.2, 0.2, size=(n, 3, 1, 1)).astype(np.float32)  # background tint
    directions = {0: (0, 1), 1: (1, 0), 2: (1, 1), 3: (1, -1)}
    for i in range(n):
        dy, dx = directions[int(labels[i])]
        length = int(rng.integers(7, 12))
        thick = int(rng.integers(1, 3))
        colour = rng.uniform(0.6, 1.2, size=3).astype(np.float32)
        # start so that the whole bar fits
        ys = range(0, SIZE - (length if dy else thick) + 1)
        if dx == 1:
            xs = range(0, SIZE - length + 1)
        elif dx == -1:
            xs = range(length - 1, SIZE)
        else:
            xs = range(0, SIZE - thick + 1)
        y0, x0 = int(rng.choice(list(ys))), int(rng.choice(list(xs)))
        for step in range(length):
            y, x = y0 + dy * step, x0 + dx * step
            for t in range(thick):
                yy, xx = (y, x + t) if dy else (y + t, x)
                if 0 <= yy < SIZE and 0 <= xx < SIZE:
                    images[i, :, yy, xx] += colour
    return images - 0.1, labels.astype(np.int64)


# ---- numpy layers -------------------------------------------------------------------------------
def _im2col(x: np.ndarray, k: int, stride: int, pad: int) -> Tuple[np.ndarray, Tuple[int, int]]:
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, ho, wo = win.shape[:4]
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)
    return np.ascontiguousarray(cols), (ho, wo)


def _conv(x, w, b, stride=1, pad=1):
    co, _, k, _ = w.shape
    cols, (ho, wo) = _im2col(x, k, stride, pad)
    out = cols @ w.reshape(co, -1).T + b
    return out.reshape(x.shape[0], ho, wo, co).transpose(0, 3, 1, 2), cols


def _conv_backward(dout, x_shape, cols, w, stride=1, pad=1):
    n, c, h, wd = x_shape
    co, _, k, _ = w.shape
    ho, wo = dout.shape[2:]
    dflat = dout.transpose(0, 2, 3, 1).reshape(-1, co)
    dw = (dflat.T @ cols).reshape(w.shape)
    db = dflat.sum(0)
    dcols = (dflat @ w.reshape(co, -1)).reshape(n, ho, wo, c, k, k)
    dxp = np.zeros((n, c, h + 2 * pad, wd + 2 * pad), dtype=dout.dtype)
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += dcols[..., i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, pad:pad + h, pad:pad + wd], dw, db


def forward(params: Dict[str, np.ndarray], x: np.ndarray, keep: bool = False):
    """Logits of the numpy model (and the activations the backward pass needs when ``keep``)."""
    c1, cols1 = _conv(x, params["w1"], params["b1"])
    r1 = np.maximum(c1, 0)
    c2, cols2 = _conv(r1, params["w2"], params["b2"])
    s = c2 + r1
    r2 = np.maximum(s, 0)
    c3, cols3 = _conv(r2, params["w3"], params["b3"], stride=2)
    r3 = np.maximum(c3, 0)
    g = r3.mean(axis=(2, 3))
    logits = g @ params["wf"].T + params["bf"]
    if not keep:
        return logits
    return logits, dict(x=x, cols1=cols1, r1=r1, cols2=cols2, s=s, r2=r2, cols3=cols3, c3=c3, r3=r3, g=g)


def _grads(params, x, y):
    logits, a = forward(params, x, keep=True)
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.log(p[np.arange(n), y] + 1e-12).mean())
    dlogits = p
    dlogits[np.arange(n), y] -= 1
    dlogits /= n
    g = {"wf": dlogits.T @ a["g"], "bf": dlogits.sum(0)}
    dg = dlogits @ params["wf"]
    hw = a["r3"].shape[2] * a["r3"].shape[3]
    dr3 = np.broadcast_to(dg[:, :, None, None] / hw, a["r3"].shape)
    dc3 = dr3 * (a["c3"] > 0)
    dr2, g["w3"], g["b3"] = _conv_backward(dc3, a["r2"].shape, a["cols3"], params["w3"], stride=2)
    ds = dr2 * (a["s"] > 0)
    dr1_a, g["w2"], g["b2"] = _conv_backward(ds, a["r1"].shape, a["cols2"], params["w2"])
    dr1 = dr1_a + ds
    dc1 = dr1 * (a["r1"] > 0)
    _, g["w1"], g["b1"] = _conv_backward(dc1, a["x"].shape, a["cols1"], params["w1"])
    return loss, g


def _init(seed: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def he(*shape):
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)

    return {"w1": he(8, 3, 3, 3), "b1": np.zeros(8, np.float32),
            "w2": he(8, 8, 3, 3) * 0.5, "b2": np.zeros(8, np.float32),
            "w3": he(16, 8, 3, 3), "b3": np.zeros(16, np.float32),
            "wf": he(len(CLASSES), 16), "bf": np.zeros(len(CLASSES), np.float32)}


def train(seed: int = 0, samples: int = 2048, epochs: int = 6, batch: int = 64, lr: float = 0.01) -> Dict[str, np.ndarray]:
    """Adam on softmax cross-entropy; returns the trained parameters."""
    x, y = make_bars(samples, seed=seed + 1)
    params = _init(seed)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(seed + 2)
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(samples)
        rate = lr * (0.5 ** (epoch // 3))
        for start in range(0, samples, batch):
            idx = order[start:start + batch]
            _, g = _grads(params, x[idx], y[idx])
            step += 1
            for k in params:
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v[k] = 0.999 * v[k] + 0.001 * g[k] * g[k]
                mh = m[k] / (1 - 0.9 ** step)
                vh = v[k] / (1 - 0.999 ** step)
                params[k] = (params[k] - rate * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    return params


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Run numpy's OpenBLAS single-threaded for a while.

    The matrices here are small; on a busy 2-core machine OpenBLAS's threads fight other processes and
    training took 35 s instead of 7 (measured). threadpoolctl does this properly but is not a
    dependency; when numpy's OpenBLAS cannot be found this does nothing.
    """
    base = os.path.dirname(np.__file__)
    libs = glob.glob(os.path.join(base + ".libs", "*openblas*")) + glob.glob(os.path.join(base, ".libs", "*openblas*"))
    setter = getter = None
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name) and hasattr(lib, name.replace("_set_", "_get_")):
                setter, getter = getattr(lib, name), getattr(lib, name.replace("_set_", "_get_"))
                break
        if setter is not None:
            break
    if setter is None:
        yield
        return
    before = int(getter())
    setter(1)
    try:
        yield
    finally:
        setter(before)


# ---- ONNX ---------------------------------------------------------------------------------------
OUTLIER = 1.0e4  # the INT8-hostile variant's constant channel: fine in FP32 and FP16 (max 65504)


def to_onnx(params: Dict[str, np.ndarray], int8_hostile: bool = False) -> onnx.ModelProto:
    """The trained network as an ONNX model with a dynamic batch axis ("images" -> "logits").

    ``int8_hostile``: the same function with one change INT8 cannot survive: conv1 reads a fourth,
    constant channel of value 1e4 (built from the input, so nothing folds it away) through zero
    weights. FP32 and FP16 outputs equal the plain model's; per-tensor INT8 quantisation of conv1's
    input must now span 1e4, so every image value rounds to 0 and the INT8 accuracy gate fails.
    """
    params = dict(params)
    conv1_input = "images"
    pre = []
    if int8_hostile:
        params["w1"] = np.concatenate([params["w1"], np.zeros_like(params["w1"][:, :1])], axis=1)
        params["outlier"] = np.array(OUTLIER, np.float32)
        params["zero"] = np.array(0.0, np.float32)
        pre = [
            helper.make_node("ReduceMean", ["images"], ["plane_mean"], name="plane_mean", axes=[1], keepdims=1),
            helper.make_node("Mul", ["plane_mean", "zero"], ["plane_zero"], name="plane_zero"),
            helper.make_node("Add", ["plane_zero", "outlier"], ["plane"], name="plane"),
            helper.make_node("Concat", ["images", "plane"], ["images4"], name="with_outlier", axis=1),
        ]
        conv1_input = "images4"
    inits = [numpy_helper.from_array(np.ascontiguousarray(v.astype(np.float32)), k) for k, v in sorted(params.items())]
    nodes = pre + [
        helper.make_node("Conv", [conv1_input, "w1", "b1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "bars_cnn_int8_hostile" if int8_hostile else "bars_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASSES)])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="trtflow-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


@functools.lru_cache(maxsize=4)
def _trained(seed: int):
    with _one_blas_thread():
        params = train(seed)
    eval_x, eval_y = make_bars(512, seed=seed + 100)
    calib_x, _ = make_bars(128, seed=seed + 200)
    return params, eval_x, eval_y, calib_x


def train_small_cnn(seed: int = 0) -> Tuple[onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    """(model, eval_x [512,3,16,16], eval_y [512], calib_x [128,3,16,16]); trained once per process and seed.

    Eval and calibration images are drawn with seeds of their own, disjoint from the training set.
    """
    params, eval_x, eval_y, calib_x = _trained(seed)
    return to_onnx(params), eval_x.copy(), eval_y.copy(), calib_x.copy()


def int8_hostile_cnn(seed: int = 0) -> Tuple[onnx.ModelProto, np.ndarray, np.ndarray, np.ndarray]:
    """Like ``train_small_cnn`` but the model fails any INT8 gate while FP32/FP16 stay exact (see ``to_onnx``):
    for exercising the INT8 -> FP16 -> FP32 fallback chain."""
    params, eval_x, eval_y, calib_x = _trained(seed)
    return to_onnx(params, int8_hostile=True), eval_x.copy(), eval_y.copy(), calib_x.copy()


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def trained_params(seed: int = 0) -> Dict[str, np.ndarray]:
    """The numpy parameters behind ``train_small_cnn(seed)`` (for checking the export)."""
    return {k: v.copy() for k, v in _trained(seed)[0].items()}

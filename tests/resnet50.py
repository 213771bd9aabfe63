"""A ResNet-50 (v1.5, BN folded into the convolutions) built with onnx.helper: no torch needed.

Random weights, scaled so activations stay O(1) through the 16 residual blocks. Used on CPU to check
the Q/DQ placement on a real residual topology (tests/tasks/test_quantize.py); bench/ exports the
torchvision model for the H100 timings. Python 3.9-compatible (onnx and numpy only).
"""
from __future__ import annotations

from typing import List

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def resnet50(seed: int = 0, classes: int = 1000) -> onnx.ModelProto:
    """ResNet-50 v1.5 as torchvision exports it after BN folding (Conv+bias, Relu, MaxPool, Add,
    GlobalAveragePool, Flatten, Gemm); random weights scaled so activations stay O(1) through 16 blocks."""
    rng = np.random.default_rng(seed)
    inits: List[onnx.TensorProto] = []
    nodes: List[onnx.NodeProto] = []

    def conv(x: str, cin: int, cout: int, k: int, stride: int, name: str, relu: bool, gain: float = 1.0) -> str:
        w = (rng.standard_normal((cout, cin, k, k)) * gain * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")])
        pad = k // 2
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}.out"], name=name,
                                      kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4))
        if not relu:
            return f"{name}.out"
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    x = conv("images", 3, 64, 7, 2, "conv1", relu=True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for stage, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
        for i in range(blocks):
            s = stride if i == 0 else 1
            name = f"layer{stage}.{i}"
            y = conv(x, cin, width, 1, 1, f"{name}.conv1", relu=True)
            y = conv(y, width, width, 3, s, f"{name}.conv2", relu=True)
            y = conv(y, width, width * 4, 1, 1, f"{name}.conv3", relu=False, gain=0.2)  # like a small BN gamma
            shortcut = x
            if i == 0:
                shortcut = conv(x, cin, width * 4, 1, s, f"{name}.downsample", relu=False)
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{name}.add"], name=f"{name}.add"))
            nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"], name=f"{name}.relu"))
            x, cin = f"{name}.out", width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="avgpool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    wf = (rng.standard_normal((classes, 2048)) * np.sqrt(1.0 / 2048)).astype(np.float32)
    inits.extend([numpy_helper.from_array(wf, "fc.weight"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="trtflow-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model

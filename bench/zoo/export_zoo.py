#!/usr/bin/env python3
"""Export the trtflow model zoo into a local bucket: <bucket>/models/<name>/{model.onnx, trtflow.yaml,
calibration/, eval/}.

For the GPU machine's python3 (3.12: torch, torchvision, timm, transformers, scikit-image, onnx,
onnxruntime; no network, so weights are random). Models are exported the way users export them:
``torch.onnx.export`` with a dynamic batch and, where the architecture allows, dynamic spatial or
sequence dims, at opset 17 with the IR the exporter writes. The TorchScript exporter
(``dynamo=False``) is used throughout: it is what ``dynamic_axes`` tutorials and most deployed
export scripts use, and it names dims the way the issue's failing models had them.

    python3 bench/zoo/export_zoo.py --bucket /tmp/zoo --jobs 4     # all but the >2 GB model, 4 at once
    python3 bench/zoo/export_zoo.py --bucket /tmp/zoo --big        # ... and the >2 GB external-data one
    python3 bench/zoo/export_zoo.py --bucket /tmp/zoo --only resnet50,bert_base
    python3 bench/zoo/export_zoo.py --list

A package already exported (its trtflow.yaml is written last) is kept unless --redo, so a second
call continues where the first stopped. One JSON line per model goes to $OUT/zoo-export.jsonl (and
stdout) as it finishes.

Every package's trtflow.yaml carries BUILD: builder optimisation level 1 (TensorRT times fewer
tactics than at its default 3: builds short enough for ~20 models, two precisions each, in one
device session; the zoo table records the level), a 4 GiB
workspace and a 300 s GPU-step timeout (a GPU step past it is a failed build with its reason in
the table, not a conversion killed from outside: three INT8 Q/DQ builds ran past 600 s on 2026-12-02).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import onnx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import images  # noqa: E402  (bench/zoo/images.py)

BUILD = {"optimization_level": 1, "workspace_mib": 4096, "timeout_s": 300}
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
OPSET = 17


@dataclass
class Entry:
    """One zoo model: how to make it, which precisions to try, what to expect."""

    name: str
    make: Callable[["Entry", Path], Dict[str, Any]]  # writes model.onnx + data; returns the spec's parts
    precisions: List[str]
    family: str  # cnn | detector | segmenter | transformer | text | sequence | quirk
    expected: str  # size / behaviour note for the table
    options: Dict[str, Any] = field(default_factory=dict)


# ---- torch helpers ------------------------------------------------------------------------------
def torch_export(module, args, path: Path, input_names, output_names, dynamic_axes, opset: int = OPSET) -> None:
    """torch.onnx.export with the TorchScript exporter (dynamo=False where the argument exists)."""
    import torch

    kwargs = dict(opset_version=opset, input_names=list(input_names), output_names=list(output_names),
                  dynamic_axes=dynamic_axes, do_constant_folding=True)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    path.parent.mkdir(parents=True, exist_ok=True)
    # nn.MultiheadAttention (vit_b_16) takes a fused fast path in eval mode under no_grad, which the
    # TorchScript exporter cannot export (aten::_native_multi_head_attention): switch it off and
    # trace with grad enabled, as a plain export call does.
    mha = getattr(torch.backends, "mha", None)
    if mha is not None and hasattr(mha, "set_fastpath_enabled"):
        mha.set_fastpath_enabled(False)
    torch.onnx.export(module.eval(), args, str(path), **kwargs)


def settle_batchnorm(module, size, norm=None, channels: int = 3, count: int = 16):
    """Set BatchNorm running statistics from real images (train-mode passes without grad), then eval.

    With random weights and the default running stats (mean 0, var 1), activations of
    MobileNetV3/EfficientNet vanish layer by layer (measured: logit std 2e-10 and 2e-14 on the eval
    images), which no FP16 engine can reproduce; with statistics of real inputs each layer is
    normalised as in a trained network, so the accuracy gates measure TensorRT, not underflow.
    """
    import torch

    norm = norm or IMAGENET
    x = images.to_tensor(images.crops(count, size, seed=7), norm["mean"], norm["std"])
    if channels == 1:
        x = x.mean(axis=1, keepdims=True)
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    module.train()
    with torch.no_grad():
        for i in range(0, count, 4):
            module(torch.from_numpy(x[i:i + 4]))
    return module.eval()


def train_on_photos(module, size, steps: int, norm=None, batch: int = 16, lr: float = 1e-3):
    """Train the whole classifier a few hundred steps on a real task: which sample photo a crop
    comes from (crops at several scales, flipped), so its weights and activations are shaped like a
    trained network's and the INT8 gate measures TensorRT, not an untrained net's noise: with random
    weights ResNet-50's INT8 logits kept cosine 0.987-0.989 and 72-84% of the top-1 picks whatever the
    calibration (2026-12-02, on the H200 and with ONNX Runtime running the Q/DQ model on the CPU).
    On the GPU when torch has one, else skipped unless ``ZOO_TRAIN_STEPS`` asks (a CPU does ResNet-50's
    300 steps in tens of minutes); ``ZOO_TRAIN_STEPS`` overrides ``steps`` (0: no training). On the
    2-core development CPU, EfficientNet-B0 after 80 steps (loss 1.31): its Q/DQ model under ONNX
    Runtime kept cosine 0.944 / top-1 0.66 against 0.905-0.919 / 0.19 untrained."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    steps = int(os.environ.get("ZOO_TRAIN_STEPS", steps if dev == "cuda" else 0))
    if steps <= 0:
        return module
    norm = norm or IMAGENET
    kinds = len(images.photos())
    pool = images.crops(batch * 16, size, seed=21)
    x_all = torch.from_numpy(images.to_tensor(pool, norm["mean"], norm["std"]))
    y_all = torch.arange(len(pool)) % kinds  # images.crops takes photo i % len(photos)
    module.to(dev).train()
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    rng = np.random.default_rng(21)
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(len(pool), batch, replace=False))
        loss = torch.nn.functional.cross_entropy(module(x_all[idx].to(dev)), y_all[idx].to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(json.dumps({"trained": type(module).__name__, "steps": steps, "device": dev, "last_loss": round(float(loss), 4)}),
          file=sys.stderr, flush=True)
    return module.cpu().eval()


def seeded(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)


# ---- package writing ----------------------------------------------------------------------------
def write_image_data(pkg: Path, input_name: str, size, n_calib: int, n_eval: int, norm: Dict[str, List[float]],
                     dtype=np.float32) -> None:
    """calibration/: PNG crops of the photos (the pipeline preprocesses them); eval/: the same
    preprocessing done here, saved as <input>.npy (rows = samples)."""
    h, w = size
    images.save_pngs(images.crops(n_calib, (h, w), seed=1), pkg / "calibration")
    evals = images.crops(n_eval, (h, w), seed=2)
    (pkg / "eval").mkdir(parents=True, exist_ok=True)
    np.save(pkg / "eval" / f"{input_name}.npy", images.to_tensor(evals, norm["mean"], norm["std"], dtype))


def image_spec(input_name: str, shape_min, shape_opt, shape_max, norm, precisions, int8_method="entropy",
               exclude_op_types=None) -> Dict[str, Any]:
    h, w = shape_opt[2], shape_opt[3]
    spec: Dict[str, Any] = {
        "precisions": precisions, "strategy": "all",
        "profiles": [{input_name: {"min": shape_min, "opt": shape_opt, "max": shape_max}}],
        "eval": {"max_samples": 32},
    }
    if "int8" in precisions:
        spec["calibration"] = {"mode": "qdq", "method": int8_method, "max_samples": 64,
                               "batch_size": shape_opt[0], "input": input_name,
                               "preprocess": {"resize": [h, w], "mean": norm["mean"], "std": norm["std"]}}
        if exclude_op_types:
            spec["calibration"]["exclude_op_types"] = exclude_op_types
    return spec


def torchvision_classifier(arch: str, size: int = 224, dynamic_hw: bool = True):
    def make(entry: Entry, pkg: Path) -> Dict[str, Any]:
        import torch
        import torchvision

        seeded()
        model = settle_batchnorm(train_on_photos(getattr(torchvision.models, arch)(weights=None), (size, size),
                                                 steps=300), (size, size))
        axes = {"images": {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"},
                "logits": {0: "batch"}}
        torch_export(model, (torch.randn(1, 3, size, size),), pkg / "model.onnx", ["images"], ["logits"], axes)
        lo = 160 if dynamic_hw else size
        hi = 288 if dynamic_hw else size
        write_image_data(pkg, "images", (size, size), 64, 32, IMAGENET)
        return image_spec("images", [1, 3, lo, lo], [8, 3, size, size], [16, 3, hi, hi], IMAGENET, entry.precisions)
    return make


def make_deeplab(entry: Entry, pkg: Path) -> Dict[str, Any]:
    import torch
    import torchvision

    seeded()
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                          aux_loss=False)

    class OutOnly(torch.nn.Module):  # the model returns a dict; users export its "out"
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)["out"]

    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "masks": {0: "batch", 2: "height", 3: "width"}}
    torch_export(settle_batchnorm(OutOnly(model), (320, 320)), (torch.randn(1, 3, 320, 320),), pkg / "model.onnx", ["images"], ["masks"], axes)
    write_image_data(pkg, "images", (320, 320), 32, 16, IMAGENET)
    return image_spec("images", [1, 3, 256, 256], [4, 3, 320, 320], [8, 3, 512, 512], IMAGENET, entry.precisions)


def make_ssdlite(entry: Entry, pkg: Path) -> Dict[str, Any]:
    """SSDlite320's backbone + head, raw box regressions and class logits (decoding and NMS stay
    outside the engine, as most TensorRT deployments of it do)."""
    import torch
    import torchvision

    seeded()
    det = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)

    class Head(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.backbone, self.head = m.backbone, m.head

        def forward(self, x):
            feats = list(self.backbone(x).values())
            out = self.head(feats)
            return out["bbox_regression"], out["cls_logits"]

    axes = {"images": {0: "batch"}, "boxes": {0: "batch"}, "scores": {0: "batch"}}
    head = settle_batchnorm(Head(det), (320, 320), {"mean": [0.5] * 3, "std": [0.5] * 3})
    torch_export(head, (torch.randn(1, 3, 320, 320),), pkg / "model.onnx", ["images"], ["boxes", "scores"], axes)
    norm = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    write_image_data(pkg, "images", (320, 320), 64, 32, norm)
    return image_spec("images", [1, 3, 320, 320], [8, 3, 320, 320], [16, 3, 320, 320], norm, entry.precisions)


# ---- a YOLO-style detector written here (Conv-BN-SiLU, C2f Split/Concat, SPPF, Upsample, DFL) ----
def _yolo_blocks(reg_max: int):
    """The detector's building blocks (torch imported lazily: --list needs no torch)."""
    import torch
    from torch import nn

    class ConvBnSiLU(nn.Module):
        def __init__(self, c1, c2, k=1, s=1):
            super().__init__()
            self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(c2)
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    class Bottleneck(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.cv1, self.cv2 = ConvBnSiLU(c, c, 3), ConvBnSiLU(c, c, 3)

        def forward(self, x):
            return x + self.cv2(self.cv1(x))

    class C2f(nn.Module):  # Split -> n bottlenecks -> Concat of every branch
        def __init__(self, c1, c2, n=1):
            super().__init__()
            self.c = c2 // 2
            self.cv1 = ConvBnSiLU(c1, 2 * self.c)
            self.cv2 = ConvBnSiLU((2 + n) * self.c, c2)
            self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))

        def forward(self, x):
            y = list(self.cv1(x).split((self.c, self.c), 1))
            y.extend(m(y[-1]) for m in self.m)
            return self.cv2(torch.cat(y, 1))

    class SPPF(nn.Module):
        def __init__(self, c1, c2):
            super().__init__()
            self.cv1, self.cv2 = ConvBnSiLU(c1, c1 // 2), ConvBnSiLU(c1 * 2, c2)
            self.m = nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.m(x)
            y2 = self.m(y1)
            return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))

    class DFL(nn.Module):  # Softmax over reg_max bins, expectation by a fixed 1x1 conv, Reshape
        def __init__(self, c1=reg_max):
            super().__init__()
            self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
            self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
            self.c1 = c1

        def forward(self, x):
            b, _, a = x.shape
            return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)

    return ConvBnSiLU, C2f, SPPF, DFL


def yolo_module(width: float = 0.25, depth: int = 1, nc: int = 80, reg_max: int = 16):
    import torch
    from torch import nn

    ConvBnSiLU, C2f, SPPF, DFL = _yolo_blocks(reg_max)

    def ch(c):
        return max(16, int(c * width) // 8 * 8)

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            c = [ch(64), ch(128), ch(256), ch(512), ch(1024)]
            self.stem = nn.Sequential(ConvBnSiLU(3, c[0], 3, 2), ConvBnSiLU(c[0], c[1], 3, 2), C2f(c[1], c[1], depth))
            self.p3 = nn.Sequential(ConvBnSiLU(c[1], c[2], 3, 2), C2f(c[2], c[2], 2 * depth))
            self.p4 = nn.Sequential(ConvBnSiLU(c[2], c[3], 3, 2), C2f(c[3], c[3], 2 * depth))
            self.p5 = nn.Sequential(ConvBnSiLU(c[3], c[4], 3, 2), C2f(c[4], c[4], depth), SPPF(c[4], c[4]))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.h1, self.h2 = C2f(c[4] + c[3], c[3], depth), C2f(c[3] + c[2], c[2], depth)
            self.d1, self.h3 = ConvBnSiLU(c[2], c[2], 3, 2), C2f(c[2] + c[3], c[3], depth)
            self.d2, self.h4 = ConvBnSiLU(c[3], c[3], 3, 2), C2f(c[3] + c[4], c[4], depth)
            self.reg_max, self.nc, self.strides = reg_max, nc, (8, 16, 32)
            c2, c3 = max(16, c[2] // 4, reg_max * 4), max(c[2], min(nc, 100))
            self.box = nn.ModuleList(nn.Sequential(ConvBnSiLU(x, c2, 3), ConvBnSiLU(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
                                     for x in (c[2], c[3], c[4]))
            self.cls = nn.ModuleList(nn.Sequential(ConvBnSiLU(x, c3, 3), ConvBnSiLU(c3, c3, 3), nn.Conv2d(c3, nc, 1))
                                     for x in (c[2], c[3], c[4]))
            self.dfl = DFL(reg_max)

        def forward(self, x):
            p3 = self.p3(self.stem(x))
            p4 = self.p4(p3)
            p5 = self.p5(p4)
            t4 = self.h1(torch.cat((self.up(p5), p4), 1))
            n3 = self.h2(torch.cat((self.up(t4), p3), 1))
            n4 = self.h3(torch.cat((self.d1(n3), t4), 1))
            n5 = self.h4(torch.cat((self.d2(n4), p5), 1))
            feats = [torch.cat((self.box[i](f), self.cls[i](f)), 1) for i, f in enumerate((n3, n4, n5))]
            b = x.shape[0]
            # anchors from the feature-map sizes, computed in forward as exporters trace them
            points, strides = [], []
            for f, s in zip(feats, self.strides):
                h, w = f.shape[2], f.shape[3]
                sy, sx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5,
                                        torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
                points.append(torch.stack((sx, sy), -1).view(-1, 2))
                strides.append(torch.full((h * w, 1), float(s)))
            anchors = torch.cat(points).transpose(0, 1).unsqueeze(0)
            stride = torch.cat(strides).transpose(0, 1).unsqueeze(0)
            y = torch.cat([f.view(b, 4 * self.reg_max + self.nc, -1) for f in feats], 2)
            box, cls = y.split((4 * self.reg_max, self.nc), 1)
            lt, rb = self.dfl(box).chunk(2, 1)
            xy = (anchors + (rb - lt) / 2) * stride
            wh = (lt + rb) * stride
            return torch.cat((xy, wh, cls.sigmoid()), 1)

    return Detector()


def make_yolo(entry: Entry, pkg: Path) -> Dict[str, Any]:
    import torch

    seeded()
    model = settle_batchnorm(yolo_module(width=entry.options.get("width", 0.25)), (320, 320),
                             {"mean": [0.0] * 3, "std": [1.0] * 3}, count=8)
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "detections": {0: "batch", 2: "anchors"}}
    torch_export(model, (torch.randn(1, 3, 640, 640),), pkg / "model.onnx", ["images"], ["detections"], axes)
    norm = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    write_image_data(pkg, "images", (640, 640), 64, 16, norm)
    return image_spec("images", [1, 3, 320, 320], [8, 3, 640, 640], [16, 3, 640, 640], norm, entry.precisions,
                      int8_method="percentile")


# ---- text and sequence models -------------------------------------------------------------------
def make_bert(entry: Entry, pkg: Path) -> Dict[str, Any]:
    import torch
    from transformers import BertConfig, BertModel

    seeded()
    config = BertConfig(attn_implementation="eager")  # BERT-base: 12 layers, hidden 768, vocab 30522
    model = BertModel(config, add_pooling_layer=True)

    class Tuple_(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)
            return out[0], out[1]

    ids = torch.ones(2, 16, dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "last_hidden_state": {0: "batch", 1: "sequence"}, "pooler_output": {0: "batch"}}
    torch_export(Tuple_(model), (ids, torch.ones_like(ids)), pkg / "model.onnx", ["input_ids", "attention_mask"],
                 ["last_hidden_state", "pooler_output"], axes)
    seq = 64
    (pkg / "eval").mkdir(parents=True, exist_ok=True)
    np.savez(pkg / "eval" / "sentences.npz", **images.token_batches(16, seq, config.vocab_size))
    rng = {"min": [1, 16], "opt": [8, seq], "max": [16, 128]}
    return {"precisions": entry.precisions, "strategy": "all",
            "profiles": [{"input_ids": rng, "attention_mask": rng}], "eval": {"max_samples": 16}}


def make_gpt2(entry: Entry, pkg: Path) -> Dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    seeded()
    config = GPT2Config(use_cache=False, attn_implementation="eager")  # GPT-2 small: 12 layers, 768, 124M
    model = GPT2LMHeadModel(config)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            # An all-ones mask, passed explicitly: with no mask, transformers >= 5 probes position ids for
            # packed sequences with torch.diff, which the ONNX exporter has no symbolic for.
            mask = torch.ones_like(input_ids)
            return self.m(input_ids=input_ids, attention_mask=mask, use_cache=False, return_dict=False)[0]

    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    torch_export(Logits(model), (torch.ones(1, 16, dtype=torch.int64),), pkg / "model.onnx", ["input_ids"],
                 ["logits"], axes)
    seq = 32
    toks = images.token_batches(8, seq, config.vocab_size)["input_ids"]
    (pkg / "eval").mkdir(parents=True, exist_ok=True)
    np.save(pkg / "eval" / "input_ids.npy", np.where(toks == 0, 50256, toks))  # GPT-2 pads with <|endoftext|>
    return {"precisions": entry.precisions, "strategy": "all",
            "profiles": [{"input_ids": {"min": [1, 8], "opt": [4, seq], "max": [8, 128]}}], "eval": {"max_samples": 8}}


def make_lstm(entry: Entry, pkg: Path) -> Dict[str, Any]:
    import torch
    from torch import nn

    seeded()

    class Tagger(nn.Module):  # 2-layer bidirectional LSTM over 80-dim frames, per-frame classes
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(80, 256, num_layers=2, batch_first=True, bidirectional=True)
            self.out = nn.Linear(512, 32)

        def forward(self, frames):
            y, _ = self.rnn(frames)
            return self.out(y)

    axes = {"frames": {0: "batch", 1: "time"}, "logits": {0: "batch", 1: "time"}}
    torch_export(Tagger(), (torch.randn(2, 50, 80),), pkg / "model.onnx", ["frames"], ["logits"], axes)
    (pkg / "eval").mkdir(parents=True, exist_ok=True)
    np.save(pkg / "eval" / "frames.npy", images.sequence_features(16, 100, 80, seed=3))
    return {"precisions": entry.precisions, "strategy": "all",
            "profiles": [{"frames": {"min": [1, 10, 80], "opt": [8, 100, 80], "max": [16, 400, 80]}}],
            "eval": {"max_samples": 16}}


def make_crnn(entry: Entry, pkg: Path) -> Dict[str, Any]:
    import torch
    from torch import nn

    seeded()

    class CRNN(nn.Module):  # VGG-ish CNN -> height pooled away -> BiLSTM -> per-column characters
        def __init__(self, classes: int = 97):
            super().__init__()

            def block(c1, c2, pool):
                return [nn.Conv2d(c1, c2, 3, 1, 1), nn.BatchNorm2d(c2), nn.ReLU(inplace=True), nn.MaxPool2d(pool)]

            self.cnn = nn.Sequential(*block(1, 64, (2, 2)), *block(64, 128, (2, 2)), *block(128, 256, (2, 1)),
                                     *block(256, 256, (2, 1)), nn.Conv2d(256, 256, (2, 1)), nn.ReLU(inplace=True))
            self.rnn = nn.LSTM(256, 128, num_layers=2, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(256, classes)

        def forward(self, x):
            f = self.cnn(x).squeeze(2).permute(0, 2, 1)  # [N, W/4, 256]
            y, _ = self.rnn(f)
            return self.fc(y).log_softmax(-1)

    axes = {"images": {0: "batch", 3: "width"}, "logprobs": {0: "batch", 1: "steps"}}
    crnn = settle_batchnorm(CRNN(), (32, 256), {"mean": [0.0] * 3, "std": [1.0] * 3}, channels=1)
    torch_export(crnn, (torch.randn(1, 1, 32, 128),), pkg / "model.onnx", ["images"], ["logprobs"], axes)
    strips = images.text_strips(48, 32, 256, seed=4)
    (pkg / "eval").mkdir(parents=True, exist_ok=True)
    (pkg / "calibration").mkdir(parents=True, exist_ok=True)
    np.save(pkg / "eval" / "images.npy", strips[:16])
    np.save(pkg / "calibration" / "images.npy", strips[16:])
    return {"precisions": entry.precisions, "strategy": "all",
            "profiles": [{"images": {"min": [1, 1, 32, 64], "opt": [8, 1, 32, 256], "max": [16, 1, 32, 512]}}],
            "calibration": {"mode": "qdq", "method": "entropy", "batch_size": 8, "max_samples": 32},
            "eval": {"max_samples": 16}}


def make_big_mlp(entry: Entry, pkg: Path) -> Dict[str, Any]:
    """A wide MLP over 2 GB (9 x 8192x8192 float32 = 2.4 GB): exported, then saved with every weight
    in one external data file, as users must for models past protobuf's 2 GB."""
    import torch
    from torch import nn

    seeded()
    d, layers = entry.options.get("width", 8192), entry.options.get("layers", 9)
    with torch.no_grad():
        mlp = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(d, d), nn.GELU())][:-1])
        for m in mlp:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, 1.0 / d ** 0.5)
    with tempfile.TemporaryDirectory(dir=str(pkg.parent)) as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch_export(mlp, (torch.randn(2, d),), raw, ["features"], ["embedding"],
                     {"features": {0: "batch"}, "embedding": {0: "batch"}})
        model = onnx.load(str(raw))  # loads the exporter's per-tensor files
        del mlp
        onnx.save_model(model, str(pkg / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
    (pkg / "eval").mkdir(parents=True, exist_ok=True)
    feats = images.sequence_features(8, 1, d, seed=5)[:, 0]
    np.save(pkg / "eval" / "features.npy", feats)
    return {"precisions": entry.precisions, "strategy": "all",
            "profiles": [{"features": {"min": [1, d], "opt": [4, d], "max": [8, d]}}],
            "eval": {"max_samples": 8}, "bench": {"ort_iterations": 5}}


# ---- graph shapes seen in the wild (small CNN, real images) ------------------------------------
def small_net():
    import torch
    from torch import nn

    class Net(nn.Module):  # Conv-BN-ReLU x3, spatial mean (ReduceMean), Linear
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.Conv2d(64, 128, 3, 2, 1), nn.BatchNorm2d(128), nn.ReLU())
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.f(x).mean(dim=(2, 3)))

    seeded()
    return settle_batchnorm(Net(), (160, 160))


def _small_export(pkg: Path, axes=None, size=(160, 160)) -> Path:
    import torch

    axes = axes or {"images": {0: "batch"}, "logits": {0: "batch"}}
    path = pkg / "model.onnx"
    torch_export(small_net(), (torch.randn(1, 3, *size),), path, ["images"], ["logits"], axes)
    return path


def _small_spec(entry: Entry, pkg: Path, lo, opt, hi, dtype=np.float32) -> Dict[str, Any]:
    write_image_data(pkg, "images", (opt[2], opt[3]), 32, 32, IMAGENET, dtype=dtype)
    return image_spec("images", lo, opt, hi, IMAGENET, entry.precisions)


def make_shared_dims(entry: Entry, pkg: Path) -> Dict[str, Any]:
    """Both spatial dims named '?' by the exporter, the profile gives them different ranges."""
    _small_export(pkg, {"images": {0: "batch", 2: "?", 3: "?"}, "logits": {0: "batch"}})
    return _small_spec(entry, pkg, [1, 3, 96, 128], [8, 3, 160, 256], [16, 3, 224, 320])


def make_ir(ir: int):
    def make(entry: Entry, pkg: Path) -> Dict[str, Any]:
        """Opset 17 saved by a newer onnx package: only the IR number is newer."""
        path = _small_export(pkg)
        m = onnx.load(str(path))
        m.ir_version = ir
        onnx.save(m, str(path))
        return _small_spec(entry, pkg, [1, 3, 160, 160], [8, 3, 160, 160], [16, 3, 160, 160])
    return make


def make_opset(opset: int):
    # IR of the onnx release that introduced the opset (onnx.helper.VERSION_TABLE): 18 -> 1.13 (IR 8),
    # 19 -> 1.14 (IR 9), 20 -> 1.15 (IR 9).
    ir = {18: 8, 19: 9, 20: 9}[opset]

    def make(entry: Entry, pkg: Path) -> Dict[str, Any]:
        """Exported at 17, converted up as a newer exporter writes it (ReduceMean axes become an input)."""
        from onnx import version_converter

        path = _small_export(pkg)
        m = version_converter.convert_version(onnx.load(str(path)), opset)
        m.ir_version = ir
        onnx.checker.check_model(m)
        onnx.save(m, str(path))
        return _small_spec(entry, pkg, [1, 3, 160, 160], [8, 3, 160, 160], [16, 3, 160, 160])
    return make


def _to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float tensor (weights, Constant values, graph I/O) as float16: what exporting a
    model.half() writes. Done on the ONNX graph because CPU half kernels for tracing are patchy."""
    from onnx import TensorProto, numpy_helper

    def cast(t: onnx.TensorProto) -> None:
        if t.data_type == TensorProto.FLOAT:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))

    for t in model.graph.initializer:
        cast(t)
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                cast(a.t)
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    del model.graph.value_info[:]
    onnx.checker.check_model(model, full_check=True)
    return model


def make_fp16_graph(entry: Entry, pkg: Path) -> Dict[str, Any]:
    path = _small_export(pkg)
    onnx.save(_to_fp16(onnx.load(str(path))), str(path))
    return _small_spec(entry, pkg, [1, 3, 160, 160], [8, 3, 160, 160], [16, 3, 160, 160], dtype=np.float16)


def make_dynamic_slice(entry: Entry, pkg: Path) -> Dict[str, Any]:
    """The exported net behind a Slice whose axes and ends are computed from constants (Constant ->
    Add, Constant -> Cast), as exporters write index arithmetic; TensorRT 8.6 rejects the Slice."""
    from onnx import TensorProto, helper, numpy_helper

    path = _small_export(pkg)
    m = onnx.load(str(path))
    g = m.graph
    first = g.input[0].name
    const = lambda name, arr: helper.make_node("Constant", [], [name], name=name,  # noqa: E731
                                               value=numpy_helper.from_array(arr, name))
    nodes = [const("slice_axis_base", np.array([2], np.int64)), const("slice_axis_step", np.array([1], np.int64)),
             helper.make_node("Add", ["slice_axis_base", "slice_axis_step"], ["slice_axes"], name="slice_axes_add"),
             const("slice_starts", np.array([0], np.int64)), const("slice_end_f", np.array([1e9], np.float32)),
             helper.make_node("Cast", ["slice_end_f"], ["slice_ends"], name="slice_ends_cast", to=TensorProto.INT64),
             helper.make_node("Slice", [first, "slice_starts", "slice_ends", "slice_axes"], ["images_sliced"],
                              name="dynamic_axes_slice")]
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == first:
                node.input[i] = "images_sliced"
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))
    return _small_spec(entry, pkg, [1, 3, 160, 160], [8, 3, 160, 160], [16, 3, 160, 160])


# ---- the registry -------------------------------------------------------------------------------
I8, F16 = ["int8", "fp16"], ["fp16"]
ZOO: List[Entry] = [
    Entry("resnet50", torchvision_classifier("resnet50"), I8, "cnn", "25.6M params, ~98 MB; dynamic batch + H/W"),
    Entry("mobilenet_v3_large", torchvision_classifier("mobilenet_v3_large"), I8, "cnn",
          "5.5M, ~22 MB; hardswish, squeeze-excite"),
    Entry("efficientnet_b0", torchvision_classifier("efficientnet_b0"), I8, "cnn", "5.3M, ~21 MB; SiLU, squeeze-excite"),
    Entry("convnext_tiny", torchvision_classifier("convnext_tiny"), I8, "cnn", "28.6M, ~110 MB; LayerNorm, GELU"),
    Entry("yolo_style", make_yolo, I8, "detector",
          "~3M, ~12 MB; Conv-BN-SiLU, C2f Split/Concat, SPPF, Upsample, DFL Softmax/Reshape decoder"),
    Entry("ssdlite320", make_ssdlite, I8, "detector", "3.4M, ~14 MB; raw box/class heads (decode + NMS outside)"),
    Entry("deeplabv3_mobilenet_v3_large", make_deeplab, I8, "segmenter", "11M, ~44 MB; dynamic H/W, Resize"),
    Entry("vit_b_16", torchvision_classifier("vit_b_16", dynamic_hw=False), F16, "transformer",
          "86.6M, ~330 MB; fixed 224 (position embeddings)"),
    Entry("swin_t", torchvision_classifier("swin_t", dynamic_hw=False), F16, "transformer",
          "28.3M, ~110 MB; fixed 224; shifted windows (Roll as Slice/Concat)"),
    Entry("bert_base", make_bert, F16, "text", "110M, ~420 MB; int64 input_ids + attention_mask, dynamic batch/sequence"),
    Entry("gpt2_small", make_gpt2, F16, "text", "124M (+ tied LM head), ~500-650 MB; no KV cache"),
    Entry("lstm_tagger", make_lstm, F16, "sequence", "3.4M, ~14 MB; 2-layer BiLSTM, dynamic batch/time"),
    Entry("crnn_text", make_crnn, F16, "sequence", "~6M, ~25 MB; CNN + BiLSTM, dynamic width, log-softmax"),
    Entry("wide_mlp_2gb", make_big_mlp, F16, "mlp", "604M, 2.4 GB in model.onnx.data (external data)",
          {"width": 8192, "layers": 9, "big": True}),
    Entry("shared_dim_param", make_shared_dims, F16, "quirk", "H and W both named '?', different profile ranges"),
    Entry("ir9_opset17", make_ir(9), F16, "quirk", "opset 17 at IR 9"),
    Entry("ir10_opset17", make_ir(10), F16, "quirk", "opset 17 at IR 10 (onnx >= 1.16 default)"),
    Entry("opset18", make_opset(18), F16, "quirk", "opset 18 (ReduceMean axes as input)"),
    Entry("opset19", make_opset(19), F16, "quirk", "opset 19, IR 9"),
    Entry("opset20", make_opset(20), F16, "quirk", "opset 20, IR 9"),
    Entry("fp16_graph", make_fp16_graph, F16, "quirk", "float16 weights and I/O"),
    Entry("dynamic_axes_slice", make_dynamic_slice, F16, "quirk", "Slice with computed axes (8.6 parser rejects)"),
]


def _emit(record: Dict[str, Any], out: Optional[Path]) -> None:
    line = json.dumps(record, default=str)
    print(line, flush=True)
    if out is not None:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def export_entry(entry: Entry, bucket: Path) -> Dict[str, Any]:
    pkg = bucket / "models" / entry.name
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    spec = entry.make(entry, pkg)
    spec.setdefault("build", dict(BUILD))
    (pkg / "trtflow.yaml").write_text(f"# zoo: {entry.expected}\n" + yaml.safe_dump(spec, sort_keys=False))
    m = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file() and f.parent == pkg)
    return {"ir": m.ir_version, "opset": next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None),
            "inputs": dims, "bytes": size, "nodes": len(m.graph.node)}


def _export_in_parallel(todo: List[Entry], args) -> int:
    """One child process per entry (torch's exporter is single-threaded where it matters), the
    CPU cores split between them; each child prints and appends its own JSON line."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 4) // args.jobs)
    deadline = time.monotonic() + (args.budget or 1e9)

    def one(entry: Entry) -> int:
        cmd = [sys.executable, __file__, "--bucket", str(args.bucket), "--only", entry.name, "--threads", str(threads),
               "--redo"]
        left = deadline - time.monotonic()
        if left < 5:
            return 0  # the next call exports it
        try:
            return subprocess.run(cmd, timeout=left).returncode  # killed at the budget: no orphan keeps the CPUs
        except subprocess.TimeoutExpired:
            _emit({"model": entry.name, "exported": False, "error": f"stopped at the --budget of {args.budget:.0f} s; "
                                                                    "the next call exports it"},
                  Path(os.environ["OUT"]) / "zoo-export.jsonl" if os.environ.get("OUT") else None)
            return 0

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(one, todo))
    return 1 if any(codes) else 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bucket", type=Path, default=Path("/tmp/zoo"))
    ap.add_argument("--only", default="", help="comma-separated names (see --list)")
    ap.add_argument("--skip", default="", help="comma-separated names to leave out")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--jobs", type=int, default=1, help="exports at once, each its own process")
    ap.add_argument("--big", action="store_true", help="also export the >2 GB external-data model (slow)")
    ap.add_argument("--redo", action="store_true", help="export again what is already in the bucket")
    ap.add_argument("--budget", type=float, default=0, help="with --jobs: seconds for this call (0: no limit)")
    args = ap.parse_args(argv)
    if args.list:
        for e in ZOO:
            print(f"{e.name:30s} {','.join(e.precisions):10s} {e.family:12s} {e.expected}")
        return 0
    only = {n for n in args.only.split(",") if n}
    unknown = only - {e.name for e in ZOO}
    if unknown:
        print(f"unknown zoo names: {sorted(unknown)}; see --list", file=sys.stderr)
        return 2
    skip = {n for n in args.skip.split(",") if n}
    out = Path(os.environ["OUT"]) / "zoo-export.jsonl" if os.environ.get("OUT") else None
    todo = [e for e in ZOO if not ((only and e.name not in only) or e.name in skip)
            and (args.big or not e.options.get("big") or e.name in only)
            and (args.redo or not (args.bucket / "models" / e.name / "trtflow.yaml").is_file())]
    if args.jobs > 1 and len(todo) > 1:
        return _export_in_parallel(todo, args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    failures = 0
    for entry in todo:
        t0 = time.monotonic()
        try:
            info = export_entry(entry, args.bucket)
            _emit({"model": entry.name, "exported": True, "seconds": round(time.monotonic() - t0, 1),
                   "precisions": entry.precisions, "family": entry.family, "expected": entry.expected, **info}, out)
        except Exception as err:  # noqa: BLE001 - one architecture failing must not stop the zoo
            failures += 1
            _emit({"model": entry.name, "exported": False, "seconds": round(time.monotonic() - t0, 1),
                   "error": f"{type(err).__name__}: {str(err)[:500]}"}, out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

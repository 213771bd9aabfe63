"""FP16 from the graph, forced as TensorRT 11 would take it (spec ``fp16.source: graph``), against
the FP16 builder flag on the same TensorRT: throughput within 10% and the FP16 gate passed.

ResNet-50 (tests/resnet50.py, random weights) always; more models (e.g. the zoo's detector) with
``TRTFLOW_FP16_COMPARE=/path/a.onnx:/path/b.onnx`` (a dynamic batch gets the default profile).
Both builds of a model use tests/gpu/test_engines.py's LEVEL; the comparison runs once per model, with pycuda::

    /opt/trt/bin/trt-python -m pytest tests/gpu/test_fp16_graph.py -q -s -k pycuda
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tasks.fp16 import fp16_graph_from_onnx
from tests.gpu.conftest import _backend_imports
from tests.gpu.test_engines import LEVEL, compare, engine, engine_request, eval_inputs, reference
from tests.models import save
from tests.resnet50 import resnet50

MODELS = ["resnet50"] + [p for p in os.environ.get("TRTFLOW_FP16_COMPARE", "").split(":") if p]


def _model(name: str, tmp: Path) -> Path:
    if name == "resnet50":
        return save(resnet50(), tmp / "resnet50.onnx")
    return Path(name)


def _profiles(model: Path) -> list:
    """The package's profiles when the model sits in one (a zoo package's trtflow.yaml): a detector
    with dynamic H/W needs them to build, and its eval inputs must have the opt shape."""
    import yaml

    spec = model.parent / "trtflow.yaml"
    return (yaml.safe_load(spec.read_text()) or {}).get("profiles") or [] if spec.is_file() else []


def _inputs(model: Path, tmp: Path) -> Path:
    import onnx

    m = onnx.load(str(model), load_external_data=False)
    init = {i.name for i in m.graph.initializer}
    opt = {name: r["opt"] for p in _profiles(model)[:1] for name, r in p.items()}
    rng = np.random.default_rng(0)
    specs = [(i.name, opt.get(i.name) or [d.dim_value if d.HasField("dim_value") else -1
                                          for d in i.type.tensor_type.shape.dim])
             for i in m.graph.input if i.name not in init]

    def make(n: int) -> dict:
        return {name: rng.standard_normal([n if d < 0 else d for d in shape]).astype(np.float32) for name, shape in specs}

    return eval_inputs(tmp / "eval.npz", [8], make)


def _id(model: str) -> str:
    """resnet50, or a zoo package's name for its model.onnx (e.g. yolo_style)."""
    path = Path(model)
    return path.parent.name if path.name == "model.onnx" else path.stem


@pytest.mark.parametrize("name", MODELS, ids=[_id(m) for m in MODELS])
def test_fp16_graph_is_as_fast_as_the_fp16_flag_and_passes_the_gate(name, tmp_path, cuda_backend):
    if cuda_backend == "cuda-python" and _backend_imports("pycuda") is None:
        pytest.skip("throughput is compared once per model, with pycuda")
    model = _model(name, tmp_path)
    graph = fp16_graph_from_onnx(model, tmp_path / "model.fp16.onnx")
    inputs = _inputs(model, tmp_path)
    want = reference(model, inputs)
    bench = {"warmup": 50, "iterations": 300, "shape": None}
    rows = {}
    for label, path, graph_precision in (("flag", model, "fp32"), ("graph", graph.path, "fp16")):
        out = tmp_path / label
        request = engine_request(path, out, "fp16", graph_precision=graph_precision, workspace_mib=4096, bench=bench,
                                 profiles=_profiles(model),
                                 eval={"inputs": str(inputs), "outputs": str(out / "eval.npz")})
        resp = engine(request, tmp_path)
        e = resp["engine"]
        rows[label] = {"throughput": resp["bench"]["throughput_per_s"],
                       "cosine": min(compare(resp["eval"]["outputs"], want).values()), "typing": e["typing"],
                       "flags": e["builder_flags"], "layers": resp["layers"]["precisions"], "build_s": e["build_seconds"]}
    ratio = rows["graph"]["throughput"] / rows["flag"]["throughput"]
    print(f"\n{_id(name)} FP16 ({graph.converter}, optimisation level {LEVEL}): flag {rows['flag']}\n"
          f"  graph {rows['graph']}\n  graph/flag throughput {ratio:.3f}")
    assert rows["graph"]["cosine"] >= 0.999 and rows["flag"]["cosine"] >= 0.999  # the FP16 gate's default
    assert ratio >= 0.9, f"the FP16 graph runs at {ratio:.0%} of the FP16 flag's throughput"

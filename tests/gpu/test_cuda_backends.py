"""The CUDA backend (tasks/gpu/cuda_backend.py) on a real GPU: the probe names the one the
subprocess used, and an engine built and run through it agrees with onnxruntime.

Run the short cuda-python check with:
``TRTFLOW_CUDA=cuda-python /opt/trt/bin/trt-python -m pytest tests/gpu/test_cuda_backends.py -q -s``
"""
from __future__ import annotations

import numpy as np

from tasks.gpu_client import run_gpu
from tests.gpu.test_engines import TIMEOUT_S, compare, engine, engine_request, eval_inputs, images, reference
from tests.models import save, small_cnn


def test_probe_names_the_backend(tmp_path, cuda_backend):
    env = run_gpu("probe", {}, tmp_path, TIMEOUT_S).response["env"]
    print(f"\nprobe through {env['cuda_backend']}: {env['gpu']} sm {env['compute_capability']}, CUDA {env['cuda_runtime']}")
    assert env["cuda_backend"] == cuda_backend
    assert env["gpu"] and env["memory_total_mib"] > 1024 and env["cuda_runtime"].count(".") == 1


def test_fp16_engine_runs_and_benchmarks_through_the_backend(tmp_path, cuda_backend):
    model = save(small_cnn(dynamic_batch=True), tmp_path / "small_cnn.onnx")
    inputs = eval_inputs(tmp_path / "eval.npz", [1, 8], images(np.random.default_rng(0)))
    resp = engine(engine_request(model, tmp_path / "e", "fp16",
                                 eval={"inputs": str(inputs), "outputs": str(tmp_path / "e" / "out.npz")},
                                 bench={"warmup": 10, "iterations": 50, "shape": None}), tmp_path)
    assert resp["env"]["cuda_backend"] == cuda_backend
    cos = compare(resp["eval"]["outputs"], reference(model, inputs))
    lat = resp["bench"]["latency_ms"]
    print(f"\n{cuda_backend}: cosine {cos}, mean {lat['mean']:.4f} ms, {resp['bench']['throughput_per_s']:.0f}/s")
    assert min(cos.values()) >= 0.999
    assert 0 < lat["min"] <= lat["p50"] <= lat["max"] < 1000

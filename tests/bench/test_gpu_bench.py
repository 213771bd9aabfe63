"""bench/gpu_bench.py's pure parts on CPU (the measures themselves need TensorRT and a GPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int8_summary_reads_the_timed_pairs_and_not_the_build_seconds():
    # the shape measure 3 built on the H200 (2026-12-02), where "<model>_build_s" was read as a pair
    # and the whole measure was lost to a TypeError after 161 s of builds
    out = {"resnet50_b32": {"fp16": {"per_s": 30000.0, "vs_fp16": 1.0}, "int8_qdq": {"per_s": 39000.0, "vs_fp16": 1.3},
                            "int8_calibrator": {"per_s": 42000.0, "vs_fp16": 1.4}},
           "resnet50_b128": {"fp16": {"per_s": 31000.0, "vs_fp16": 1.0}, "int8_qdq": {"per_s": 43400.0, "vs_fp16": 1.4}},
           "resnet50_build_s": {"fp16": 34.2, "int8_qdq": 51.3, "qdq_vs_fp16": 1.5}}
    summary = _gpu_bench().int8_summary(out)
    assert summary["best_int8_vs_fp16"] == {"resnet50_b32": 1.4, "resnet50_b128": 1.4}
    assert summary["resnet50_b128_int8_vs_fp16"] == 1.4 and summary["resnet50_qdq_build_vs_fp16"] == 1.5
    assert summary["ok"] is True and summary["detail"] is out
    slow = dict(out, resnet50_build_s={"fp16": 34.2, "int8_qdq": 80.0, "qdq_vs_fp16": 2.34})
    assert _gpu_bench().int8_summary(slow)["ok"] is False

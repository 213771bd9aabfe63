"""tasks/gpu/bench.py's method on CPU: the pure parts directly, the whole record through the TensorRT
and CUDA TEST DOUBLES (trt_double.py: a per-launch GPU clock of 0.25 ms, an IProfiler)."""
from __future__ import annotations

import json
from pathlib import Path

from tasks.bench_report import benchmark_summary
from tasks.gpu.bench import inferences_per_window, largest_batch_under, sweep_batches, throughput_windows
from tests.models import save, small_cnn
from tests.tasks.gpu.test_gpu_glue import _request, gpu  # noqa: F401 - the fixture

__all__ = ["gpu"]


def test_unstable_windows_run_again_and_the_steadiest_attempt_is_kept():
    times = iter([10, 30, 10, 30, 10,  # attempt 1: CoV 0.5
                  10, 10.5, 10, 10.5, 10,  # attempt 2: CoV ~0.024
                  10, 20, 10, 20, 10])  # attempt 3 never runs: 2 is within the limit
    t = throughput_windows(lambda n: next(times), per_window=100, windows=5, batch=4, cov_limit=0.05, max_reruns=2)
    assert t["reruns"] == 1 and t["stable"] and len(t["attempt_covs"]) == 2
    assert t["attempt_covs"][0] > 0.4 and t["cov"] == t["attempt_covs"][1] < 0.05
    assert t["per_s"] == round(100 * 4 * 5 * 1000 / 51.0, 3)  # all inferences over all the kept windows' time


def test_still_unstable_after_the_reruns_is_recorded_as_such():
    times = iter([10, 30] * 20)
    t = throughput_windows(lambda n: next(times), per_window=10, windows=2, batch=1, cov_limit=0.05, max_reruns=2)
    assert t["reruns"] == 2 and t["stable"] is False and t["cov"] > 0.05


def test_sweep_batches_and_the_largest_batch_under_the_target():
    assert sweep_batches(1, 8, 32) == [1, 2, 4, 8, 16, 32]
    assert sweep_batches(3, 6, 20) == [3, 4, 6, 8, 16, 20]
    assert sweep_batches(4, 4, 4) == [4]
    points = [{"batch": b, "latency_ms": {"p99": p99}} for b, p99 in [(1, 1.0), (8, 4.0), (32, 9.0)]]
    assert largest_batch_under(points, 5.0) == 8
    assert largest_batch_under(points, 0.5) is None and largest_batch_under(points, None) is None


def test_inferences_per_window_fills_the_window_within_bounds():
    assert inferences_per_window(200.0, 0.25) == 800
    assert inferences_per_window(200.0, 1000.0) == 10  # floor: a slow engine still gets a window's worth
    assert inferences_per_window(200.0, 0.0) == 200000


def test_engine_record_has_graph_fallback_sweep_and_layer_times(gpu, tmp_path):  # noqa: F811
    model = save(small_cnn(), tmp_path / "m.onnx")
    bench = {"warmup_ms": 1, "window_ms": 5, "iterations": 3, "sweep": True, "p99_target_ms": 5.0, "layer_times": True}
    b = gpu("engine", _request(model, tmp_path / "e", bench=bench), tmp_path)["bench"]
    # No CUDA driver under the doubles: the capture fails, the plain enqueue is timed, the reason kept.
    assert b["cuda_graph"]["used"] is False and b["cuda_graph"]["reason"].startswith("capture failed")
    assert b["batch"] == 8 and b["latency_ms"]["p50"] == 0.25  # the double's per-launch clock
    assert b["throughput_per_s"] == 8 * 1000 / 0.25 and b["throughput"]["windows"] == 5
    assert [p["batch"] for p in b["sweep"]["points"]] == [1, 2, 4, 8, 16, 32]
    assert [p["throughput_per_s"] for p in b["sweep"]["points"]] == [b_ * 4000.0 for b_ in (1, 2, 4, 8, 16, 32)]
    assert b["sweep"]["largest_batch_under_target"] == 32
    layers = json.loads(Path(b["layer_times"]["path"]).read_text())
    assert layers["layers"] and abs(sum(x["share"] for x in layers["layers"]) - 1) < 1e-3
    # the manifest's summary reads the real method's record
    s = benchmark_summary(b)
    assert s["cuda_graph"] is False and s["cuda_graph_fallback"] == b["cuda_graph"]["reason"]
    assert s["throughput_cov"] == 0.0 and s["stable"] is True and s["gpu_latency_ms"]["p99"] == 0.25
    assert s["sweep"]["batches"] == [1, 2, 4, 8, 16, 32] and s["sweep"]["plot"] == "sweep.png"

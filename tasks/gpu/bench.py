"""Benchmark an engine: warm-up, CUDA-event timing of each inference, latency percentiles,
throughput at the profile's opt shape, and the device memory an execution context needs.

The timed span is the engine's work on the stream (``execute_async_v3`` between two events), with
the inputs already on the GPU: what TensorRT itself costs, comparable across precisions. Inputs are
synthetic (normal floats, zero integers/bools: zero is a valid index for every gather).

Python 3.9-compatible.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tasks.errors import ModelError
from tasks.shapes import synthetic_inputs as shapes_synthetic_inputs

log = logging.getLogger("trtflow.gpu.bench")


def latency_stats(ms: Sequence[float]) -> Dict[str, float]:
    """mean/p50/p90/p99/min/max of per-iteration latencies in milliseconds."""
    if not len(ms):
        raise ValueError("no latencies to summarise")
    a = np.asarray(ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": round(float(a.mean()), 5), "p50": round(float(p50), 5), "p90": round(float(p90), 5),
            "p99": round(float(p99), 5), "min": round(float(a.min()), 5), "max": round(float(a.max()), 5)}


def synthetic_inputs(dtypes: Dict[str, np.dtype], shapes: Dict[str, List[int]], seed: int = 0) -> Dict[str, np.ndarray]:
    """Benchmark inputs by the one synthetic rule of tasks/shapes.py, integers all zero (int_high 1):
    a zero index is valid for any table, which latency does not depend on."""
    return shapes_synthetic_inputs(dtypes, shapes, seed, int_highs={n: 1 for n in shapes})


def bench_engine(runner: Any, warmup: int = 20, iterations: int = 200,
                 shape: Optional[Dict[str, List[int]]] = None) -> Dict[str, Any]:
    """Time ``runner`` (an EngineRunner) at ``shape`` (default: each input's opt shape in profile 0).

    Returns:
        The response's ``bench`` record: shape, batch, iterations, latency_ms {mean,p50,p90,p99,min,max},
        throughput_per_s (samples per second, from the first input's dim 0 and the mean latency),
        device_memory_bytes.
    """
    shapes = runner.opt_shapes(0)
    if shape:
        unknown = sorted(set(shape) - set(shapes))
        if unknown:
            raise ModelError(f"bench.shape names {', '.join(unknown)}, which the engine has no input called.",
                             fix=f"Use the engine's inputs: {', '.join(shapes)}.")
        shapes.update({k: [int(d) for d in v] for k, v in shape.items()})
    feeds = synthetic_inputs({n: runner.dtypes[n] for n in runner.inputs}, shapes)
    runner.set_inputs(feeds)
    cuda = runner.cuda
    for _ in range(max(0, int(warmup))):
        runner.launch()
    runner.stream.synchronize()
    start, end = cuda.Event(), cuda.Event()
    times: List[float] = []
    for _ in range(max(1, int(iterations))):
        start.record(runner.stream)
        runner.launch()
        end.record(runner.stream)
        end.synchronize()
        times.append(float(start.time_till(end)))
    runner.fetch()  # surfaces an asynchronous CUDA error here rather than in the next step
    first = shapes[runner.inputs[0]] if runner.inputs else []
    batch = int(first[0]) if first else 1
    stats = latency_stats(times)
    result = {"shape": shapes, "batch": batch, "iterations": len(times), "warmup": int(warmup), "latency_ms": stats,
              "throughput_per_s": round(batch * 1000.0 / stats["mean"], 3) if stats["mean"] > 0 else 0.0,
              "device_memory_bytes": runner.device_memory_bytes()}
    log.info("bench at %s: mean %.3f ms, p99 %.3f ms, %.1f samples/s", shapes, stats["mean"], stats["p99"],
             result["throughput_per_s"])
    return result

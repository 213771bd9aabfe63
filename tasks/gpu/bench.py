"""Benchmark an engine the way trtexec does, and sweep it across its profile's batch sizes.

Method (one record, ``METHOD``):

- inputs: synthetic (normal floats, zero integers/bools: zero is a valid index for every gather),
  already on the GPU for the compute figures;
- warm-up by time (``warmup_ms``), not by a count: a count is too short for a big engine (clocks
  still ramping) and wastes seconds on a small one;
- the inference is captured in a CUDA graph (``execute_async_v3`` inside stream capture) where the
  engine allows it; otherwise the plain enqueue runs, and the reason is recorded;
- throughput from enqueue-ahead windows: many inferences launched back to back on one stream between
  two events, one sync per window. The coefficient of variation (CoV) of the windows' throughputs is
  the stability figure; above ``cov_limit`` the windows run again (up to ``max_reruns``, recorded);
- GPU compute latency: events around each inference, synchronised one at a time (percentiles);
- host latency: H2D copy + compute + D2H copy from pinned buffers, with events between them, so the
  copies are reported apart;
- per-layer times (TensorRT's IProfiler) into a JSON file on request.

``sweep_batches`` picks the batch sizes of a sweep (min, powers of two, opt, max of dim 0); the
sweep records throughput, p50/p99 GPU latency and device memory per batch, and the largest batch
under an optional p99 target. Python 3.9-compatible; imports tensorrt only through the runner.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from tasks.errors import ModelError
from tasks.shapes import synthetic_inputs as shapes_synthetic_inputs

log = logging.getLogger("trtflow.gpu.bench")

METHOD = "trtflow.bench/v2: time warm-up, CUDA graph where capturable, enqueue-ahead windows, per-inference events"


def latency_stats(ms: Sequence[float]) -> Dict[str, float]:
    """mean/p50/p90/p99/min/max of per-iteration latencies in milliseconds."""
    if not len(ms):
        raise ValueError("no latencies to summarise")
    a = np.asarray(ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": round(float(a.mean()), 5), "p50": round(float(p50), 5), "p90": round(float(p90), 5),
            "p99": round(float(p99), 5), "min": round(float(a.min()), 5), "max": round(float(a.max()), 5)}


def coefficient_of_variation(values: Sequence[float]) -> float:
    """std/mean (population std); 0 for fewer than two values or a zero mean."""
    a = np.asarray(values, dtype=np.float64)
    if a.size < 2 or float(a.mean()) == 0.0:
        return 0.0
    return float(a.std() / a.mean())


def synthetic_inputs(dtypes: Dict[str, np.dtype], shapes: Dict[str, List[int]], seed: int = 0) -> Dict[str, np.ndarray]:
    """Benchmark inputs by the one synthetic rule of tasks/shapes.py, integers all zero (int_high 1):
    a zero index is valid for any table, which latency does not depend on."""
    return shapes_synthetic_inputs(dtypes, shapes, seed, int_highs={n: 1 for n in shapes})


@dataclass
class BenchSettings:
    """The ``bench`` request of the GPU protocol (tasks/spec.py ``Bench`` writes it)."""

    warmup_ms: float = 200.0
    window_ms: float = 1000.0  # total of the enqueue-ahead windows
    windows: int = 5
    iterations: int = 200  # GPU/host latency samples
    cuda_graph: bool = True
    cov_limit: float = 0.05
    max_reruns: int = 2
    layer_times: bool = False
    sweep: Union[bool, List[int]] = False
    p99_target_ms: Optional[float] = None
    shape: Optional[Dict[str, List[int]]] = None

    @classmethod
    def from_request(cls, b: Dict[str, Any]) -> "BenchSettings":
        known = {k: v for k, v in b.items() if k in cls.__dataclass_fields__ and v is not None}
        s = cls(**known)
        if s.windows < 1 or s.iterations < 1 or s.window_ms <= 0:
            raise ModelError(f"bench settings windows={s.windows}, iterations={s.iterations}, window_ms={s.window_ms} "
                             "leave nothing to time.", fix="Set bench.windows and bench.iterations >= 1, bench.window_ms > 0.")
        return s

    def for_sweep(self) -> "BenchSettings":
        """Lighter settings for each sweep point: a quarter of the time, 3 windows, <= 100 samples."""
        return BenchSettings(warmup_ms=self.warmup_ms / 4, window_ms=self.window_ms / 4, windows=3,
                             iterations=min(self.iterations, 100), cuda_graph=self.cuda_graph, cov_limit=self.cov_limit,
                             max_reruns=1)


# ---- pure parts (CPU-tested) -----------------------------------------------------------------------

def throughput_windows(run_window: Callable[[int], float], per_window: int, windows: int, batch: int,
                       cov_limit: float, max_reruns: int) -> Dict[str, Any]:
    """Enqueue-ahead throughput: ``run_window(n)`` launches n inferences back to back and returns
    the GPU milliseconds they took. Re-runs the whole set while the CoV of the windows exceeds
    ``cov_limit`` (at most ``max_reruns`` times) and keeps the steadiest attempt."""
    attempts: List[Dict[str, Any]] = []
    for _ in range(1 + max(0, int(max_reruns))):
        times = [float(run_window(per_window)) for _ in range(windows)]
        rates = [per_window * batch * 1000.0 / t if t > 0 else 0.0 for t in times]
        attempts.append({"windows_per_s": [round(r, 3) for r in rates], "cov": round(coefficient_of_variation(rates), 5),
                         "per_s": round(per_window * batch * windows * 1000.0 / sum(times), 3) if sum(times) > 0 else 0.0})
        if attempts[-1]["cov"] <= cov_limit:
            break
    best = min(attempts, key=lambda a: a["cov"])
    return {"per_s": best["per_s"], "windows_per_s": best["windows_per_s"], "cov": best["cov"],
            "stable": best["cov"] <= cov_limit, "reruns": len(attempts) - 1,
            "attempt_covs": [a["cov"] for a in attempts], "inferences_per_window": int(per_window),
            "windows": int(windows)}


def inferences_per_window(window_ms: float, per_inference_ms: float, floor: int = 10, ceiling: int = 200000) -> int:
    """How many inferences fill one window, from the warm-up's per-inference GPU time."""
    if per_inference_ms <= 0:
        return ceiling
    return int(min(ceiling, max(floor, math.ceil(window_ms / per_inference_ms))))


def sweep_batches(lo: int, opt: int, hi: int) -> List[int]:
    """min, the powers of two between, opt and max of a profile's batch dimension, ascending."""
    batches = {int(lo), int(opt), int(hi)}
    p = 1
    while p < hi:
        if p > lo:
            batches.add(p)
        p *= 2
    return sorted(b for b in batches if lo <= b <= hi)


def largest_batch_under(points: List[Dict[str, Any]], p99_target_ms: Optional[float]) -> Optional[int]:
    """The largest batch whose p99 GPU latency is within the target (None: no target or none fits)."""
    if p99_target_ms is None:
        return None
    fits = [p["batch"] for p in points if p["latency_ms"]["p99"] <= p99_target_ms]
    return max(fits) if fits else None


def shapes_at_batch(runner: Any, batch: int, base: Dict[str, List[int]]) -> Dict[str, List[int]]:
    """``base`` with dim 0 set to ``batch`` on every input whose dim 0 is dynamic in profile 0."""
    out = {}
    for name, shape in base.items():
        lo, _, hi = runner.profile_shapes(name, 0)
        out[name] = ([int(batch)] + list(shape[1:])) if shape and lo[0] != hi[0] else list(shape)
    return out


# ---- GPU parts ---------------------------------------------------------------------------------

def _gpu_ms(runner: Any, launch: Callable[[], None], count: int) -> float:
    cuda = runner.cuda
    start, end = cuda.Event(), cuda.Event()
    start.record(runner.stream)
    for _ in range(count):
        launch()
    end.record(runner.stream)
    end.synchronize()
    return float(start.time_till(end))


def warm_up(runner: Any, launch: Callable[[], None], warmup_ms: float) -> float:
    """Launch for at least ``warmup_ms`` of host time, in doubling chunks; returns GPU ms per inference."""
    deadline = time.perf_counter() + max(0.0, warmup_ms) / 1000.0
    chunk, per = 1, 0.0
    while True:
        per = _gpu_ms(runner, launch, chunk) / chunk
        if time.perf_counter() >= deadline:
            return per
        chunk = min(chunk * 2, 1024)


def graph_launcher(runner: Any, use_graph: bool):
    """(launch, {"used", "reason"}): a captured CUDA graph's launch, else the plain enqueue."""
    if not use_graph:
        return runner.launch, {"used": False, "reason": "bench.cuda_graph is false"}
    from tasks.gpu import cuda_backend

    runner.launch()  # TensorRT resolves shapes and allocations on the first enqueue: keep them out of capture
    runner.stream.synchronize()
    try:
        graph = cuda_backend.capture_graph(runner.stream, runner.launch)
    except Exception as err:  # noqa: BLE001 - any failure to capture falls back, with its reason recorded
        log.info("CUDA graph capture failed (%s); timing plain enqueues", err)
        return runner.launch, {"used": False, "reason": f"capture failed: {type(err).__name__}: {err}"[:300]}
    runner.keep(graph)  # freed with the runner
    return (lambda: graph.launch(runner.stream)), {"used": True, "reason": None}


def host_latency(runner: Any, launch: Callable[[], None], iterations: int) -> Dict[str, Dict[str, float]]:
    """Per inference: H2D copy, compute, D2H copy between four events, one sync each."""
    cuda = runner.cuda
    ev = [cuda.Event() for _ in range(4)]
    h2d, gpu, d2h, host = [], [], [], []
    for _ in range(iterations):
        ev[0].record(runner.stream)
        runner.upload()
        ev[1].record(runner.stream)
        launch()
        ev[2].record(runner.stream)
        runner.download()
        ev[3].record(runner.stream)
        ev[3].synchronize()
        h2d.append(ev[0].time_till(ev[1]))
        gpu.append(ev[1].time_till(ev[2]))
        d2h.append(ev[2].time_till(ev[3]))
        host.append(ev[0].time_till(ev[3]))
    return {"h2d_ms": latency_stats(h2d), "compute_ms": latency_stats(gpu), "d2h_ms": latency_stats(d2h),
            "host_latency_ms": latency_stats(host)}


def gpu_latency(runner: Any, launch: Callable[[], None], iterations: int) -> Dict[str, float]:
    """GPU compute latency percentiles: events around each inference, inputs already on the GPU."""
    cuda = runner.cuda
    start, end = cuda.Event(), cuda.Event()
    times = []
    for _ in range(iterations):
        start.record(runner.stream)
        launch()
        end.record(runner.stream)
        end.synchronize()
        times.append(float(start.time_till(end)))
    return latency_stats(times)


def measure(runner: Any, shapes: Dict[str, List[int]], s: BenchSettings) -> Dict[str, Any]:
    """One shape, the full method: the record's core (no sweep, no layers)."""
    runner.set_inputs(synthetic_inputs({n: runner.dtypes[n] for n in runner.inputs}, shapes))
    launch, graph = graph_launcher(runner, s.cuda_graph)
    per = warm_up(runner, launch, s.warmup_ms)
    count = inferences_per_window(s.window_ms / s.windows, per)
    first = shapes[runner.inputs[0]] if runner.inputs else []
    batch = int(first[0]) if first else 1
    tput = throughput_windows(lambda n: _gpu_ms(runner, launch, n), count, s.windows, batch, s.cov_limit, s.max_reruns)
    lat = gpu_latency(runner, launch, s.iterations)
    host = host_latency(runner, launch, s.iterations)
    runner.fetch()  # surfaces an asynchronous CUDA error here rather than in the next step
    return {"shape": shapes, "batch": batch, "iterations": s.iterations, "warmup_ms": s.warmup_ms,
            "cuda_graph": graph, "throughput_per_s": tput["per_s"], "throughput": tput, "latency_ms": lat,
            "host_latency_ms": host["host_latency_ms"], "h2d_ms": host["h2d_ms"], "d2h_ms": host["d2h_ms"],
            "device_memory_bytes": runner.device_memory_bytes(),
            "activation_bytes": runner.activation_bytes(), "io_bytes": runner.io_bytes()}


def sweep(runner: Any, base: Dict[str, List[int]], s: BenchSettings) -> Dict[str, Any]:
    """Throughput, p50/p99 and device memory per batch size; the largest batch under the p99 target."""
    first = runner.inputs[0]
    lo, opt, hi = (dims[0] for dims in runner.profile_shapes(first, 0))
    batches = sorted({int(b) for b in s.sweep if lo <= int(b) <= hi}) if isinstance(s.sweep, list) else \
        sweep_batches(lo, opt, hi)
    light = s.for_sweep()
    points = []
    for b in batches:
        m = measure(runner, shapes_at_batch(runner, b, base), light)
        points.append({"batch": b, "throughput_per_s": m["throughput_per_s"], "cov": m["throughput"]["cov"],
                       "latency_ms": {"p50": m["latency_ms"]["p50"], "p99": m["latency_ms"]["p99"]},
                       "host_latency_ms": {"p50": m["host_latency_ms"]["p50"], "p99": m["host_latency_ms"]["p99"]},
                       "cuda_graph": m["cuda_graph"]["used"], "device_memory_bytes": m["device_memory_bytes"],
                       "activation_bytes": m["activation_bytes"], "io_bytes": m["io_bytes"]})
        log.info("sweep batch %d: %.1f/s, p99 %.3f ms", b, m["throughput_per_s"], m["latency_ms"]["p99"])
    return {"input": first, "points": points, "p99_target_ms": s.p99_target_ms,
            "largest_batch_under_target": largest_batch_under(points, s.p99_target_ms)}


def layer_times(runner: Any, out_path: Path, iterations: int = 20) -> Dict[str, Any]:
    """Per-layer GPU times through TensorRT's IProfiler (plain enqueues: a profiler cannot be graphed)."""
    trt = runner.trt

    class _Profiler(trt.IProfiler):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: Dict[str, List[float]] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times.setdefault(layer_name, []).append(float(ms))

    profiler = _Profiler()
    runner.context.profiler = profiler
    for _ in range(iterations):
        runner.launch()
        runner.stream.synchronize()
    layers = [{"name": n, "mean_ms": round(float(np.mean(t)), 6), "calls": len(t)} for n, t in profiler.times.items()]
    total = sum(item["mean_ms"] for item in layers)
    for item in layers:
        item["share"] = round(item["mean_ms"] / total, 5) if total else 0.0
    out_path.write_text(json.dumps({"iterations": iterations, "total_ms": round(total, 6), "layers": layers}, indent=1))
    return {"path": str(out_path), "layers": len(layers), "total_ms": round(total, 6)}


def bench_engine(runner: Any, request: Dict[str, Any], layers_path: Optional[Path] = None) -> Dict[str, Any]:
    """Benchmark ``runner`` (an EngineRunner) by ``request`` (the protocol's ``bench`` dict) at its
    shape (default: each input's opt shape in profile 0); sweep and layer times where asked.

    Returns:
        The response's ``bench`` record (see ``measure``), plus ``method``, ``sweep`` (or None) and
        ``layer_times`` (or None).
    """
    s = BenchSettings.from_request(request)
    shapes = runner.opt_shapes(0)
    if s.shape:
        unknown = sorted(set(s.shape) - set(shapes))
        if unknown:
            raise ModelError(f"bench.shape names {', '.join(unknown)}, which the engine has no input called.",
                             fix=f"Use the engine's inputs: {', '.join(shapes)}.")
        shapes.update({k: [int(d) for d in v] for k, v in s.shape.items()})
    record = dict(measure(runner, shapes, s), method=METHOD, sweep=None, layer_times=None)
    log.info("bench at %s: %.1f/s enqueue-ahead (CoV %.3f, graph %s), GPU p99 %.3f ms, host p99 %.3f ms",
             shapes, record["throughput_per_s"], record["throughput"]["cov"], record["cuda_graph"]["used"],
             record["latency_ms"]["p99"], record["host_latency_ms"]["p99"])
    if s.sweep and runner.inputs:
        record["sweep"] = sweep(runner, shapes, s)
        runner.set_inputs(synthetic_inputs({n: runner.dtypes[n] for n in runner.inputs}, shapes))
    if s.layer_times and layers_path is not None:
        record["layer_times"] = layer_times(runner, Path(layers_path))
    return record


def settings_dict(s: BenchSettings) -> Dict[str, Any]:
    """The settings as the request carries them (for scripts that build requests)."""
    return {k: v for k, v in asdict(s).items() if v is not None}


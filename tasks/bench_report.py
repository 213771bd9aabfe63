"""What readers see of an engine's benchmark: the manifest's summary, the batch sweep's table and plot.

The GPU side (tasks/gpu/bench.py) measures and returns a full record; this module, on the CPU pool,
turns it into the manifest's ``benchmark.summary`` and, when the record has a sweep, into
``sweep.md`` (a markdown table) and ``sweep.png`` (throughput, p99 latency and device memory per
batch), published beside the manifest. The plot is drawn here, not on the GPU worker, so the GPU
interpreter (Python 3.9, TensorRT) needs no plotting library.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

SWEEP_TABLE = "sweep.md"
SWEEP_PLOT = "sweep.png"
MIB = 1024 * 1024


def _pick(stats: Optional[dict], keys=("p50", "p90", "p99")) -> Optional[dict]:
    return {k: stats[k] for k in keys if k in stats} if stats else None


def benchmark_summary(bench: Optional[dict]) -> Optional[dict]:
    """The manifest's ``benchmark.summary``: graph or not, enqueue-ahead throughput and its CoV,
    GPU and host latency (H2D/D2H apart), device memory, and the sweep (None without a benchmark)."""
    if not bench:
        return None
    tput = bench.get("throughput") or {}
    graph = bench.get("cuda_graph") or {}
    sweep = bench.get("sweep")
    return {"method": bench.get("method"), "shape": bench.get("shape"), "batch": bench.get("batch"),
            "cuda_graph": bool(graph.get("used")), "cuda_graph_fallback": graph.get("reason"),
            "throughput_per_s": bench.get("throughput_per_s"), "throughput_cov": tput.get("cov"),
            "stable": tput.get("stable"), "reruns": tput.get("reruns"),
            "gpu_latency_ms": _pick(bench.get("latency_ms")), "host_latency_ms": _pick(bench.get("host_latency_ms")),
            "h2d_ms": _pick(bench.get("h2d_ms")), "d2h_ms": _pick(bench.get("d2h_ms")),
            "device_memory_bytes": bench.get("device_memory_bytes"),
            "sweep": None if not sweep else {
                "batches": [p["batch"] for p in sweep.get("points", [])],
                "p99_target_ms": sweep.get("p99_target_ms"),
                "largest_batch_under_target": sweep.get("largest_batch_under_target"),
                "table": SWEEP_TABLE, "plot": SWEEP_PLOT}}


def _f(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def sweep_rows(sweep: dict) -> List[Dict[str, str]]:
    """One row of strings per batch size (the markdown table and the Prefect table artifact)."""
    rows = []
    for p in sweep.get("points", []):
        lat, host = p.get("latency_ms") or {}, p.get("host_latency_ms") or {}
        mem = p.get("device_memory_bytes")
        rows.append({"batch": str(p["batch"]), "throughput/s": _f(p.get("throughput_per_s"), ".1f"),
                     "GPU p50 ms": _f(lat.get("p50"), ".3f"), "GPU p99 ms": _f(lat.get("p99"), ".3f"),
                     "host p99 ms": _f(host.get("p99"), ".3f"), "CoV": _f(p.get("cov"), ".3f"),
                     "CUDA graph": "yes" if p.get("cuda_graph") else "no",
                     "device MiB": _f(None if mem is None else mem / MIB, ".1f")})
    return rows


def sweep_markdown(sweep: dict) -> str:
    """The sweep as a markdown table, with the largest batch under the p99 target below it."""
    rows = sweep_rows(sweep)
    if not rows:
        return "_no sweep points_"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    target = sweep.get("p99_target_ms")
    if target is not None:
        best = sweep.get("largest_batch_under_target")
        lines += ["", f"Largest batch with GPU p99 ≤ {target} ms: "
                      + (f"**{best}**" if best is not None else "none of the swept batches")]
    return "\n".join(lines)


def sweep_plot_png(sweep: dict, path: Path, title: str) -> Path:
    """Throughput and GPU p99 latency (left) and device memory (right) against batch size, as a PNG."""
    # matplotlib's Figure API, not pyplot: no display backend is chosen and pyplot's import (about
    # half of the plot's cost, measured 1.5 s of 3.3 s on a loaded 2-core machine) is never paid.
    from matplotlib.figure import Figure

    pts = sweep.get("points", [])
    batches = [p["batch"] for p in pts]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax, mem_ax = fig.subplots(1, 2)
    ax.plot(batches, [p["throughput_per_s"] for p in pts], "o-", color="tab:blue", label="throughput")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("inferences / s (enqueue-ahead)", color="tab:blue")
    lat_ax = ax.twinx()
    lat_ax.plot(batches, [p["latency_ms"]["p99"] for p in pts], "s--", color="tab:red", label="GPU p99")
    lat_ax.set_ylabel("GPU p99 latency (ms)", color="tab:red")
    if sweep.get("p99_target_ms") is not None:
        lat_ax.axhline(sweep["p99_target_ms"], color="tab:red", linestyle=":", linewidth=1, label="p99 target")
    mem_ax.plot(batches, [(p.get("device_memory_bytes") or 0) / MIB for p in pts], "o-", color="tab:green")
    mem_ax.set_xscale("log", base=2)
    mem_ax.set_xlabel("batch size")
    mem_ax.set_ylabel("device memory (MiB)")
    for a in (ax, mem_ax):
        a.set_xticks(batches, [str(b) for b in batches])  # the swept batches, not powers of the log base
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def sweep_files(bench: Optional[dict], out_dir: Path, title: str) -> Dict[str, Path]:
    """``{"sweep.md": path, "sweep.png": path}`` written under ``out_dir`` when the benchmark has a sweep."""
    sweep = (bench or {}).get("sweep")
    if not sweep or not sweep.get("points"):
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / SWEEP_TABLE
    table.write_text(f"# {title}\n\n{sweep_markdown(sweep)}\n")
    return {SWEEP_TABLE: table, SWEEP_PLOT: sweep_plot_png(sweep, out_dir / SWEEP_PLOT, title)}

#!/usr/bin/env python3
"""Convert every zoo package with `trtflow convert` and write the zoo table.

On the GPU machine, from the repository root, after bench/zoo/export_zoo.py filled the bucket:

    TRT_PYTHON=/opt/trt/bin/trt-python PYTHONPATH=/opt/py312:. \\
        python3 bench/zoo/run_zoo.py convert --bucket /tmp/zoo --budget 540 [--only resnet50,bert_base]
    python3 bench/zoo/run_zoo.py table --bucket /tmp/zoo --out $OUT/zoo-table.md
    python3 bench/zoo/run_zoo.py table --jsonl a.jsonl b.jsonl --out docs/zoo-table.md   # later, anywhere

Each conversion runs as its own process group with a per-model timeout and within a global time
budget (a model that does not fit is skipped and recorded as skipped). ``--jobs N`` runs N at once,
each with its own PREFECT_HOME and so its own temporary Prefect server: one shared server would
hold one gpu-<id> slot (flows/gpu_slot.py) and serialise the builds. Throughputs measured that way
share the GPU with the other builds; the table says so. Each result is appended as
one JSON line to <bucket>/_zoo/results.jsonl and $OUT/zoo-results.jsonl the moment it is known,
so a machine taken away mid-run loses only the model in flight. Models already in the bucket's
results are skipped on a rerun (--redo converts them again).

Results are read back from the bucket as trtflow wrote them (README "The bucket"): latest.json ->
conversion.json (every precision tried, its gate metrics, bench, build seconds) -> each published
manifest (ONNX Runtime CPU throughput, speedup); for a failed conversion the newest status record
(_trtflow/status/<name>/*.json: the error, its fix, and the per-precision results in details).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml


def _read(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _min_metric(gate: Optional[dict], key: str) -> Optional[float]:
    values = [m.get(key) for m in ((gate or {}).get("metrics") or {}).values() if isinstance(m, dict)]
    values = [v for v in values if v is not None]
    return min(values) if values else None


def _precision_row(p: str, r: dict, manifest: Optional[dict]) -> Dict[str, Any]:
    engine, bench, gate = r.get("engine") or {}, r.get("bench") or {}, r.get("gate") or {}
    err = r.get("error") or {}
    ort = ((manifest or {}).get("benchmark") or {}).get("onnxruntime_cpu") or {}
    tput = bench.get("throughput_per_s")
    row = {"precision": p, "result": r.get("result"), "build_s": engine.get("build_seconds"),
           "gpu_s": r.get("gpu_seconds"), "cosine": _min_metric(gate, "cosine"), "top1": _min_metric(gate, "top1"),
           "throughput": tput, "ort_cpu_throughput": ort.get("throughput"),
           "speedup": (tput / ort["throughput"]) if tput and ort.get("throughput") else None,
           "gate_failures": gate.get("failures") or [], "error": err.get("message"), "fix": err.get("fix"),
           "adapt": (r.get("prepared") or {}).get("adapt") or r.get("adapt")}
    return row


def collect(bucket: Path, name: str) -> Dict[str, Any]:
    """What the bucket says about ``name``'s last conversion."""
    out: Dict[str, Any] = {"model": name}
    latest = _read(bucket / "engines" / name / "latest.json")
    statuses = sorted((bucket / "_trtflow" / "status" / name).glob("*.json"), key=lambda p: p.stat().st_mtime)
    status = _read(statuses[-1]) if statuses else None
    if status:
        out["status"] = status.get("status")
        if status.get("error"):
            out["error"], out["fix"] = status["error"].get("message"), status["error"].get("fix")
    results: Dict[str, dict] = {}
    manifests: Dict[str, dict] = {}
    if latest and latest.get("conversion"):
        conv = _read(bucket / latest["conversion"]) or {}
        results = conv.get("precisions") or {}
        out["adapt"] = conv.get("adaptations") or conv.get("adapt")
        out["notes"] = conv.get("notes")
        gpu = conv.get("gpu") or {}
        out["gpu"], out["tensorrt"] = gpu.get("gpu"), gpu.get("tensorrt")
        out["latest_reason"] = (conv.get("latest") or {}).get("reason")
        for p, r in results.items():
            if r.get("result") == "passed":
                key = (conv.get("engines") or {}).get(p, "").rsplit("/", 1)[0] + "/manifest.json"
                manifests[p] = _read(bucket / key) or {}
        out["latest_precision"] = latest.get("precision")
    if (not results) and status and status.get("error"):
        details = status["error"].get("details") or []
        # the flow puts the per-precision results first in details when every precision failed
        if details and isinstance(details[0], dict) and all(isinstance(v, dict) for v in details[0].values()):
            results = details[0]
    rows = [_precision_row(p, r, manifests.get(p)) for p, r in results.items()]
    # One ONNX Runtime CPU baseline per model (it does not depend on the precision): lend it to the
    # precisions that were not published and so have no manifest of their own.
    baseline = next((r["ort_cpu_throughput"] for r in rows if r.get("ort_cpu_throughput")), None)
    for r in rows:
        if baseline and not r.get("ort_cpu_throughput"):
            r["ort_cpu_throughput"] = baseline
            r["speedup"] = r["throughput"] / baseline if r.get("throughput") else None
    out["precisions"] = rows
    return out


def _package_inputs(pkg: Path) -> str:
    try:
        import onnx

        m = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
        return "; ".join(f"{i.name} {m_type(i)}[{','.join(str(d.dim_param or d.dim_value) for d in i.type.tensor_type.shape.dim)}]"
                         for i in m.graph.input)
    except Exception:  # noqa: BLE001 - the table can do without
        return "?"


def m_type(vi) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name


_APPEND_LOCK = threading.Lock()  # --jobs: whole lines, one writer at a time


def _append(record: dict, files: Iterable[Path]) -> None:
    line = json.dumps(record, default=str)
    with _APPEND_LOCK:
        print(line, flush=True)
        for f in files:
            f.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")


def _done(results_file: Path) -> set:
    """(model, precisions) pairs already converted: a pass with other precisions still runs."""
    if not results_file.exists():
        return set()
    out = set()
    for line in results_file.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec and not rec.get("skipped") and not rec.get("budget_cut"):  # those run again next call
            out.add((rec["model"], ",".join(rec.get("precisions_tried") or [])))
    return out


def registry_order(names: List[str]) -> List[str]:
    """The export registry's order (most telling models first), then any other package by name."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from export_zoo import ZOO

        rank = {e.name: i for i, e in enumerate(ZOO)}
    except Exception:  # noqa: BLE001 - without the registry, alphabetical order will do
        rank = {}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def _own_server_env(home: Path) -> Dict[str, str]:
    """This conversion's environment: its own PREFECT_HOME (database, temporary server) and no
    PREFECT_API_URL, so parallel conversions never share a server. The host-wide per-GPU build lock
    (flows/gpu_slot.py, TRTFLOW_GPU_LOCK_DIR) stays shared: the CPU stages overlap, the GPU builds
    queue. Builds side by side on the one H200 were far slower than one after another (2026-12-02,
    4 zoo jobs each with a lock of its own: a small CNN's FP16 build took 93 s that takes ~7 s alone,
    and TensorRT's tactic timings measured each other's load)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), TRTFLOW_HOME=str(home / "trtflow"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONUNBUFFERED="1")
    # N servers starting at once on busy cores miss Prefect's default 20 s (measured: "Timed out while
    # attempting to connect to ephemeral Prefect API server" with two jobs on a loaded 2-core machine)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    return env


def convert_one(bucket: Path, pkg: Path, precisions: List[str], timeout: float, log_dir: Optional[Path]) -> dict:
    cmd = [sys.executable, "-m", "flows.cli", "convert", str(pkg)]
    for p in precisions:
        cmd += ["-p", p]
    cmd += ["--strategy", "all", "--json", "--force", "-v"]  # -v: stage lines in the log, for where time goes
    home = Path(tempfile.mkdtemp(prefix=f"zoo-prefect-{pkg.name}-"))
    try:
        return _convert_in(bucket, pkg, precisions, timeout, log_dir, cmd, _own_server_env(home))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _convert_in(bucket: Path, pkg: Path, precisions: List[str], timeout: float, log_dir: Optional[Path],
                cmd: List[str], env: Dict[str, str]) -> dict:
    t0 = time.monotonic()
    log = (log_dir / f"{pkg.name}.log") if log_dir else Path(os.devnull)
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            # The flow and its tasks.gpu child share the session: end them together, by group id.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, timed_out = proc.returncode, True
    try:
        record = collect(bucket, pkg.name)
    except Exception as err:  # noqa: BLE001 - a record we cannot read must not stop the zoo
        record = {"model": pkg.name, "precisions": [], "error": f"could not read the results: {err!r}"}
    record.update({"wall_s": round(time.monotonic() - t0, 1), "rc": rc, "timed_out": timed_out,
                   "precisions_tried": precisions, "inputs": _package_inputs(pkg), "build": _build_knobs(pkg)})
    if timed_out:
        record["error"] = f"killed after {timeout:.0f} s (per-model timeout / global budget)"
    if not record["precisions"]:  # failed before any precision was recorded: one row each, same reason
        record["precisions"] = [{"precision": p, "result": "failed", "error": record.get("error") or f"rc {rc}",
                                 "fix": record.get("fix")} for p in precisions]
    return record


def _build_knobs(pkg: Path) -> Dict[str, Any]:
    """The package's build section (optimisation level, workspace, timeout), for the table."""
    try:
        spec = yaml.safe_load((pkg / "trtflow.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in (spec.get("build") or {}).items()
            if k in ("optimization_level", "workspace_mib", "timeout_s")}


def plan_jobs(bucket: Path, args) -> List[tuple]:
    """(package, precisions) still to convert, in registry order (or --only's)."""
    results_file = bucket / "_zoo" / "results.jsonl"
    only = [n for n in args.only.split(",") if n]
    # a package is complete once export wrote its trtflow.yaml (last); a half-exported one waits
    by_name = {p.name: p for p in (bucket / "models").iterdir() if (p / "trtflow.yaml").is_file()}
    pkgs = [by_name[n] for n in registry_order(list(by_name))]
    if only:
        missing = [n for n in only if n not in by_name]
        if missing:  # not exported (yet): the others still convert; a rerun picks these up
            print(f"not in {bucket}/models, left out: {missing}", file=sys.stderr)
        pkgs = [by_name[n] for n in only if n in by_name]  # the order asked for
    done = set() if args.redo else _done(results_file)
    todo = []
    for pkg in pkgs:
        spec = yaml.safe_load((pkg / "trtflow.yaml").read_text()) or {}
        wanted = spec.get("precisions") or ["fp16"]
        # --precisions narrows to those the entry tries (int8 only where the spec names it)
        precisions = [p for p in args.precisions.split(",") if p in wanted] if args.precisions else wanted
        if precisions and (pkg.name, ",".join(precisions)) not in done:
            todo.append((pkg, precisions))
    return todo


def run_convert(args) -> int:
    bucket = args.bucket
    results_file = bucket / "_zoo" / "results.jsonl"
    out_files = [results_file] + ([Path(os.environ["OUT"]) / "zoo-results.jsonl"] if os.environ.get("OUT") else [])
    log_dir = Path(os.environ["OUT"]) / "zoo-logs" if os.environ.get("OUT") else bucket / "_zoo" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        todo = plan_jobs(bucket, args)
    except SystemExit as err:
        print(err, file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget
    # N conversions share the cores: each CPU stage's ONNX Runtime gets its share, without spinning
    # (tasks/cpu_threads.py; 8 jobs with ORT's all-core default starved every INT8 calibration)
    os.environ.setdefault("TRTFLOW_CPU_THREADS", str(max(2, (os.cpu_count() or 2) // max(1, args.jobs))))

    def one(job: tuple) -> None:
        pkg, precisions = job
        left = deadline - time.monotonic()
        if left < args.min_seconds:
            _append({"model": pkg.name, "skipped": f"global budget: {left:.0f} s left of {args.budget:.0f} s "
                                                   f"(needs at least {args.min_seconds:.0f} s)"}, out_files)
            return
        record = convert_one(bucket, pkg, precisions, min(args.per_model, left), log_dir)
        record["jobs"] = args.jobs
        if record.get("timed_out") and left < args.per_model:
            record["budget_cut"] = True  # the call's budget ran out, not the model's own timeout
        _append(record, out_files)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, todo))
    return 0


# ---- the table ----------------------------------------------------------------------------------
def _f(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _result_text(r: dict) -> str:
    res = r.get("result") or "?"
    if res == "passed":
        return "published"
    if res == "failed-gate":
        return "failed gate: " + "; ".join(r.get("gate_failures") or [])[:120]
    fix = f" Fix: {r['fix'][:160]}" if r.get("fix") else ""
    return "failed: " + (r.get("error") or "?")[:160] + fix


def table_preamble(records: List[dict]) -> List[str]:
    """Date, GPU, TensorRT, the build knobs and how many conversions shared the GPU."""
    def seen(key: str) -> str:
        values = sorted({str(r.get(key)) for r in records if r.get(key)})
        return ", ".join(values) or "?"

    knobs = sorted({", ".join(f"{k} {v}" for k, v in sorted((r.get("build") or {}).items()))
                    for r in records if r.get("build")})
    jobs = max([int(r.get("jobs") or 1) for r in records] or [1])
    lines = [f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {seen('gpu')}, TensorRT {seen('tensorrt')}; "
             f"build: {'; '.join(knobs) or 'spec defaults'}.", ""]
    if jobs > 1:
        lines += [f"Up to {jobs} conversions ran at once on this one GPU (bench/zoo/run_zoo.py --jobs {jobs}): "
                  "build seconds and TensorRT throughputs were measured while other zoo builds shared the GPU, "
                  "so they understate what a GPU of its own gives.", ""]
    return lines


def table(records: List[dict]) -> str:
    latest: Dict[str, dict] = {}
    for rec in records:  # per model and precision, the last line wins (passes may differ in precisions)
        prev = latest.get(rec["model"])
        if prev is None or rec.get("skipped") or not rec.get("precisions"):
            if prev is None or not prev.get("precisions"):
                latest[rec["model"]] = rec
            continue
        merged = {r["precision"]: r for r in prev.get("precisions") or []}
        merged.update({r["precision"]: r for r in rec["precisions"]})
        latest[rec["model"]] = dict(rec, precisions=list(merged.values()),
                                    precisions_tried=sorted(merged))
    head = ("| model | inputs | precision | result | build s | cosine | top-1 | TRT /s | ORT CPU /s | speedup |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = table_preamble(list(latest.values())) + [head]
    for name, rec in latest.items():
        if rec.get("skipped"):
            lines.append(f"| {name} | | | skipped: {rec['skipped']} | | | | | | |")
            continue
        rows = rec.get("precisions") or []
        if not rows:
            why = (rec.get("error") or "no result recorded")[:200]
            fix = f" Fix: {rec['fix'][:200]}" if rec.get("fix") else ""
            lines.append(f"| {name} | {rec.get('inputs', '')} | {','.join(rec.get('precisions_tried') or [])} | "
                         f"failed: {why}{fix} | | | | | | |")
            continue
        for i, r in enumerate(rows):
            lines.append("| " + " | ".join([
                name if i == 0 else "", rec.get("inputs", "") if i == 0 else "", r["precision"], _result_text(r),
                _f(r.get("build_s") or r.get("gpu_s"), ".1f"), _f(r.get("cosine"), ".5f"), _f(r.get("top1"), ".3f"),
                _f(r.get("throughput"), ".0f"), _f(r.get("ort_cpu_throughput"), ".1f"),
                "—" if r.get("speedup") is None else f"{r['speedup']:.1f}×"]) + " |")
    published_fp16 = sum(1 for rec in latest.values()
                         if any(r["precision"] == "fp16" and r.get("result") == "passed" for r in rec.get("precisions") or []))
    published_int8 = sum(1 for rec in latest.values()
                         if any(r["precision"] == "int8" and r.get("result") == "passed" for r in rec.get("precisions") or []))
    lines += ["", f"FP16 published and passing: {published_fp16} of {len(latest)} models; "
                  f"INT8 published and passing: {published_int8}."]
    return "\n".join(lines) + "\n"


def run_table(args) -> int:
    files = args.jsonl or [args.bucket / "_zoo" / "results.jsonl"]
    records = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    text = table(records)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--bucket", type=Path, default=Path("/tmp/zoo"))
    c.add_argument("--only", default="")
    c.add_argument("--precisions", default="", help="override the spec's, e.g. fp16")
    c.add_argument("--budget", type=float, default=540.0, help="seconds for this whole call")
    c.add_argument("--per-model", type=float, default=420.0, help="seconds for one model's conversion")
    c.add_argument("--min-seconds", type=float, default=45.0, help="do not start a model with less time left")
    c.add_argument("--redo", action="store_true")
    c.add_argument("--jobs", type=int, default=1, help="conversions at once, each with its own Prefect server")
    t = sub.add_parser("table")
    t.add_argument("--bucket", type=Path, default=Path("/tmp/zoo"))
    t.add_argument("--jsonl", type=Path, nargs="*")
    t.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    return run_convert(args) if args.cmd == "convert" else run_table(args)


if __name__ == "__main__":
    sys.exit(main())

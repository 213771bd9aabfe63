"""Publication: engines, manifests, ``latest.json`` and status records in the bucket.

Order matters: every engine's files go up before its manifest, the conversion record after all
engines, and ``latest.json`` last, so a reader that follows ``latest.json`` never meets a
half-published engine. Status records (``_trtflow/status/<name>/<sha>.json``) are written for every
outcome, failures included, with the reason and its fix.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from tasks.bench_report import benchmark_summary
from tasks.errors import TrtflowError
from tasks.package import EngineAddress, latest_key, status_key
from tasks.storage import Storage

MANIFEST_SCHEMA = "trtflow.manifest/v1"
CONVERSION_SCHEMA = "trtflow.conversion/v1"
LATEST_SCHEMA = "trtflow.latest/v1"
STATUS_SCHEMA = "trtflow.status/v1"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class PublishedEngine:
    precision: str
    prefix: str
    engine_key: str
    manifest_key: str
    engine_url: str
    manifest: dict = field(repr=False, default_factory=dict)


def reproduce_script(request: dict, model_url: str, interpreter: str) -> str:
    """A shell script that rebuilds this engine from the bucket with the exact request."""
    req = json.dumps(request, indent=2, sort_keys=True)
    return f"""#!/usr/bin/env bash
# Rebuild this engine exactly as trtflow did. Needs the model and a GPU worker's interpreter.
#   TRT_PYTHON (default below) must import tensorrt; run from a trtflow checkout (tasks/gpu).
set -euo pipefail
TRT_PYTHON=${{TRT_PYTHON:-{shlex.quote(interpreter)}}}
work=$(mktemp -d)
# 1. the model (and its package) as it was converted:
#    aws s3 cp {shlex.quote(model_url)} "$work/model.onnx"   (or cp from the local bucket)
cat > "$work/request.json" <<'REQUEST'
{req}
REQUEST
# 2. paths in the request are relative to $work
cd "$work" && "$TRT_PYTHON" -m tasks.gpu engine request.json response.json && cat response.json
"""


def build_manifest(*, name: str, package, spec, gpu_env: dict, precision: str, engine: dict, accuracy: dict,
                   gate: dict, bench: Optional[dict], ort_bench: Optional[dict], calibration: Optional[dict],
                   validation: dict, build_options: dict, flow_run_id: Optional[str], spec_key: str,
                   layers: Optional[dict] = None, timing_cache: Optional[dict] = None) -> dict:
    """The manifest of one engine (schema ``trtflow.manifest/v1``)."""
    speedup = None
    if bench and ort_bench and bench.get("throughput_per_s") and ort_bench.get("throughput"):
        speedup = bench["throughput_per_s"] / ort_bench["throughput"]
    return {
        "schema": MANIFEST_SCHEMA,
        "name": name,
        "precision": precision,
        "model": {"uri": package.source_uri, "sha256": package.model_sha256, "etag": package.model_etag,
                  "bytes": package.model_size, "ir_version": validation.get("ir_version"),
                  "opsets": validation.get("opsets"), "inputs": validation.get("inputs"),
                  "outputs": validation.get("outputs")},
        "engine": {"sha256": engine.get("sha256"), "bytes": engine.get("bytes"),
                   "profiles": engine.get("profiles"), "io": engine.get("io"),
                   "strongly_typed": engine.get("strongly_typed"), "builder_flags": engine.get("builder_flags"),
                   "typing": engine.get("typing"), "deprecations": engine.get("deprecations") or [],
                   "layer_precisions": (layers or {}).get("precisions")},
        "target": {"tensorrt": gpu_env.get("tensorrt"), "cuda_runtime": gpu_env.get("cuda_runtime"),
                   "driver": gpu_env.get("driver"), "gpu": gpu_env.get("gpu"),
                   "compute_capability": gpu_env.get("compute_capability"), "sm": gpu_env.get("sm"),
                   "key": gpu_env.get("target")},
        "build": {"options": build_options, "seconds": engine.get("build_seconds"), "spec_key": spec_key,
                  "timing_cache": timing_cache},
        "calibration": calibration,
        "accuracy": {"metrics": accuracy, "gate": gate},
        # "tensorrt" is the GPU side's full record; "summary" the figures readers look for (added in v1).
        "benchmark": {"tensorrt": bench, "onnxruntime_cpu": ort_bench, "speedup_vs_ort_cpu": speedup,
                      "summary": benchmark_summary(bench)},
        "spec": spec.model_dump(mode="json"),
        "flow_run_id": flow_run_id,
        "created_at": now(),
    }


def publish_engine(storage: Storage, address: EngineAddress, precision: str, files: Dict[str, Path],
                   manifest: dict) -> PublishedEngine:
    """Upload an engine's files, then its manifest (content-addressed by model sha, target and spec).

    Args:
        files: bucket file name -> local path; must hold ``model.plan``; may hold build.log,
            layers.json, reproduce.sh, request.json.
    """
    prefix = address.engine_prefix(precision)
    for fname, path in sorted(files.items(), key=lambda kv: kv[0] != "model.plan"):
        if path is not None and Path(path).exists():
            storage.upload(Path(path), prefix + fname)
    manifest = dict(manifest, files={f: prefix + f for f, p in files.items() if p is not None and Path(p).exists()})
    storage.write_json(prefix + "manifest.json", manifest)
    return PublishedEngine(precision, prefix, prefix + "model.plan", prefix + "manifest.json",
                           storage.url(prefix + "model.plan"), manifest)


def write_conversion(storage: Storage, address: EngineAddress, record: dict) -> str:
    key = address.conversion_key
    storage.write_json(key, dict(record, key=key, schema=CONVERSION_SCHEMA, written_at=now()))
    return key


def read_conversion(storage: Storage, address: EngineAddress) -> Optional[dict]:
    """The finished conversion for this exact model, spec, TensorRT and GPU, if one exists (cache hit)."""
    return storage.read_json(address.conversion_key)


def write_latest(storage: Storage, address: EngineAddress, best: PublishedEngine, conversion: str,
                 flow_run_id: Optional[str]) -> dict:
    """Point ``latest.json`` at the best engine for ``target``, keeping other targets' entries.

    Written last. Readers pick their GPU/TensorRT target; ``default`` is the newest target written.
    """
    key = latest_key(address.name)
    current = storage.read_json(key) or {}
    targets = dict(current.get("targets") or {})
    entry = {"model_sha256": address.model_sha, "precision": best.precision, "engine": best.engine_key,
             "manifest": best.manifest_key, "conversion": conversion, "flow_run_id": flow_run_id,
             "published_at": now()}
    targets[address.target] = entry
    latest = {"schema": LATEST_SCHEMA, "name": address.name, "default": address.target, "targets": targets, **entry}
    storage.write_json(key, latest)
    return latest


def write_status(storage: Storage, *, name: str, model_sha: str, status: str, stage: Optional[str] = None,
                 error: Optional[BaseException] = None, flow_run_id: Optional[str] = None,
                 extra: Optional[dict] = None) -> str:
    """Record where a conversion stands (``running``, ``waiting``, ``published``, ``cached``, ``failed``).

    ``waiting`` carries a ``message`` (e.g. "waiting for a GPU worker (pool gpu has none online)").
    """
    record = {"schema": STATUS_SCHEMA, "name": name, "model_sha256": model_sha, "status": status, "stage": stage,
              "flow_run_id": flow_run_id, "updated_at": now()}
    if error is not None:
        if isinstance(error, TrtflowError):
            record["error"] = error.to_dict()
        else:
            record["error"] = {"kind": "infra", "message": f"{type(error).__name__}: {error}", "fix": None,
                               "details": [], "retriable": True}
    if extra:
        record.update(extra)
    key = status_key(name, model_sha)
    storage.write_json(key, record)
    return key


def list_statuses(storage: Storage) -> List[dict]:
    from tasks.package import STATUS_PREFIX

    out = []
    for obj in storage.list(STATUS_PREFIX):
        if obj.key.endswith(".json"):
            try:
                out.append(json.loads(storage.read_bytes(obj.key)))
            except ValueError:
                continue
    return out

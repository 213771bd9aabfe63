"""Publication: engines, manifests, ``latest.json`` and status records in the bucket.

Order matters: every engine's files go up before its manifest, the conversion record after all
engines, and ``latest.json`` last, so a reader that follows ``latest.json`` never meets a
half-published engine. Engines and manifests are never overwritten: they live under their
engine's sha256 (``tasks.package.engine_prefix``) and are written only where nothing is yet, so
a forced or concurrent rebuild that makes other bytes writes other keys, and one that makes the
same bytes finds them there. ``latest.json`` names the engine of the newest upload of the
package (see :func:`write_latest`). Status records (``_trtflow/status/<name>/<sha>.json``) are written for every
outcome, failures included, with the reason and its fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import ContextManager, Dict, List, Optional

import psutil

from tasks.bench_report import benchmark_summary
from tasks.errors import TrtflowError
from tasks.package import EngineAddress, latest_key, status_key
from tasks.secrets import scrub
from tasks.storage import Storage, sha256_file

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
                   "layer_precisions": (layers or {}).get("precisions"),
                   "layer_note": (layers or {}).get("note")},  # e.g. an INT8 engine that runs no INT8 layer
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
    """Upload an engine's files, then its manifest, under the engine's sha256; nothing is overwritten.

    Args:
        files: bucket file name -> local path; must hold ``model.plan``; may hold build.log,
            layers.json, reproduce.sh, request.json.
    """
    engine_sha = sha256_file(Path(files["model.plan"]))
    prefix = address.engine_prefix(precision, engine_sha)
    present = [f for f, p in files.items() if p is not None and Path(p).exists()]
    for fname in sorted(present, key=lambda f: f != "model.plan"):  # the engine first
        _write_once(storage, prefix + fname, lambda key, f=fname: storage.upload(Path(files[f]), key))
    manifest = dict(manifest, files={f: prefix + f for f in present})
    manifest["engine"] = dict(manifest.get("engine") or {}, sha256=engine_sha)
    key = prefix + "manifest.json"
    if not _write_once(storage, key, lambda k: storage.write_json(k, manifest)):
        manifest = storage.read_json(key) or manifest  # the same engine was published before: keep its manifest
    return PublishedEngine(precision, prefix, prefix + "model.plan", key, storage.url(prefix + "model.plan"), manifest)


def _write_once(storage: Storage, key: str, write) -> bool:
    """Write ``key`` unless it exists. The key is content-addressed, so an existing object holds the
    same engine; the per-version conversion lock (flows.convert) keeps two writers off one folder,
    so head-then-write needs no conditional put (which LocalStorage and moto lack)."""
    if storage.head(key) is not None:
        return False
    write(key)
    return True


def write_conversion(storage: Storage, address: EngineAddress, record: dict) -> str:
    """Write the run's record under its own sha256, then ``conversion.json`` (the cache-hit index) as
    a copy of it. Returns the immutable key (what latest.json names)."""
    body = dict(record, schema=CONVERSION_SCHEMA, written_at=now(), index=address.conversion_key)
    sha = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    key = address.conversion_record_key(sha)
    storage.write_json(key, dict(body, key=key))
    storage.write_json(address.conversion_key, dict(body, key=key))
    return key


def read_conversion(storage: Storage, address: EngineAddress) -> Optional[dict]:
    """The finished conversion for this exact package, spec, TensorRT and GPU, if one exists (cache hit)."""
    return storage.read_json(address.conversion_key)


def crashed_precisions(record: dict) -> List[str]:
    """Precisions of a conversion record that ended in an infrastructure error (crash, OOM, lost worker).

    Such a record is no cache hit: the crash happened to that run, not to the model, so the next run
    with the same identity builds them again and decides latest anew.
    """
    return [p for p, r in (record.get("precisions") or {}).items()
            if r.get("result") == "failed" and (r.get("error") or {}).get("kind") == "infra"]


def published_from_record(storage: Storage, record: dict) -> PublishedEngine:
    """The best engine a conversion record names (to re-assert latest.json on a cache hit)."""
    best = record["latest"]
    return PublishedEngine(best["precision"], best["engine"].rsplit("/", 1)[0] + "/", best["engine"],
                           best["manifest"], storage.url(best["engine"]))


def write_latest(storage: Storage, address: EngineAddress, best: PublishedEngine, conversion: str,
                 flow_run_id: Optional[str], uploaded_at: str = "",
                 lock: Optional[ContextManager] = None) -> dict:
    """Point ``latest.json``'s ``address.target`` entry at ``best`` unless a newer upload is already there.

    "Newest" is the package's upload time (``uploaded_at``, newest LastModified of its files), not
    the order in which runs finish: an older upload's run that ends last leaves latest alone, and a
    revert (older bytes uploaded again: a newer upload of known content) wins. Equal times (a forced
    rebuild of the same upload) take the newer run. Other targets' entries are kept; ``default`` is
    the target written last. ``lock`` guards the read-modify-write against concurrent writers
    (flows.convert passes a per-package Prefect concurrency limit). Returns what latest.json holds.
    """
    key = latest_key(address.name)
    with lock or nullcontext():
        current = storage.read_json(key) or {}
        targets = dict(current.get("targets") or {})
        held = targets.get(address.target) or {}
        if uploaded_at and (held.get("uploaded_at") or "") > uploaded_at:
            return current
        entry = {"model_sha256": address.model_sha, "package_sha256": address.package_sha,
                 "uploaded_at": uploaded_at, "precision": best.precision, "engine": best.engine_key,
                 "manifest": best.manifest_key, "conversion": conversion, "flow_run_id": flow_run_id,
                 "published_at": now()}
        targets[address.target] = entry
        latest = {"schema": LATEST_SCHEMA, "name": address.name, "default": address.target, "targets": targets,
                  **entry}
        storage.write_json(key, latest)
    return latest


OWNED_STATUSES = ("running", "waiting")  # a live conversion process stands behind these


def write_status(storage: Storage, *, name: str, model_sha: str, status: str, stage: Optional[str] = None,
                 error: Optional[BaseException] = None, flow_run_id: Optional[str] = None,
                 extra: Optional[dict] = None) -> str:
    """Record where a conversion stands (``running``, ``waiting``, ``published``, ``cached``, ``failed``,
    ``cancelled``, ``crashed``).

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
    if status in OWNED_STATUSES:
        # Who is converting, so a reader can tell a live run from one killed without a word (SIGKILL
        # of a directly run `trtflow convert`; under a worker the runner's on_crashed hook records it).
        record["owner"] = {"host": socket.gethostname(), "pid": os.getpid(),
                           "create_time": psutil.Process().create_time()}
    if extra:
        record.update(extra)
    record = scrub(record)  # error messages and log lines may quote a credential
    key = status_key(name, model_sha)
    storage.write_json(key, record)
    return key


def list_statuses(storage: Storage, name: Optional[str] = None) -> List[dict]:
    """Every status record in the bucket, or only model ``name``'s."""
    from tasks.package import STATUS_PREFIX, check_name

    out = []
    for obj in storage.list(STATUS_PREFIX + (check_name(name) + "/" if name else "")):
        if obj.key.endswith(".json"):
            try:
                out.append(json.loads(storage.read_bytes(obj.key)))
            except ValueError:
                continue
    return out

"""The TensorRT stage as the flow sees it: prepare a request, run tasks/gpu in its subprocess, keep
the bucket's timing and calibration caches in step. Never imports tensorrt.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tasks.errors import TrtflowError
from tasks.gpu_client import GpuEnv, run_gpu
from tasks.package import calib_cache_key, timing_cache_key
from tasks.spec import ModelSpec
from tasks.storage import Storage

log = logging.getLogger("trtflow.engine")


@dataclass
class EngineOutcome:
    """One engine built (and run on the eval inputs, and timed) by the GPU subprocess."""

    precision: str
    onnx_path: Path
    out_dir: Path
    response: dict
    request: dict
    log_path: Path
    seconds: float
    files: Dict[str, Path] = field(default_factory=dict)

    @property
    def engine(self) -> dict:
        return self.response.get("engine") or {}

    @property
    def eval_outputs(self) -> Optional[Path]:
        ev = self.response.get("eval") or {}
        return Path(ev["outputs"]) if ev.get("outputs") else None


def engine_request(*, onnx_path: Path, out_dir: Path, precision: str, spec: ModelSpec, profiles: List[dict],
                   int8_mode: Optional[str] = None, graph_precision: str = "fp32",
                   eval_inputs: Optional[Path] = None, calibration: Optional[dict] = None,
                   timing_cache_in: Optional[Path] = None, timing_cache_out: Optional[Path] = None) -> dict:
    """The JSON request of the ``engine`` verb (see tasks/gpu/__main__.py)."""
    b = spec.build
    return {
        "onnx_path": str(onnx_path), "out_dir": str(out_dir), "precision": precision, "int8_mode": int8_mode,
        "graph_precision": graph_precision, "profiles": profiles,
        "default_opt_batch": b.default_opt_batch, "default_max_batch": b.default_max_batch,
        "workspace_mib": b.workspace_mib, "optimization_level": b.optimization_level,
        "hardware_compatibility": b.hardware_compatibility, "version_compatible": b.version_compatible,
        "timing_cache_in": str(timing_cache_in) if timing_cache_in else None,
        "timing_cache_out": str(timing_cache_out) if timing_cache_out else None,
        "calibration": calibration,
        "eval": {"inputs": str(eval_inputs), "outputs": str(Path(out_dir) / "eval_outputs.npz")} if eval_inputs else None,
        "bench": {"warmup": spec.bench.warmup, "iterations": spec.bench.iterations} if spec.bench.enabled else None,
        "verbose": False,
    }


def _portable(request: dict) -> dict:
    """The request as stored beside the engine: local paths made relative to the rebuild folder."""
    portable = json.loads(json.dumps(request))
    portable.update(onnx_path="model.onnx", out_dir=".", timing_cache_in=None, timing_cache_out=None)
    if portable.get("eval"):
        portable["eval"] = None
    if portable.get("calibration"):
        portable["calibration"] = dict(portable["calibration"], batches=["calibration/<batch files>.npz"],
                                       cache_in="calibration.cache", cache_out="calibration.cache")
    return portable


def fetch_timing_cache(storage: Storage, env: GpuEnv, workdir: Path) -> tuple:
    """Download the bucket's timing cache for this GPU + TensorRT. Returns (path or None, etag or None)."""
    key = timing_cache_key(env.target)
    info = storage.head(key)
    if info is None:
        return None, None
    dest = Path(workdir) / "timing-cache.in"
    storage.download(key, dest)
    return dest, info.etag


def store_timing_cache(storage: Storage, env: GpuEnv, new_cache: Path, base_etag: Optional[str], workdir: Path,
                       timeout_s: float) -> str:
    """Upload the cache a build produced, merging with one another build wrote meanwhile.

    TensorRT can combine timing caches (ITimingCache.combine); the merge runs in the GPU
    interpreter. If the bucket's copy changed since this build downloaded it, we merge the two
    before writing, so concurrent builds add to the cache instead of dropping each other's entries.
    """
    key = timing_cache_key(env.target)
    current = storage.head(key)
    if current is not None and current.etag != base_etag:
        theirs = Path(workdir) / "timing-cache.theirs"
        storage.download(key, theirs)
        merged = Path(workdir) / "timing-cache.merged"
        try:
            run_gpu("merge-cache", {"caches": [str(theirs), str(new_cache)], "out": str(merged)}, workdir, timeout_s,
                    log_name="merge-cache.log")
            new_cache = merged
            log.info("timing cache %s changed during the build; merged both", key)
        except TrtflowError as err:
            # Ours already holds every entry of the copy we started from; only the other build's new
            # entries are lost, and its next build adds them again. A cache is an accelerator, never
            # a reason to fail a conversion.
            log.warning("timing cache %s: merging with a concurrent build's copy failed (%s); keeping ours",
                        key, err.message.splitlines()[0])
    storage.upload(new_cache, key)
    return key


def calibrator_cache(storage: Storage, *, name: str, model_sha: str, data_sha: str, env: GpuEnv,
                     workdir: Path) -> tuple:
    """(local cache_in or None, bucket key) of the implicit calibrator's cache."""
    key = calib_cache_key(name, model_sha, data_sha, env.target)
    if storage.head(key) is None:
        return None, key
    dest = Path(workdir) / "calibration.cache.in"
    storage.download(key, dest)
    return dest, key


def engine_from_onnx(storage: Storage, *, env: GpuEnv, spec: ModelSpec, onnx_path: Path, precision: str,
                     profiles: List[dict], workdir: Path, eval_inputs: Optional[Path] = None,
                     int8_mode: Optional[str] = None, graph_precision: str = "fp32",
                     calibration: Optional[dict] = None, model_url: str = "") -> EngineOutcome:
    """Build one engine in the GPU subprocess (plus eval run and benchmark) and sync the caches."""
    from tasks.publish import reproduce_script

    out_dir = Path(workdir) / f"engine-{precision}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_in, cache_etag = (None, None)
    cache_out = None
    if spec.build.timing_cache:
        cache_in, cache_etag = fetch_timing_cache(storage, env, out_dir)
        cache_out = out_dir / "timing-cache.out"
    request = engine_request(onnx_path=onnx_path, out_dir=out_dir, precision=precision, spec=spec, profiles=profiles,
                             int8_mode=int8_mode, graph_precision=graph_precision, eval_inputs=eval_inputs,
                             calibration=calibration, timing_cache_in=cache_in, timing_cache_out=cache_out)
    call = run_gpu("engine", request, out_dir, spec.build.timeout_s)
    if cache_out is not None and cache_out.exists():
        store_timing_cache(storage, env, cache_out, cache_etag, out_dir, spec.build.timeout_s)
    if calibration and calibration.get("cache_key") and Path(calibration["cache_out"]).exists() \
            and not calibration.get("cache_in"):
        storage.upload(Path(calibration["cache_out"]), calibration["cache_key"])  # reused by the next build
    (out_dir / "request.json").write_text(json.dumps(_portable(request), indent=2, sort_keys=True))
    (out_dir / "reproduce.sh").write_text(reproduce_script(_portable(request), model_url, env.interpreter))
    files = {"model.plan": out_dir / "model.plan", "build.log": call.log_path, "request.json": out_dir / "request.json",
             "reproduce.sh": out_dir / "reproduce.sh"}
    layers = (call.response.get("layers") or {}).get("path")
    if layers and Path(layers).exists():
        files["layers.json"] = Path(layers)
    return EngineOutcome(precision, Path(onnx_path), out_dir, call.response, request, call.log_path, call.seconds, files)

"""The TensorRT stage as the flows see it: prepare a request, run tasks/gpu in its subprocess, keep
the bucket's timing and calibration caches in step. Never imports tensorrt.

One build crosses hosts through the bucket's work prefix (tasks.package.work_prefix): convert-model
(CPU pool) writes the build's inputs with :func:`stage_build_inputs`; build-engine (GPU pool) reads
them with :func:`fetch_build_inputs`, builds, and writes :func:`store_build_outputs` (or
:func:`store_build_error`); convert-model reads them back with :func:`fetch_build_outputs` and
finally :func:`remove_work`. The same code runs when both flows share one process.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tasks.errors import InfraError, TrtflowError
from tasks.secrets import scrub
from tasks.gpu_client import GpuEnv, run_gpu
from tasks.identity import get_checked, put_checked
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
        "bench": spec.bench.gpu_request(),
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
    if get_checked(storage, key, dest) is None:  # tampered or torn: build without it, then replace it
        return None, info.etag
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
    put_checked(storage, key, new_cache)
    return key


def calibrator_cache(storage: Storage, *, name: str, model_sha: str, data_sha: str, target: Optional[str],
                     workdir: Path) -> tuple:
    """(local cache_in or None, bucket key or None) of the implicit calibrator's cache.

    The cache belongs to one GPU + TensorRT (``target``); with no target known yet there is none.
    """
    if not target:
        return None, None
    key = calib_cache_key(name, model_sha, data_sha, target)
    dest = Path(workdir) / "calibration.cache.in"
    if get_checked(storage, key, dest) is None:  # none, or not the bytes recorded: calibrate again
        return None, key
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
        put_checked(storage, calibration["cache_key"], Path(calibration["cache_out"]))  # reused by the next build
    (out_dir / "request.json").write_text(json.dumps(_portable(request), indent=2, sort_keys=True))
    (out_dir / "reproduce.sh").write_text(reproduce_script(_portable(request), model_url, env.interpreter))
    files = {"model.plan": out_dir / "model.plan", "build.log": call.log_path, "request.json": out_dir / "request.json",
             "reproduce.sh": out_dir / "reproduce.sh"}
    layers = (call.response.get("layers") or {}).get("path")
    if layers and Path(layers).exists():
        files["layers.json"] = Path(layers)
    return EngineOutcome(precision, Path(onnx_path), out_dir, call.response, request, call.log_path, call.seconds, files)


# ---- the work prefix: one build's inputs and outputs in the bucket ------------------------------
JOB_FILE = "job.json"
RESPONSE_FILE = "response.json"
ERROR_FILE = "error.json"
OUTPUT_FILES = ("model.plan", "build.log", "request.json", "reproduce.sh", "layers.json", "eval_outputs.npz")


@dataclass
class BuildJob:
    """What build-engine needs besides files: everything of :func:`engine_request` but the paths."""

    precision: str
    spec: dict  # ModelSpec.model_dump(mode="json")
    profiles: List[dict]
    int8_mode: Optional[str] = None
    graph_precision: str = "fp32"
    calibration_batches: List[str] = field(default_factory=list)  # file names under inputs/calibration/
    calibration_cache_key: Optional[str] = None
    calibration_cache_in: bool = False
    eval_inputs: bool = False
    model_url: str = ""
    onnx_files: List[str] = field(default_factory=list)  # inputs/<name>: the model first, then its data


@dataclass
class BuildInputs:
    """A BuildJob with its files downloaded: what engine_from_onnx takes."""

    job: BuildJob
    onnx_path: Path
    eval_inputs: Optional[Path]
    calibration: Optional[dict]


def onnx_with_data(onnx_path: Path) -> List[Path]:
    """The model file and the external-data files it names (relative locations beside it)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = []
    for tensor in model.graph.initializer:  # TensorRT's parser reads initializers' data; nodes' stay inline
        if uses_external_data(tensor):
            loc = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if loc and loc not in names:
                names.append(loc)
    return [Path(onnx_path)] + [Path(onnx_path).parent / n for n in names]


def stage_build_inputs(storage: Storage, prefix: str, job: BuildJob, onnx_path: Path,
                       eval_inputs: Optional[Path], calibration: Optional[dict]) -> str:
    """Upload one build's files and its job under ``prefix``; returns the job's key."""
    files = onnx_with_data(onnx_path)
    job.onnx_files = ["model.onnx"] + [str(p.relative_to(Path(onnx_path).parent)) for p in files[1:]]
    for local, name in zip(files, job.onnx_files):
        storage.upload(local, f"{prefix}inputs/{name}")
    if eval_inputs is not None:
        storage.upload(Path(eval_inputs), f"{prefix}inputs/eval_inputs.npz")
        job.eval_inputs = True
    if calibration:
        job.calibration_batches = [Path(b).name for b in calibration.get("batches") or []]
        for batch in calibration.get("batches") or []:
            storage.upload(Path(batch), f"{prefix}inputs/calibration/{Path(batch).name}")
        if calibration.get("cache_in"):
            storage.upload(Path(calibration["cache_in"]), f"{prefix}inputs/calibration.cache.in")
            job.calibration_cache_in = True
        job.calibration_cache_key = calibration.get("cache_key")
    storage.write_json(prefix + JOB_FILE, job.__dict__)
    return prefix + JOB_FILE


def fetch_build_inputs(storage: Storage, prefix: str, workdir: Path) -> BuildInputs:
    """Download what :func:`stage_build_inputs` wrote into ``workdir``."""
    data = storage.read_json(prefix + JOB_FILE)
    if data is None:
        raise InfraError(f"no build job at {storage.url(prefix + JOB_FILE)}: convert-model removed it or never "
                         "wrote it.", fix="Start the conversion again from convert-model, not build-engine alone.")
    job = BuildJob(**data)
    inputs = Path(workdir) / "inputs"
    for name in job.onnx_files:
        storage.download(f"{prefix}inputs/{name}", inputs / name)
    eval_path = None
    if job.eval_inputs:
        eval_path = inputs / "eval_inputs.npz"
        storage.download(f"{prefix}inputs/eval_inputs.npz", eval_path)
    calibration = None
    if job.int8_mode == "calibrator":
        batches = []
        for name in job.calibration_batches:
            batches.append(str(inputs / "calibration" / name))
            storage.download(f"{prefix}inputs/calibration/{name}", Path(batches[-1]))
        cache_in = None
        if job.calibration_cache_in:
            cache_in = inputs / "calibration.cache.in"
            storage.download(f"{prefix}inputs/calibration.cache.in", cache_in)
        calibration = {"batches": batches, "cache_in": str(cache_in) if cache_in else None,
                       "cache_out": str(inputs / "calibration.cache"), "cache_key": job.calibration_cache_key}
    return BuildInputs(job, inputs / "model.onnx", eval_path, calibration)


def store_build_outputs(storage: Storage, prefix: str, outcome: EngineOutcome, env: GpuEnv) -> str:
    """Upload the engine's files and the response (with the GPU's probe); returns the response key."""
    files = dict(outcome.files)
    if outcome.eval_outputs is not None:
        files["eval_outputs.npz"] = outcome.eval_outputs
    for name, path in files.items():
        if path is not None and Path(path).exists():
            storage.upload(Path(path), f"{prefix}outputs/{name}")
    storage.write_json(prefix + RESPONSE_FILE, {"response": outcome.response, "env": env.to_dict(),
                                                "seconds": outcome.seconds, "files": sorted(files)})
    return prefix + RESPONSE_FILE


def store_build_error(storage: Storage, prefix: str, err: TrtflowError) -> str:
    storage.write_json(prefix + ERROR_FILE, scrub(err.to_dict()))  # read back into status records
    return prefix + ERROR_FILE


def fetch_build_outputs(storage: Storage, prefix: str, precision: str, workdir: Path) -> tuple:
    """(EngineOutcome with local files, GpuEnv of the GPU that built it) from the work prefix.

    Raises:
        the build's own ModelError/InfraError when build-engine recorded one; InfraError when it
        left neither a result nor an error (its run crashed or was cancelled).
    """
    from tasks.gpu_client import gpu_env_from_dict

    error = storage.read_json(prefix + ERROR_FILE)
    if error is not None:
        raise TrtflowError.from_dict(error)
    result = storage.read_json(prefix + RESPONSE_FILE)
    if result is None:
        raise InfraError(f"build-engine left no result under {storage.url(prefix)}.",
                         fix="See the build-engine run in the Prefect UI (a crashed or cancelled worker).")
    out_dir = Path(workdir) / f"engine-{precision}"
    files: Dict[str, Path] = {}
    for name in result.get("files") or []:
        files[name] = out_dir / name
        storage.download(f"{prefix}outputs/{name}", files[name])
    response = dict(result["response"])
    if response.get("eval") and "eval_outputs.npz" in files:
        response["eval"] = dict(response["eval"], outputs=str(files.pop("eval_outputs.npz")))
    if (response.get("layers") or {}).get("path") and "layers.json" in files:
        response["layers"] = dict(response["layers"], path=str(files["layers.json"]))
    outcome = EngineOutcome(precision, out_dir / "model.onnx", out_dir, response, {}, files.get("build.log"),
                            float(result.get("seconds") or 0.0), files)
    return outcome, gpu_env_from_dict(result.get("env") or {})


def remove_work(storage: Storage, prefix: str) -> int:
    """Delete everything under a work prefix; returns how many objects went."""
    keys = [obj.key for obj in storage.list(prefix)]
    for key in keys:
        storage.delete(key)
    return len(keys)

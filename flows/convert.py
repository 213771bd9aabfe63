"""``convert-model``: one model package in, published engines + manifests + latest.json out.

fetch -> spec -> validate -> probe GPU -> (cache hit? done) -> reference outputs -> for each precision
in preference order: [calibrate/quantise] -> engine (GPU subprocess: build, eval run, benchmark) ->
accuracy gate -> publish passing engines -> conversion record -> latest.json (last) -> status.

The flow composes stages; each stage lives in tasks/. Infrastructure errors are retried by Prefect,
model errors never: they end in a status record that says how to fix the model or its spec.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, \
    update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.logging import get_run_logger

from flows.params import ConvertRequest
from tasks import accuracy, engine as engine_stage, publish
from tasks.errors import InfraError, ModelError, TrtflowError, retry_condition
from tasks.gpu_client import GpuEnv, probe_gpu
from tasks.metrics import gate as accuracy_gate
from tasks.package import LocalPackage, ModelPackage, fetch_package, open_model
from tasks.spec import ModelSpec, load_spec
from tasks.validate import validate_model


STAGE = dict(cache_policy=NO_CACHE, retry_condition_fn=retry_condition)


@task(name="fetch-model", retries=3, retry_delay_seconds=[2, 10, 30], **STAGE)
def fetch_model(storage, pkg: ModelPackage, workdir: Path) -> LocalPackage:
    return fetch_package(storage, pkg, workdir)


@task(name="load-spec", **STAGE)
def load_model_spec(package: LocalPackage, overrides: dict) -> ModelSpec:
    return load_spec(package.spec_path, overrides)


@task(name="validate", **STAGE)
def validate(package: LocalPackage, spec: ModelSpec):
    report = validate_model(package.model_path, spec, package.root)
    logger = get_run_logger()
    for line in report.summary_lines():
        logger.info(line)
    if not report.ok:
        raise ModelError(f"{package.name}: the model failed validation: "
                         + "; ".join(e.message for e in report.errors),
                         fix=" ".join(e.fix for e in report.errors if e.fix) or None,
                         details=[e.__dict__ if hasattr(e, "__dict__") else str(e) for e in report.errors])
    return report


@task(name="probe-gpu", retries=2, retry_delay_seconds=[5, 30], **STAGE)
def probe(workdir: Path) -> GpuEnv:
    return probe_gpu(workdir)


@task(name="reference-outputs", **STAGE)
def reference(package: LocalPackage, spec: ModelSpec, profiles: List[dict]):
    eval_set = accuracy.eval_inputs(package, spec, package.model_path, profiles)
    ref = accuracy.reference_outputs(package.model_path, eval_set)
    ort = accuracy.ort_latency(package.model_path, profiles[0], spec.bench.ort_iterations) if spec.bench.enabled else None
    return eval_set, ref, ort


@task(name="engine", retries=1, retry_delay_seconds=[10], **STAGE)
def build_engine(storage, env: GpuEnv, spec: ModelSpec, package: LocalPackage, precision: str, profiles: List[dict],
                 eval_set, workdir: Path) -> engine_stage.EngineOutcome:
    """Prepare the precision's ONNX (Q/DQ, FP16 graph), then build/run/time it on the GPU."""
    from flows.gpu_slot import default_gpu_id, gpu_slot
    from tasks import precision_inputs

    prepared = precision_inputs.prepare(storage, env=env, spec=spec, package=package, precision=precision,
                                        profiles=profiles, workdir=workdir)
    with gpu_slot(default_gpu_id(env.gpu_uuid)):
        outcome = engine_stage.engine_from_onnx(
            storage, env=env, spec=spec, onnx_path=prepared.onnx_path, precision=precision, profiles=profiles,
            workdir=workdir, eval_inputs=eval_set.path, int8_mode=prepared.int8_mode,
            graph_precision=prepared.graph_precision, calibration=prepared.calibrator, model_url=package.source_uri)
    outcome.response["prepared"] = prepared.record
    return outcome


def _flow_run_id() -> Optional[str]:
    try:
        ctx = get_run_context()
        return str(ctx.flow_run.id) if getattr(ctx, "flow_run", None) else None
    except Exception:  # outside a run (unit tests calling helpers)
        return None


def _summary_markdown(name: str, rows: List[dict], status: str, latest: Optional[dict], notes: List[str]) -> str:
    lines = [f"# trtflow: {name} — {status}", ""]
    lines.append("| precision | result | cosine (min) | max abs err | top-1 | p50 ms | throughput/s | speedup vs ORT CPU | build s |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append("| {precision} | {result} | {cosine} | {max_abs} | {top1} | {p50} | {tput} | {speedup} | {build} |".format(**r))
    if latest:
        lines += ["", f"**latest** → `{latest['engine']}` ({latest['precision']})"]
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def _fmt(v, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def _row(precision: str, result: str, gate: Optional[dict] = None, outcome=None, ort: Optional[dict] = None) -> dict:
    metrics = (gate or {}).get("metrics") or {}
    cos = min((m.get("cosine") for m in metrics.values() if m.get("cosine") is not None), default=None)
    mabs = max((m.get("max_abs") for m in metrics.values() if m.get("max_abs") is not None), default=None)
    top1 = min((m.get("top1") for m in metrics.values() if m.get("top1") is not None), default=None)
    bench = (outcome.response.get("bench") if outcome else None) or {}
    lat = (bench.get("latency_ms") or {}).get("p50")
    tput = bench.get("throughput_per_s")
    speed = tput / ort["throughput"] if tput and ort and ort.get("throughput") else None
    build = outcome.engine.get("build_seconds") if outcome else None
    return {"precision": precision, "result": result, "cosine": _fmt(cos, ".6f"), "max_abs": _fmt(mabs),
            "top1": _fmt(top1, ".3f"), "p50": _fmt(lat, ".3f"), "tput": _fmt(tput, ".1f"),
            "speedup": "—" if speed is None else f"{speed:.1f}×", "build": _fmt(build, ".1f")}


@flow(name="convert-model", log_prints=False)
def convert_model(request: ConvertRequest) -> dict:
    """Convert one model package into TensorRT engines and publish the best one as latest.

    Returns a small summary (status published/cached/failed, model sha, engines, latest).
    """
    if isinstance(request, dict):
        request = ConvertRequest(**request)
    logger = get_run_logger()
    run_id = _flow_run_id()
    base = os.environ.get("TRTFLOW_WORKDIR")
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="trtflow-", dir=base))
    storage, pkg = open_model(request.model_uri)  # a bad URI fails here, before anything can be recorded
    name, sha, stage = pkg.name, "", "fetch"
    try:
        package = fetch_model(storage, pkg, workdir)
        sha = package.model_sha256
        stage = "spec"
        spec = load_model_spec(package, request.spec_overrides())
        stage = "validate"
        report = validate(package, spec)
        stage = "gpu-probe"
        env = probe(workdir)
        spec_key = spec.build_key()
        if not request.force:
            cached = publish.read_conversion(storage, name=name, model_sha=sha, target=env.target, spec_key=spec_key)
            if cached and cached.get("latest"):
                publish.write_status(storage, name=name, model_sha=sha, status="cached", stage="done",
                                     flow_run_id=run_id, extra={"conversion": cached.get("key"),
                                                                "cached_from": cached.get("flow_run_id")})
                create_markdown_artifact(key=_artifact_key(name), markdown=f"# trtflow: {name} — cached\n\n"
                                         f"Engine for model {sha[:12]}, spec {spec_key}, {env.target} already "
                                         f"published by flow run {cached.get('flow_run_id')}: `{cached['latest']['engine']}`."
                                         " Pass force=true to rebuild.", description="cache hit")
                logger.info("cache hit: %s already converted for %s (spec %s)", name, env.target, spec_key)
                return {"status": "cached", "model": name, "model_sha": sha, "engines": cached.get("engines", {}),
                        "latest": cached.get("latest")}
        publish.write_status(storage, name=name, model_sha=sha, status="running", stage="reference", flow_run_id=run_id)
        stage = "reference"
        profiles = report.profiles  # the spec's, completed and checked by validation
        eval_set, reference_npz, ort = reference(package, spec, profiles)
        notes = []
        if eval_set.synthetic:
            notes.append("eval inputs are synthetic (no eval/ data in the package): accuracy numbers are not representative")
        progress = create_progress_artifact(progress=0.0, key=_artifact_key(name) + "-progress",
                                            description=f"{name}: engines built")
        results: Dict[str, dict] = {}
        rows, published = [], []
        precisions = [str(p) for p in spec.precisions]
        for i, precision in enumerate(precisions):
            stage = f"engine-{precision}"
            try:
                outcome = build_engine(storage, env, spec, package, precision, profiles, eval_set, workdir)
            except TrtflowError as err:
                logger.warning("%s %s: %s", name, precision, err)
                results[precision] = {"result": "failed", "error": err.to_dict()}
                rows.append(_row(precision, "failed: " + err.message[:80]))
                update_progress_artifact(progress, (i + 1) / len(precisions) * 100)
                continue
            metrics = accuracy.compare_npz(reference_npz, outcome.eval_outputs)
            gate = accuracy_gate(metrics, spec.tolerance(precision))
            gate_dict = gate.to_dict()
            passed = bool(gate)
            prepared = outcome.response.get("prepared") or {}
            if prepared.get("synthetic_calibration"):
                notes.append(f"{precision}: calibrated on synthetic data (calibration.synthetic: true): INT8 accuracy "
                             "is not representative")
            results[precision] = {"result": "passed" if passed else "failed-gate", "gate": gate_dict,
                                  "engine": outcome.engine, "bench": outcome.response.get("bench"),
                                  "prepared": prepared, "layers": outcome.response.get("layers"),
                                  "gpu_seconds": round(outcome.seconds, 3)}
            rows.append(_row(precision, "passed" if passed else "failed gate", gate_dict, outcome, ort))
            if passed:
                manifest = publish.build_manifest(
                    name=name, package=package, spec=spec, gpu_env=env.to_dict(), precision=precision,
                    engine=outcome.engine, accuracy=gate_dict.get("metrics", {}), gate=gate_dict,
                    bench=outcome.response.get("bench"), ort_bench=ort, calibration=prepared or None,
                    validation=report.to_dict(), build_options=spec.build.model_dump(mode="json"),
                    flow_run_id=run_id, spec_key=spec_key, layers=outcome.response.get("layers"),
                    timing_cache=outcome.response.get("timing_cache"))
                manifest["eval"] = {"synthetic": eval_set.synthetic, "samples": eval_set.samples}
                published.append(publish.publish_engine(storage, name=name, model_sha=sha, target=env.target,
                                                        spec_key=spec_key, precision=precision,
                                                        files=outcome.files, manifest=manifest))
            else:
                logger.warning("%s %s failed its accuracy gate: %s", name, precision, "; ".join(gate.failures))
            update_progress_artifact(progress, (i + 1) / len(precisions) * 100)
            if passed and spec.strategy == "fallback":
                break
        stage = "publish"
        if not published:
            infra = [r["error"] for r in results.values() if (r.get("error") or {}).get("kind") == "infra"]
            error_type = InfraError if infra and len(infra) == len(results) else ModelError
            raise error_type(f"{name}: no precision passed its accuracy gate or built: "
                             + "; ".join(f"{p}: {r.get('result')} {(r.get('error') or {}).get('message', '')}"
                                         f"{'; '.join((r.get('gate') or {}).get('failures', []))}"
                                         for p, r in results.items()),
                             fix="Loosen the tolerances for a precision, add fp32 to precisions, or fix the error named.",
                             details=[results])
        best = published[0]  # preference order of spec.precisions
        engines = {p.precision: p.engine_key for p in published}
        conversion = {"name": name, "model_sha256": sha, "target": env.target, "spec_key": spec_key,
                      "flow_run_id": run_id, "precisions": results, "engines": engines,
                      "latest": {"precision": best.precision, "engine": best.engine_key, "manifest": best.manifest_key},
                      "notes": notes, "gpu": env.to_dict()}
        conv_key = publish.write_conversion(storage, name=name, model_sha=sha, target=env.target, spec_key=spec_key,
                                            record=conversion)
        latest = publish.write_latest(storage, name=name, model_sha=sha, target=env.target, best=best,
                                      conversion=conv_key, flow_run_id=run_id)
        publish.write_status(storage, name=name, model_sha=sha, status="published", stage="done", flow_run_id=run_id,
                             extra={"latest": latest["engine"], "precision": best.precision, "engines": engines,
                                    "results": {p: r["result"] for p, r in results.items()}})
        create_markdown_artifact(key=_artifact_key(name), markdown=_summary_markdown(name, rows, "published", latest, notes),
                                 description=f"{name} conversion summary")
        create_link_artifact(key=_artifact_key(name) + "-engine", link=best.engine_url,
                             link_text=f"{name} {best.precision} engine", description="latest engine")
        logger.info("published %s: latest is %s (%s)", name, best.engine_key, best.precision)
        return {"status": "published", "model": name, "model_sha": sha, "engines": engines,
                "latest": {"precision": best.precision, "engine": best.engine_key}, "results": {
                    p: r["result"] for p, r in results.items()}}
    except BaseException as err:
        if not isinstance(err, Exception):
            raise  # KeyboardInterrupt / cancellation: nothing to record
        try:
            publish.write_status(storage, name=name, model_sha=sha, status="failed", stage=stage, error=err,
                                 flow_run_id=run_id)
        except TrtflowError as status_err:  # the bucket itself is unreachable; keep the original error
            logger.error("could not write the status record: %s", status_err)
        create_markdown_artifact(key=_artifact_key(name), markdown=f"# trtflow: {name} — failed at {stage}\n\n{err}",
                                 description=f"{name} conversion failed")
        raise
    finally:
        if not os.environ.get("TRTFLOW_KEEP_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)


def _artifact_key(name: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return "trtflow-" + "".join(c if c.isalnum() else "-" for c in name.lower())

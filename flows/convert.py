"""``convert-model`` (CPU pool): one model package in, published engines + manifests + latest.json out.

target (GPU worker record or setting) -> fetch -> spec -> validate for the target -> (cache hit? done)
-> reference outputs -> for each precision in preference order: [calibrate/quantise/FP16 graph] ->
build-engine (GPU pool: build, eval run, benchmark; through the bucket's work prefix) -> accuracy gate
-> publish passing engines -> conversion record -> latest.json (last) -> status -> work prefix removed.

The flow composes stages; each stage lives in tasks/. Infrastructure errors are retried, model
errors never: they end in a status record that says how to fix the model or its spec.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, \
    create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.logging import get_run_logger

from flows.build import DEPLOYMENT_SETTING, BuildRequest, build_engine
from flows.gpu_slot import ensure_gpu_limit
from flows.params import ConvertRequest
from flows.workers import Target, target_for_validation
from tasks import accuracy, adapt, bench_report, engine as engine_stage, precision_inputs, publish, strategy
from tasks.errors import InfraError, ModelError, TrtflowError, is_retriable, retry_condition
from tasks.fixes import PARSER_REJECTED, fix_for_accuracy_failure
from tasks.gpu_client import GpuEnv
from tasks.limits import run_limited
from tasks.secrets import scrub
from tasks.metrics import gate as accuracy_gate
from tasks.package import EngineAddress, LocalPackage, ModelPackage, fetch_package, open_model, parse_model_uri, \
    work_prefix
from tasks.spec import ModelSpec, load_spec
from tasks.storage import sha256_file
from tasks.validate import validate_model


STAGE = dict(cache_policy=NO_CACHE, retry_condition_fn=retry_condition)


@task(name="fetch-model", retries=3, retry_delay_seconds=[2, 10, 30], **STAGE)
def fetch_model(storage, pkg: ModelPackage, workdir: Path) -> LocalPackage:
    return fetch_package(storage, pkg, workdir)


@task(name="load-spec", **STAGE)
def load_model_spec(package: LocalPackage, overrides: dict) -> ModelSpec:
    return load_spec(package.spec_path, overrides)


def _validate_for_target(package: LocalPackage, spec: ModelSpec, target: Target):
    """The one call of tasks.validate: switches to ``caps=caps_for_version(...)`` when tasks9's Caps land."""
    return validate_model(package.model_path, spec, package.root, caps=target.policy())


@task(name="validate", **STAGE)
def validate(package: LocalPackage, spec: ModelSpec, target: Target):
    report = _validate_for_target(package, spec, target)
    logger = get_run_logger()
    logger.info("validated for TensorRT %s, the target of %s", target.tensorrt, target.source)
    for line in report.summary_lines():
        logger.info(line)
    if not report.ok:
        raise ModelError(f"{package.name}: the model failed validation for TensorRT {target.tensorrt} "
                         f"({target.source}): "
                         + "; ".join(e.message for e in report.errors),
                         fix=" ".join(e.fix for e in report.errors if e.fix) or None,
                         details=[e.__dict__ if hasattr(e, "__dict__") else str(e) for e in report.errors])
    return report


@task(name="adapt", **STAGE)
def adapt_model(package: LocalPackage, spec: ModelSpec, report, target: Target, workdir: Path,
                sanitise_mode: Optional[str] = None) -> adapt.AdaptResult:
    """The model as the target's parser reads it (IR lowered, opset converted, shared dims renamed
    apart, sanitised), with every rewrite recorded; the original when nothing was needed."""
    mode = sanitise_mode or spec.adapt.sanitise
    result = adapt.adapt_for_target(package.model_path, Path(workdir) / f"adapted-{mode}", target.policy(),
                                    report.profiles, sanitise_mode=mode)
    for record in result.records:
        get_run_logger().info("adapt %s: %s -> %s (%s)%s", record.name, record.before, record.after, record.why,
                              "" if record.applied else " [not applied]")
    return result


def _adaptation_notes(result: adapt.AdaptResult) -> List[str]:
    return [f"adapted for TensorRT: {r.name} {r.before} → {r.after} ({r.why})" for r in result.records if r.applied]


def sanitise_after_parser_failure(conv: "Conversion", result: "PrecisionResult") -> bool:
    """Whether the parser rejected the adapted model and a sanitised one (constant folding, cleanup,
    shape inference) is now what the builds start from: spec adapt.sanitise 'on-failure', once."""
    message = (result.error or {}).get("message") or ""
    done = any(r.name == "sanitise" and r.applied for r in (conv.adaptation.records if conv.adaptation else []))
    if result.result != "failed" or PARSER_REJECTED not in message or done or conv.spec.adapt.sanitise != "on-failure":
        return False
    adapted = adapt_model(conv.package, conv.spec, conv.report, conv.target, conv.workdir, sanitise_mode="always")
    if not any(r.name == "sanitise" and r.applied for r in adapted.records):
        return False  # sanitising changed nothing (or failed, recorded in its why): the error stands
    conv.adaptation = adapted
    conv.notes.append(f"{result.precision}: the parser rejected the model ({message[:120]}); retried sanitised")
    conv.notes.extend(_adaptation_notes(adapted))
    return True


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


@task(name="target", retries=2, retry_delay_seconds=[2, 10], **STAGE)
def resolve_target(storage) -> Target:
    return target_for_validation(storage)


@task(name="reference-outputs", **STAGE)
def reference(package: LocalPackage, spec: ModelSpec, profiles: List[dict]):
    # A heavy CPU stage runs in a child under spec.limits: a Loop of 10^12 trips fails here, named.
    return run_limited("reference outputs and ONNX Runtime benchmark", accuracy.reference_from_package, package,
                       spec, profiles, limits=spec.limits)


@task(name="prepare-precision", **STAGE)
def prepare_precision(storage, target: Target, spec: ModelSpec, package: LocalPackage, precision: str,
                      profiles: List[dict], workdir: Path) -> precision_inputs.Prepared:
    """The precision's ONNX for the target TensorRT: the model, its Q/DQ graph or its FP16 graph (CPU)."""
    return precision_inputs.prepare(storage, tensorrt=target.tensorrt, caps=target.policy(), target_key=target.key,
                                    spec=spec, package=package, precision=precision, profiles=profiles,
                                    workdir=workdir)


@dataclass
class PrecisionResult:
    """How one precision ended: ``passed``, ``failed-gate`` or ``failed`` (with the error)."""

    precision: str
    result: str
    gate: Optional[dict] = None
    engine: Optional[dict] = None
    bench: Optional[dict] = None
    prepared: Optional[dict] = None
    layers: Optional[dict] = None
    gpu_seconds: Optional[float] = None
    error: Optional[dict] = None
    outcome: Optional[engine_stage.EngineOutcome] = field(default=None, repr=False)
    gpu_env: Optional[GpuEnv] = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return self.result == "passed"

    def to_dict(self) -> dict:
        """The conversion record's entry (keys as readers of trtflow.conversion/v1 know them)."""
        out = {"result": self.result}
        for key in ("gate", "engine", "bench", "prepared", "layers", "gpu_seconds", "error"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    def summary(self) -> str:
        why = (self.error or {}).get("message", "") + "; ".join((self.gate or {}).get("failures", []))
        return f"{self.precision}: {self.result} {why}".strip()


@dataclass
class Conversion:
    """What every stage after validation reads: one conversion's state, passed instead of ten arguments."""

    storage: object
    package: LocalPackage
    spec: ModelSpec
    report: object
    target: Target
    workdir: Path
    run_id: Optional[str]
    eval_set: object = None
    reference_npz: Optional[Path] = None
    ort: Optional[dict] = None
    notes: List[str] = field(default_factory=list)
    rows: List[dict] = field(default_factory=list)
    adaptation: Optional[adapt.AdaptResult] = None

    @property
    def build_package(self) -> LocalPackage:
        """The package with the adapted model: what the precision graphs and the build start from
        (the reference outputs and the model's sha stay the original's)."""
        if self.adaptation is None or self.adaptation.path == self.package.model_path:
            return self.package
        return dataclasses.replace(self.package, model_path=self.adaptation.path)

    def adaptations(self) -> List[dict]:
        return [r.to_dict() for r in (self.adaptation.records if self.adaptation else [])]

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def sha(self) -> str:
        return self.package.model_sha256

    def work_prefix(self, precision: str) -> str:
        return work_prefix(self.run_id or f"local-{os.getpid()}-{id(self)}", precision)

    def address(self, target: str) -> EngineAddress:
        """The conversion's address: the whole package's identity (not just the model) and the spec."""
        return EngineAddress(self.name, self.sha, target, self.spec.build_key(), self.package.package_sha256)


# ---- locks: one conversion per package version, one latest.json writer per package -----------
@contextmanager
def package_lock(name: str, kind: str, package_sha: str = "", lease_s: float = 60) -> Iterator[str]:
    """Hold the Prefect global concurrency limit ``<kind>-<name>[-<package sha12>]`` (one slot).

    Why a Prefect limit rather than a conditional write: it works the same for s3:// and file://
    buckets (LocalStorage has no compare-and-swap, and S3's If-Match on PUT is not in every
    S3-compatible store or moto), it covers every way a run starts (watcher, nightly rebuild, UI,
    CLI) because all of them talk to one Prefect server, and a dead holder's slot is freed when its
    lease runs out. ``convert``: a second run of the same package version waits for the first and
    then, normally, is a cache hit. ``latest``: latest.json's read-modify-write cannot lose a
    concurrent writer's entry.
    """
    from prefect.concurrency.sync import concurrency

    # The lease is renewed while held, so it only bounds how long a kill -9'd holder blocks the next
    # run of this version: 60 s, the least Prefect's server accepts (its default, 300 s, is 5 minutes).
    limit = f"{kind}-{name}" + (f"-{package_sha[:12]}" if package_sha else "")
    ensure_gpu_limit(limit, slots=1)  # flows.gpu_slot's creator is generic: creates the limit unless it exists
    with concurrency(limit, occupy=1, strict=True, lease_duration=lease_s):
        yield limit


# ---- build-engine: in this process or on the gpu pool ----------------------------------------
def gpu_deployment() -> Optional[str]:
    """The build-engine deployment to start (setting TRTFLOW_GPU_DEPLOYMENT); None runs it in-process."""
    return os.environ.get(DEPLOYMENT_SETTING) or None


def _why_no_worker(client, pool: str) -> Optional[str]:
    """Why no worker can take the pool's runs now (none online, or the pool paused), or None."""
    from prefect.client.schemas.objects import WorkerStatus

    if client.read_work_pool(pool).is_paused:  # an operator paused it: online workers take nothing
        return f"pool {pool} is paused; resume it in the UI or with `prefect work-pool resume {pool}`"
    if not any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool)):
        return f"pool {pool} has none online"
    return None


def _wait_for_child(flow_run_id, deployment: str, on_waiting: Callable[[str], None],
                    on_started: Callable[[], None], poll_s: float = 1.0):
    """Poll the child run until it ends; say so once while no worker of its pool is online."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        pool = client.read_deployment_by_name(deployment).work_pool_name or "gpu"
        waiting = False
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is not None and state.is_final():
                return state
            if state is None or state.is_scheduled() or state.is_pending():
                why = None if waiting else _why_no_worker(client, pool)
                if why:
                    waiting = True
                    on_waiting(f"waiting for a GPU worker ({why})")
            elif waiting and state.is_running():
                waiting = False
                on_started()
            time.sleep(poll_s)  # polling the API: how often, not how long anything takes


def run_build(request: BuildRequest, on_waiting: Callable[[str], None], on_started: Callable[[], None]) -> None:
    """Run build-engine for ``request``: a child run on the gpu pool, or the flow in this process.

    Either way its result (or error) is in the work prefix afterwards; errors are read from there.
    """
    from prefect.deployments import run_deployment

    deployment = gpu_deployment()
    if deployment is None:
        try:
            build_engine(request)
        except TrtflowError:
            pass  # build-engine wrote it to error.json, where fetch_build_outputs reads it
        return
    run = run_deployment(deployment, parameters={"request": request.model_dump()}, timeout=0, as_subflow=True,
                         flow_run_name=f"{request.name}-{request.precision}")
    _wait_for_child(run.id, deployment, on_waiting, on_started)


def _write_waiting(conv: Conversion, precision: str, message: str) -> None:
    get_run_logger().warning("%s %s: %s", conv.name, precision, message)
    publish.write_status(conv.storage, name=conv.name, model_sha=conv.sha, status="waiting",
                         stage=f"engine-{precision}", flow_run_id=conv.run_id, extra={"message": message})
    create_markdown_artifact(key=_artifact_key(conv.name), markdown=f"# trtflow: {conv.name} — waiting\n\n"
                             f"{precision}: {message}. It converts as soon as one starts "
                             "(`python -m flows.workers gpu --pool gpu`).", description=f"{conv.name}: {message}")


def engine_via_gpu_pool(conv: Conversion, precision: str, prepared: precision_inputs.Prepared, attempts: int = 2):
    """Stage one build's inputs, run build-engine (retrying infrastructure errors), fetch its outputs."""
    prefix = conv.work_prefix(precision)
    job = engine_stage.BuildJob(precision=precision, spec=conv.spec.model_dump(mode="json"),
                                profiles=conv.report.profiles, int8_mode=prepared.int8_mode,
                                graph_precision=prepared.graph_precision, model_url=conv.package.source_uri)
    engine_stage.stage_build_inputs(conv.storage, prefix, job, prepared.onnx_path, conv.eval_set.path,
                                    prepared.calibrator)
    request = BuildRequest(bucket_uri=conv.storage.uri, work_prefix=prefix, name=conv.name, precision=precision)
    started = lambda: publish.write_status(conv.storage, name=conv.name, model_sha=conv.sha, status="running",
                                           stage=f"engine-{precision}", flow_run_id=conv.run_id)
    for attempt in range(1, attempts + 1):
        for stale in (engine_stage.ERROR_FILE, engine_stage.RESPONSE_FILE):
            conv.storage.delete(prefix + stale)
        run_build(request, lambda msg: _write_waiting(conv, precision, msg), started)
        try:
            return engine_stage.fetch_build_outputs(conv.storage, prefix, precision, conv.workdir)
        except TrtflowError as err:
            if attempt == attempts or not is_retriable(err):
                raise
            get_run_logger().warning("%s %s: %s; retrying (attempt %d)", conv.name, precision, err.message, attempt + 1)


# ---- one precision, then publication --------------------------------------------------------
def convert_precision(conv: Conversion, precision: str) -> PrecisionResult:
    """Prepare, build (GPU pool), and gate one precision."""
    try:
        prepared = prepare_precision(conv.storage, conv.target, conv.spec, conv.build_package, precision,
                                     conv.report.profiles, conv.workdir)
        prepared.record["onnx_sha256"] = sha256_file(prepared.onnx_path)  # what the engine was built from
        outcome, gpu_env = engine_via_gpu_pool(conv, precision, prepared)
    except TrtflowError as err:
        get_run_logger().warning("%s %s: %s", conv.name, precision, err)
        conv.rows.append(_row(precision, "failed: " + err.message[:80]))
        return PrecisionResult(precision, "failed", error=err.to_dict())
    metrics = accuracy.compare_npz(conv.reference_npz, outcome.eval_outputs)
    gate = accuracy_gate(metrics, conv.spec.tolerance(precision))
    gate_dict = gate.to_dict()
    if prepared.record.get("synthetic_calibration"):
        conv.notes.append(f"{precision}: calibrated on synthetic data (calibration.synthetic: true): INT8 accuracy "
                          "is not representative")
    result = PrecisionResult(precision, "passed" if gate else "failed-gate", gate=gate_dict, engine=outcome.engine,
                             bench=outcome.response.get("bench"), prepared=prepared.record,
                             layers=outcome.response.get("layers"), gpu_seconds=round(outcome.seconds, 3),
                             outcome=outcome, gpu_env=gpu_env)
    conv.rows.append(_row(precision, "passed" if gate else "failed gate", gate_dict, outcome, conv.ort))
    if not gate:
        get_run_logger().warning("%s %s failed its accuracy gate: %s", conv.name, precision, "; ".join(gate.failures))
    return result


def publish_precision(conv: Conversion, address: EngineAddress, r: PrecisionResult) -> publish.PublishedEngine:
    manifest = publish.build_manifest(
        name=conv.name, package=conv.package, spec=conv.spec, gpu_env=r.gpu_env.to_dict(), precision=r.precision,
        engine=r.engine or {}, accuracy=(r.gate or {}).get("metrics", {}), gate=r.gate or {}, bench=r.bench,
        ort_bench=conv.ort, calibration=r.prepared or None, validation=_validation_record(conv),
        build_options=conv.spec.build.model_dump(mode="json"), flow_run_id=conv.run_id, spec_key=address.spec_key,
        layers=r.layers, timing_cache=r.outcome.response.get("timing_cache"))
    manifest["eval"] = {"synthetic": conv.eval_set.synthetic, "samples": conv.eval_set.samples}
    manifest["package"] = conv.package.identity.to_dict()  # every file of the package by sha256
    manifest.setdefault("model", {})["adaptations"] = conv.adaptations()
    sweep = bench_report.sweep_files(r.bench, conv.workdir / f"{r.precision}-report", f"{conv.name} {r.precision}")
    return publish.publish_engine(conv.storage, address, r.precision, files=dict(r.outcome.files, **sweep),
                                  manifest=manifest)


def _validation_record(conv: Conversion) -> dict:
    return dict(conv.report.to_dict(), target=conv.target.to_dict())


def _no_engine_error(name: str, results: Dict[str, PrecisionResult], adaptations: List[dict]) -> TrtflowError:
    """Why nothing was published: each failed build's own fix, and the accuracy advice (loosen the
    tolerances...) only for precisions whose engine built and missed its gate."""
    infra = [r for r in results.values() if (r.error or {}).get("kind") == "infra"]
    error_type = InfraError if infra and len(infra) == len(results) else ModelError
    fixes = [(r.error or {}).get("fix") for r in results.values() if (r.error or {}).get("fix")]
    fixes += [fix_for_accuracy_failure(p, (r.gate or {}).get("failures") or ()).fix
              for p, r in results.items() if r.result == "failed-gate"]
    fixes = list(dict.fromkeys(fixes))
    return error_type(f"{name}: no precision passed its accuracy gate or built: "
                      + "; ".join(r.summary() for r in results.values()),
                      fix=" ".join(fixes) or "Fix the error named in each precision's result (see build.log).",
                      details=[{p: r.to_dict() for p, r in results.items()}, {"adaptations": adaptations}])


def choose_latest(conv: Conversion, results: Dict[str, PrecisionResult]) -> strategy.Choice:
    """The spec's strategy over the built precisions (preference order): what to publish, which is latest, why."""
    outcomes = [strategy.PrecisionOutcome(p, r.passed, (r.bench or {}).get("throughput_per_s"))
                for p, r in results.items()]
    choice = strategy.choose(conv.spec.strategy, outcomes)
    conv.notes.append(f"strategy {conv.spec.strategy}: {choice.reason}")
    return choice


@dataclass
class Publication:
    """What publish_conversion wrote: the engines, the best one and latest.json."""

    best: publish.PublishedEngine
    engines: Dict[str, str]
    latest: dict
    results: Dict[str, str]


def publish_conversion(conv: Conversion, results: Dict[str, PrecisionResult]) -> Publication:
    """Publish every passing engine, then the conversion record and latest.json (last)."""
    passing = [r for r in results.values() if r.passed]
    if not passing:
        raise _no_engine_error(conv.name, results, conv.adaptations())
    env = passing[0].gpu_env
    address = conv.address(env.target)
    choice = choose_latest(conv, results)
    published = [publish_precision(conv, address, results[p]) for p in choice.publish]
    best = next(p for p in published if p.precision == choice.latest)
    engines = {p.precision: p.engine_key for p in published}
    conversion = {"name": conv.name, "model_sha256": conv.sha, "target": env.target, "spec_key": address.spec_key,
                  "flow_run_id": conv.run_id, "precisions": {p: r.to_dict() for p, r in results.items()},
                  "engines": engines, "validated_for": conv.target.to_dict(),
                  "latest": {"precision": best.precision, "engine": best.engine_key, "manifest": best.manifest_key,
                             "reason": choice.reason},
                  "strategy": conv.spec.strategy, "adaptations": conv.adaptations(),
                  "notes": conv.notes, "gpu": env.to_dict(), "package": conv.package.identity.to_dict()}
    conversion["crashed"] = publish.crashed_precisions(conversion)  # the next run builds these again
    conv_key = publish.write_conversion(conv.storage, address, conversion)
    latest = _write_latest(conv, address, best, conv_key)
    return Publication(best, engines, latest, {p: r.result for p, r in results.items()})


def record_published(conv: Conversion, pub: Publication) -> dict:
    """The published status record (written after the work prefix is gone), artifacts, and the run's summary."""
    best = pub.best
    publish.write_status(conv.storage, name=conv.name, model_sha=conv.sha, status="published", stage="done",
                         flow_run_id=conv.run_id, extra={"latest": pub.latest["engine"], "precision": best.precision,
                                                         "engines": pub.engines, "results": pub.results})
    create_markdown_artifact(key=_artifact_key(conv.name),
                             markdown=_summary_markdown(conv.name, conv.rows, "published", pub.latest, conv.notes)
                             + _sweep_markdown(conv, best), description=f"{conv.name} conversion summary")
    create_link_artifact(key=_artifact_key(conv.name) + "-engine", link=best.engine_url,
                         link_text=f"{conv.name} {best.precision} engine", description="latest engine")
    get_run_logger().info("published %s: %s (%s); latest.json names %s", conv.name, best.engine_key, best.precision,
                          pub.latest.get("engine"))  # a newer upload's engine when this run's upload is older
    return {"status": "published", "model": conv.name, "model_sha": conv.sha, "engines": pub.engines,
            "latest": {"precision": best.precision, "engine": best.engine_key}, "results": pub.results}


def _write_latest(conv: Conversion, address: EngineAddress, best: publish.PublishedEngine, conv_key: str) -> dict:
    latest = publish.write_latest(conv.storage, address, best, conversion=conv_key, flow_run_id=conv.run_id,
                                  uploaded_at=conv.package.uploaded_at, lock=package_lock(conv.name, "latest"))
    if latest.get("engine") != best.engine_key:
        get_run_logger().info("latest.json of %s stays on %s: it is a newer upload (%s) than this run's (%s)",
                              conv.name, latest.get("engine"), latest.get("uploaded_at"), conv.package.uploaded_at)
    return latest


def _sweep_markdown(conv: Conversion, best: publish.PublishedEngine) -> str:
    """The best engine's batch sweep for the run's artifact: its table and where its plot is."""
    sweep = ((best.manifest.get("benchmark") or {}).get("tensorrt") or {}).get("sweep")
    if not sweep or not sweep.get("points"):
        return ""
    create_table_artifact(key=_artifact_key(conv.name) + "-sweep", table=bench_report.sweep_rows(sweep),
                          description=f"{conv.name} {best.precision}: batch sweep")
    plot = best.manifest.get("files", {}).get(bench_report.SWEEP_PLOT)
    return (f"\n\n## Batch sweep ({best.precision})\n\n{bench_report.sweep_markdown(sweep)}\n\n"
            f"Plot: `{conv.storage.url(plot) if plot else '—'}`")


def cached_summary(conv: Conversion, force: bool) -> Optional[dict]:
    """The earlier conversion of this package version, spec and known target, unless forced (cache hit).

    A hit re-asserts latest.json (so a lost latest write, or a revert to an earlier upload, heals
    without a rebuild); a record with crashed precisions is no hit (they are built again).
    """
    if force or conv.target.key is None:  # no GPU worker recorded: the engine's target is not known yet
        return None
    address = conv.address(conv.target.key)
    cached = publish.read_conversion(conv.storage, address)
    if not (cached and cached.get("latest")):
        return None
    crashed = publish.crashed_precisions(cached)
    if crashed:
        get_run_logger().info("%s: %s crashed in run %s (infrastructure); building again", conv.name,
                              ", ".join(crashed), cached.get("flow_run_id"))
        return None
    latest = _write_latest(conv, address, publish.published_from_record(conv.storage, cached), cached["key"])
    publish.write_status(conv.storage, name=conv.name, model_sha=conv.sha, status="cached", stage="done",
                         flow_run_id=conv.run_id, extra={"conversion": cached.get("key"), "latest": latest.get("engine"),
                                                         "cached_from": cached.get("flow_run_id")})
    create_markdown_artifact(key=_artifact_key(conv.name), markdown=f"# trtflow: {conv.name} — cached\n\n"
                             f"Engine for package {address.identity_sha[:12]}, spec {address.spec_key}, "
                             f"{address.target} already published by flow run {cached.get('flow_run_id')}: "
                             f"`{cached['latest']['engine']}`. Pass force=true to rebuild.", description="cache hit")
    get_run_logger().info("cache hit: %s already converted for %s (spec %s)", conv.name, address.target,
                          address.spec_key)
    return {"status": "cached", "model": conv.name, "model_sha": conv.sha, "engines": cached.get("engines", {}),
            "latest": cached.get("latest")}


def convert_engines(conv: Conversion) -> dict:
    """Reference outputs, then each precision in preference order, then publication."""
    publish.write_status(conv.storage, name=conv.name, model_sha=conv.sha, status="running", stage="reference",
                         flow_run_id=conv.run_id)
    conv.eval_set, conv.reference_npz, conv.ort = reference(conv.package, conv.spec, conv.report.profiles)
    if conv.eval_set.synthetic:
        conv.notes.append("eval inputs are synthetic (no eval/ data in the package): accuracy numbers are not "
                          "representative")
    progress = create_progress_artifact(progress=0.0, key=_artifact_key(conv.name) + "-progress",
                                        description=f"{conv.name}: engines built")
    precisions = [str(p) for p in conv.spec.precisions]
    results: Dict[str, PrecisionResult] = {}
    try:
        for i, precision in enumerate(precisions):
            results[precision] = convert_precision(conv, precision)
            if sanitise_after_parser_failure(conv, results[precision]):
                conv.rows.pop()  # the refused build's row; the retry writes its own
                results[precision] = convert_precision(conv, precision)
            update_progress_artifact(progress, (i + 1) / len(precisions) * 100)
            if results[precision].passed and conv.spec.strategy == "fallback":
                break
        publication = publish_conversion(conv, results)
    finally:
        for precision in results:
            engine_stage.remove_work(conv.storage, conv.work_prefix(precision))
    return record_published(conv, publication)


def convert_once(conv: Conversion, force: bool) -> dict:
    """Cache hit or conversion, holding this package version's lock: at most one conversion of one
    version at a time however it was started; a second run waits, then (unless forced) hits the cache."""
    get_run_logger().info("%s: taking the conversion lock of package %s", conv.name, conv.package.package_sha256[:12])
    with package_lock(conv.name, "convert", conv.package.package_sha256):
        cached = cached_summary(conv, force)
        if cached:
            return cached
        conv.adaptation = adapt_model(conv.package, conv.spec, conv.report, conv.target, conv.workdir)
        conv.notes.extend(_adaptation_notes(conv.adaptation))
        return convert_engines(conv)


def _run_name() -> str:
    """convert-model runs are named after their model ("resnet50")."""
    from prefect.runtime import flow_run

    request = flow_run.parameters.get("request") or {}
    uri = request.get("model_uri") if isinstance(request, dict) else getattr(request, "model_uri", "")
    try:
        return parse_model_uri(uri).name
    except (TrtflowError, TypeError, ValueError):
        return "convert-model"


def _new_workdir() -> Path:
    base = os.environ.get("TRTFLOW_WORKDIR")
    if base:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="trtflow-", dir=base))


def _record_failure(storage, name: str, sha: str, stage: str, err: Exception, run_id: Optional[str]) -> None:
    try:
        publish.write_status(storage, name=name, model_sha=sha, status="failed", stage=stage, error=err,
                             flow_run_id=run_id)
    except TrtflowError as status_err:  # the bucket itself is unreachable; keep the original error
        get_run_logger().error("could not write the status record: %s", status_err)
    create_markdown_artifact(key=_artifact_key(name), markdown=f"# trtflow: {name} — failed at {stage}\n\n{scrub(str(err))}",
                             description=f"{name} conversion failed")


def _stopped_status(state) -> str:
    """``cancelled`` for a cancellation or a SIGTERM (a stop that was asked for), else ``crashed``."""
    if state.is_cancelled() or state.is_cancelling():
        return "cancelled"
    return "cancelled" if "termination signal" in (state.message or "") else "crashed"


def record_stopped(flow, flow_run, state) -> None:
    """on_cancellation / on_crashed: the status this run left (``running``, ``waiting``) says how it ended.

    Runs in the flow's own process (SIGTERM, Ctrl-C) or in the worker that saw it die (SIGKILL, OOM,
    a cancellation from the UI), so it finds this run's record by flow run id instead of by memory.
    """
    logger = logging.getLogger("trtflow.convert")
    request = (flow_run.parameters or {}).get("request") or {}
    uri = request.get("model_uri") if isinstance(request, dict) else getattr(request, "model_uri", None)
    status = _stopped_status(state)
    try:
        storage, pkg = open_model(uri)
        mine = [r for r in publish.list_statuses(storage, pkg.name)
                if r.get("flow_run_id") == str(flow_run.id) and r.get("status") in ("running", "waiting")]
        for record in mine:
            publish.write_status(storage, name=record["name"], model_sha=record["model_sha256"], status=status,
                                 stage=record.get("stage"), flow_run_id=str(flow_run.id),
                                 extra={"message": f"{status}: {state.message or state.name}"})
        logger.info("%s: status %s recorded for %d record(s)", pkg.name, status, len(mine))
    except (TrtflowError, OSError, ValueError) as err:  # a hook must not raise over the run's own end
        logger.error("could not record the %s status of %s: %s", status, uri, err)


def _note_newer_upload(pkg: ModelPackage, seen: str) -> None:
    """Say so when the package changed after the watcher saw it. The run converts what is there now
    (its identity is the hash of the bytes it fetches); the watcher starts a run for that upload too,
    which then is a cache hit, and latest.json follows upload times, so neither run can roll it back."""
    if seen and pkg.fingerprint != seen:
        get_run_logger().info("%s changed since watch-bucket saw it (fingerprint %s, now %s); converting the "
                              "newer upload", pkg.name, seen[:12], pkg.fingerprint[:12])


@flow(name="convert-model", flow_run_name=_run_name, log_prints=False, on_cancellation=[record_stopped],
      on_crashed=[record_stopped])
def convert_model(request: ConvertRequest) -> dict:
    """Convert one model package into TensorRT engines and publish the best one as latest.

    Returns a small summary (status published/cached/failed, model sha, engines, latest).
    """
    if isinstance(request, dict):
        request = ConvertRequest(**request)
    run_id = _flow_run_id()
    workdir = _new_workdir()
    storage, pkg = open_model(request.model_uri)  # a bad URI fails here, before anything can be recorded
    _note_newer_upload(pkg, request.package_fingerprint)
    sha, stage = "", "target"
    try:
        target = resolve_target(storage)
        stage = "fetch"
        package = fetch_model(storage, pkg, workdir)
        sha, stage = package.model_sha256, "spec"
        spec = load_model_spec(package, request.spec_overrides())
        stage = "validate"
        report = validate(package, spec, target)
        conv = Conversion(storage, package, spec, report, target, workdir, run_id)
        stage = "engines"
        return convert_once(conv, request.force)
    except Exception as err:  # KeyboardInterrupt / cancellation pass: nothing to record
        _record_failure(storage, pkg.name, sha, stage, err, run_id)
        raise
    finally:
        if not os.environ.get("TRTFLOW_KEEP_WORKDIR"):
            shutil.rmtree(workdir, ignore_errors=True)


def _artifact_key(name: str) -> str:
    # Artifact keys allow lowercase letters, digits and dashes only.
    return "trtflow-" + "".join(c if c.isalnum() else "-" for c in name.lower())

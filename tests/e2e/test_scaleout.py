"""Scale-out on the `gpu` pool: one worker per GPU, conversions spread, each GPU builds one engine at a time.

On this CPU machine (the GPU double): the stack's GPU worker on "GPU 0" gets a second worker on the
same GPU (the mis-configuration flows/gpu_slot.py must survive) and one on "GPU 1". Models are
dropped at once; per GPU the held build slots never overlap, both GPUs are used, every model is
published exactly once.

On a machine with two GPUs (issue 6), the same test runs on the workers `trtflow up` starts by
itself (one per GPU, as infra/README.md documents) and also times one worker against two:

    TRTFLOW_E2E_REAL_GPU=1 TRT_PYTHON=/opt/trt/bin/trt-python TRTFLOW_SCALEOUT_COMPARE=1 \
    TRTFLOW_SCALEOUT_MIN_SPEEDUP=1.8 .venv/bin/python -m pytest -s tests/e2e/test_scaleout.py

Build intervals come from the Prefect API: gpu_slot logs "Holding GPU slot <name>" after acquiring
and "Released GPU slot <name>" after releasing, so each logged interval lies inside the real hold.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import boto3
import pytest

from flows import stack, supervise
from tests import models
from tests.e2e.conftest import REAL_GPU, wait_for

# Hang guards, not timing asserts: alone on CI's 2 cores the 6 conversions take ~100 s of a 213 s test.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800 if REAL_GPU else 720)]

N_MODELS = int(os.environ.get("TRTFLOW_SCALEOUT_MODELS", "8" if REAL_GPU else "6"))
COMPARE = os.environ.get("TRTFLOW_SCALEOUT_COMPARE") == "1"
MIN_SPEEDUP = float(os.environ.get("TRTFLOW_SCALEOUT_MIN_SPEEDUP", "0"))
CHANNELS = int(os.environ.get("TRTFLOW_SCALEOUT_CHANNELS", "64" if REAL_GPU else "8"))
SIZE = int(os.environ.get("TRTFLOW_SCALEOUT_SIZE", "64" if REAL_GPU else "32"))
PHASE_TIMEOUT_S = 1200 if REAL_GPU else 480


@dataclass
class Phase:
    names: List[str]
    runs: list
    wall_s: float                                   # first run start -> last run end
    holds: Dict[str, List[Tuple[float, float, str]]] = field(default_factory=dict)  # slot -> (start, end, run)
    workers: Counter = field(default_factory=Counter)                                # worker name -> runs
    waited: int = 0                                 # builds that had to wait for their GPU


def _model_name(run) -> str:
    return run.parameters["request"]["model_uri"].split("/models/", 1)[1].split("/")[0].removesuffix(".onnx")


def _runs_named(client, names):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["convert-model"])),
                                 limit=200)
    return [r for r in runs if _model_name(r) in names]


def _builds_of(client, run) -> list:
    """The build-engine child runs of one convert-model run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))


def _logs(client, run_ids) -> list:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    out, offset = [], 0
    while True:
        page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)),
                                limit=200, offset=offset)
        out += page
        if len(page) < 200:
            return out
        offset += 200


def _drop(s3, bucket: str, name: str, seed: int) -> bytes:
    data = models.small_cnn(channels=CHANNELS, size=SIZE, seed=seed).SerializeToString()
    # Spec first and the model last, as infra/README.md asks of multi-file uploads.
    s3.put_object(Bucket=bucket, Key=f"models/{name}/trtflow.yaml", Body=b"precisions: [fp16, fp32]\n")
    s3.put_object(Bucket=bucket, Key=f"models/{name}/model.onnx", Body=data)
    return data


def _run_phase(client, s3, bucket: str, prefix: str, n: int, seed0: int) -> Tuple[Phase, Dict[str, bytes]]:
    names = [f"{prefix}{i}" for i in range(n)]
    data = {name: _drop(s3, bucket, name, seed0 + i) for i, name in enumerate(names)}

    def done():
        runs = _runs_named(client, names)
        return len(runs) >= n and all(r.state and r.state.is_final() for r in runs) and runs

    runs = wait_for(done, PHASE_TIMEOUT_S, f"{n} conversions ({prefix}*) to finish", every_s=1)
    wall = max(r.end_time for r in runs).timestamp() - min(r.start_time for r in runs).timestamp()
    # A run is final before its process has shipped its last logs: wait until every hold is complete.
    phase = wait_for(lambda: _parse_holds(client, names, runs, wall), 60, "every GPU-slot log to reach the API")
    return phase, data


def _parse_holds(client, names, runs, wall: float):
    """The phase's GPU-slot holds from the run logs, or None while some are still missing."""
    phase = Phase(names, runs, wall)
    # GPU work runs in each conversion's build-engine child runs (gpu pool); their holds count for the parent.
    parent_of = {str(c.id): str(r.id) for r in runs for c in _builds_of(client, r)}
    builds = [c for r in runs for c in _builds_of(client, r)]
    # The worker that ran each build labels it (a worker that lost the race to submit does not).
    phase.workers.update(str((c.labels or {}).get("prefect.worker.name", "?")) for c in builds)
    opened: Dict[Tuple[str, str], float] = {}
    waiting: Dict[str, float] = {}
    for log in sorted(_logs(client, [c.id for c in builds]), key=lambda lg: lg.timestamp):
        msg, ts, key = log.message, log.timestamp.timestamp(), str(log.task_run_id or log.flow_run_id)
        if msg.startswith("Waiting for GPU slot "):
            waiting[key] = ts
        elif msg.startswith("Holding GPU slot "):
            opened[(key, msg.rsplit(" ", 1)[1])] = ts
            if ts - waiting.get(key, ts) > 0.5:
                phase.waited += 1
        elif msg.startswith("Released GPU slot "):
            slot = msg.rsplit(" ", 1)[1]
            if (key, slot) in opened:
                phase.holds.setdefault(slot, []).append((opened.pop((key, slot)), ts,
                                                         parent_of.get(str(log.flow_run_id), str(log.flow_run_id))))
    held_by = Counter(run for holds in phase.holds.values() for _, _, run in holds)
    if opened or any(held_by[str(r.id)] == 0 for r in runs if r.state.is_completed()):
        return None
    return phase


def _check(phase: Phase, data: Dict[str, bytes], s3, bucket: str) -> None:
    from tasks.package import latest_key, status_key

    per_model = Counter(_model_name(r) for r in phase.runs)
    assert per_model == {n: 1 for n in phase.names}, per_model               # each model exactly once
    bad = [(r.name, r.state_name, r.state.message) for r in phase.runs if not r.state.is_completed()]
    assert not bad, bad
    for name, body in data.items():
        key = status_key(name, hashlib.sha256(body).hexdigest())
        status = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert status["status"] == "published", (name, status)
        assert s3.head_object(Bucket=bucket, Key=latest_key(name))["ContentLength"] > 0
    for slot, holds in phase.holds.items():                                   # one build per GPU at a time
        holds.sort()
        for (s1, e1, r1), (s2, e2, r2) in zip(holds, holds[1:]):
            assert s2 >= e1, f"{slot}: run {r2} started building at {s2:.3f} while {r1} held it until {e1:.3f}"
    assert len(phase.holds) >= 2, f"only {sorted(phase.holds)} used"          # both GPUs used


def _report(label: str, phase: Phase) -> str:
    per_slot = {slot: len(h) for slot, h in sorted(phase.holds.items())}
    return (f"[scale-out] {label}: {len(phase.runs)} models in {phase.wall_s:.1f} s; builds per GPU {per_slot}; "
            f"runs per worker {dict(phase.workers)}; builds that waited for their GPU: {phase.waited}")


def test_gpu_workers_spread_conversions_and_never_share_a_gpu(e2e_stack, e2e_client):
    state = e2e_stack.state_dir
    extra = []
    if not REAL_GPU:
        # The double reports CUDA_VISIBLE_DEVICES as the GPU UUID, so this is "a second worker on GPU 0"
        # (must queue behind the first) and "a worker on GPU 1" (may build alongside).
        extra = [stack.add_gpu_worker(state, "0"), stack.add_gpu_worker(state, "1")]
    info = stack.StackInfo.load(state)
    gpu_workers = [p for p in info.processes if p.role.startswith("worker-gpu") and supervise.is_alive(p)]
    if len(gpu_workers) < 2:
        pytest.skip(f"needs two GPU workers; `trtflow up` started {len(gpu_workers)} ({e2e_stack.gpu_note})")
    s3 = boto3.client("s3", endpoint_url=os.environ["TRTFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = e2e_stack.bucket.removeprefix("s3://").rstrip("/")
    try:
        if COMPARE:  # warm the timing cache so neither timed phase pays for the first build
            _run_phase(e2e_client, s3, bucket, "warm", 1, 900)
        started = time.monotonic()
        both, data = _run_phase(e2e_client, s3, bucket, "spread", N_MODELS, 100)
        print("\n" + _report(f"{len(gpu_workers)} GPU workers", both) + f" (drop to done {time.monotonic() - started:.1f} s)")
        _check(both, data, s3, bucket)
        if COMPARE:
            keep = gpu_workers[0]
            stack.stop_processes([p for p in gpu_workers if p is not keep])
            one, data1 = _run_phase(e2e_client, s3, bucket, "single", N_MODELS, 100)
            print(_report("1 GPU worker", one))
            bad = [(r.name, r.state_name) for r in one.runs if not r.state.is_completed()]
            assert not bad, bad
            speedup = one.wall_s / both.wall_s
            print(f"[scale-out] {len(gpu_workers)} workers vs 1: {both.wall_s:.1f} s vs {one.wall_s:.1f} s "
                  f"= {speedup:.2f}x")
            if MIN_SPEEDUP:
                assert speedup >= MIN_SPEEDUP, f"{speedup:.2f}x < {MIN_SPEEDUP}x"
    finally:
        stack.stop_processes(extra)

"""End to end on a real stack: `trtflow up` (prefect server subprocess, process workers), moto's S3
server over HTTP as the bucket, the GPU stage as the declared test double (tests/doubles).

Three models are dropped; one of them is updated twice while the watcher runs (the last update is
two files written back to back, a multi-file upload). Exactly one convert-model run per distinct
settled version must exist, seen through the Prefect API, and every one must publish.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest

from tests import models
from tests.e2e.conftest import SETTLE_SECONDS, WATCH_INTERVAL, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(960)]


def _onnx_bytes(model) -> bytes:
    buf = io.BytesIO()
    buf.write(model.SerializeToString())
    return buf.getvalue()


def _runs(client, deployment_name: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment_name])),
                                 limit=200)


def _model_of(run) -> str:
    uri = run.parameters["request"]["model_uri"]
    rest = uri.split("/models/", 1)[1]
    return rest.split("/")[0].removesuffix(".onnx")


def test_three_models_one_updated_twice_convert_once_per_version(e2e_stack, e2e_client):
    from tasks.package import latest_key, list_packages, status_key
    from tasks.storage import open_storage
    from flows.watch import idempotency_key, version_of

    t_start = time.monotonic()
    s3 = boto3.client("s3", endpoint_url=os.environ["TRTFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = e2e_stack.bucket.removeprefix("s3://").rstrip("/")
    storage = open_storage(e2e_stack.bucket)

    def convert_runs():  # this test's models only (the browser test shares the stack)
        return [r for r in _runs(e2e_client, "convert-model") if _model_of(r) in ("alpha", "beta", "gamma")]

    def runs_for(name):
        return [r for r in convert_runs() if _model_of(r) == name]

    v1 = _onnx_bytes(models.small_cnn(channels=4))
    v2 = _onnx_bytes(models.small_cnn(channels=6))
    v3 = _onnx_bytes(models.small_cnn(channels=8))
    alpha, beta = _onnx_bytes(models.small_cnn(seed=1)), _onnx_bytes(models.two_input_model())
    s3.put_object(Bucket=bucket, Key="models/alpha.onnx", Body=alpha)
    s3.put_object(Bucket=bucket, Key="models/beta.onnx", Body=beta)
    s3.put_object(Bucket=bucket, Key="models/gamma/model.onnx", Body=v1)

    # A conversion converts what is in the bucket when it runs, so each update waits until the
    # previous version's conversion has finished; the watcher runs (polls every few seconds) all along.
    def gamma_final(n):
        runs = runs_for("gamma")
        return len(runs) == n and all(r.state and r.state.is_final() for r in runs)

    wait_for(lambda: gamma_final(1), 300, "the conversion of gamma v1")
    s3.put_object(Bucket=bucket, Key="models/gamma/model.onnx", Body=v2)
    wait_for(lambda: gamma_final(2), 300, "the conversion of gamma v2")
    # v3 is a multi-file upload: the model, then its spec. Only the settled pair may be converted.
    s3.put_object(Bucket=bucket, Key="models/gamma/model.onnx", Body=v3)
    s3.put_object(Bucket=bucket, Key="models/gamma/trtflow.yaml", Body=b"precisions: [fp32]\n")
    wait_for(lambda: gamma_final(3), 300, "the conversion of gamma v3")

    def all_final():
        runs = convert_runs()
        return len(runs) >= 5 and all(r.state and r.state.is_final() for r in runs) and runs

    runs = wait_for(all_final, 240, "every conversion to finish")
    last_start = max(r.created for r in runs)

    # The watcher keeps polling; give it two more completed polls after the last start, then count.
    def polls_since():
        done = [r for r in _runs(e2e_client, "watch-bucket")
                if r.state and r.state.is_completed() and r.start_time and r.start_time > last_start]
        return len(done) >= 2
    wait_for(polls_since, 90, "two more watch-bucket polls")

    runs = sorted(convert_runs(), key=lambda r: r.created)
    for r in runs:
        print(f"[e2e] {_model_of(r):6} {r.state_name:10} key={r.idempotency_key} created={r.created:%H:%M:%S} "
              f"ran={r.total_run_time.total_seconds():.1f}s")
    per_model = Counter(_model_of(r) for r in runs)
    assert per_model == {"alpha": 1, "beta": 1, "gamma": 3}, per_model
    assert len({r.idempotency_key for r in runs}) == 5
    failed = [(r.name, r.state.message) for r in runs if not r.state.is_completed()]
    assert not failed, failed

    # gamma's last run converted the settled pair (v3 model + its trtflow.yaml), not a half upload.
    (gamma,) = [p for p in list_packages(storage) if p.name == "gamma"]
    final_key = idempotency_key("gamma", version_of(storage.uri, gamma))
    assert max(runs_for("gamma"), key=lambda r: r.created).idempotency_key == final_key
    latest = json.loads(s3.get_object(Bucket=bucket, Key=latest_key("gamma"))["Body"].read())
    assert latest["model_sha256"] == hashlib.sha256(v3).hexdigest()
    assert latest["precision"] == "fp32"  # from the trtflow.yaml uploaded after the model: it was waited for

    # Every version was converted and published by its own run (none was a cache hit of another).
    def status(name, data):
        key = status_key(name, hashlib.sha256(data).hexdigest())
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    for name, data in (("alpha", alpha), ("beta", beta), ("gamma", v1), ("gamma", v2), ("gamma", v3)):
        st = status(name, data)
        assert st["status"] == "published", (name, st)
    assert len({status("gamma", v)["flow_run_id"] for v in (v1, v2, v3)}) == 3

    # The GPU stage held its per-GPU concurrency limit and gave it back.
    limits = [lim for lim in e2e_client.read_global_concurrency_limits(limit=50) if lim.name.startswith("gpu-")]
    assert limits and all(lim.limit == 1 and lim.active_slots == 0 for lim in limits), limits
    # ... and its leases lived on disk, where a restarted server still finds (and expires) them.
    assert (Path(e2e_stack.state_dir) / "prefect" / "concurrency_leases").is_dir()

    print(f"\n[e2e] stack up in {e2e_stack.startup_s:.1f} s; drop-to-done for 5 versions "
          f"{time.monotonic() - t_start:.1f} s (watch every {WATCH_INTERVAL:g} s, settle {SETTLE_SECONDS:g} s)")

"""Two pools under `trtflow up` with NO GPU worker at first (issue 9).

Bad models get their failed status from the CPU pool at once; a good model says it waits for a GPU
worker; once a GPU worker (the GPU test double) starts, the good model is published, and only the
build-engine flow ever ran on the gpu pool.
"""
from __future__ import annotations

import hashlib
import os
import socket
import time

import boto3
import pytest

from tests import models
from tests.e2e.conftest import REAL_GPU, running_stack, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
FEEDBACK_S = 15.0  # the bound: watcher submits -> status record


@pytest.fixture(scope="module")
def cpu_only_stack(_moto_server_endpoint, tmp_path_factory):
    with running_stack(_moto_server_endpoint, tmp_path_factory.mktemp("two-pools"), gpus=[]) as info:
        yield info


def _flow_names(client) -> dict:
    return {f.id: f.name for f in client.read_flows(limit=50)}


def _convert_run_of(client, name: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
    convert = [r for r in runs if _flow_names(client).get(r.flow_id) == "convert-model"]
    return convert[0] if convert else None


def _artifacts(client, key: str) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


@pytest.mark.skipif(REAL_GPU, reason="starts the GPU test double's worker")
def test_feedback_without_a_gpu_worker_then_published_when_one_starts(cpu_only_stack):
    from prefect.client.orchestration import SyncPrefectClient

    from flows import stack
    from flows.workers import known_targets
    from tasks.package import latest_key, status_key
    from tasks.storage import open_storage

    assert cpu_only_stack.gpus == []
    storage = open_storage(cpu_only_stack.bucket)
    s3 = boto3.client("s3", endpoint_url=os.environ["TRTFLOW_S3_ENDPOINT_URL"], region_name="us-east-1")
    bucket = cpu_only_stack.bucket.removeprefix("s3://").rstrip("/")
    corrupt = b"this is not an ONNX model\n"
    good = models.small_cnn(seed=3).SerializeToString()
    s3.put_object(Bucket=bucket, Key="models/corrupt.onnx", Body=corrupt)
    s3.put_object(Bucket=bucket, Key="models/badspec/model.onnx", Body=good)
    s3.put_object(Bucket=bucket, Key="models/badspec/trtflow.yaml", Body=b"precisionz: [fp32]\n")
    s3.put_object(Bucket=bucket, Key="models/good.onnx", Body=good)

    def status(name, data):
        return storage.read_json(status_key(name, hashlib.sha256(data).hexdigest()))

    with SyncPrefectClient(cpu_only_stack.api_url) as client:
        for name, data, want in (("corrupt", corrupt, "failed"), ("badspec", good, "failed"),
                                 ("good", good, "waiting")):
            wait_for(lambda: _convert_run_of(client, name), 90, f"the watcher to submit {name}")
            submitted = time.monotonic()
            record = wait_for(lambda: (status(name, data) or {}).get("status") == want and status(name, data),
                              FEEDBACK_S, f"{name}'s {want} status record")
            print(f"[two-pools] {name}: {want} {time.monotonic() - submitted:.1f} s after the run was seen")
            if name == "corrupt":
                assert record["stage"] == "validate" and "ONNX" in record["error"]["message"], record
            if name == "badspec":
                assert record["stage"] == "spec" and "precisionz" in record["error"]["message"], record
            if name == "good":
                assert record["message"] == "waiting for a GPU worker (pool gpu has none online)", record
                artifacts = wait_for(lambda: _artifacts(client, "trtflow-good"), 10, "good's waiting artifact")
                assert any("waiting for a GPU worker (pool gpu has none online)" in (a.data or "")
                           for a in artifacts), [a.data for a in artifacts]

        stack.add_gpu_worker(cpu_only_stack.state_dir, "0")
        wait_for(lambda: (status("good", good) or {}).get("status") == "published", 120, "good to be published")
        latest = storage.read_json(latest_key("good"))
        assert storage.head(latest["engine"]) is not None
        assert not list(storage.list("_trtflow/work/")), "the work prefix is removed after publication"
        assert [r.worker for r in known_targets(storage)] == ["gpu0-" + socket.gethostname()]  # its probe record

        # Through the Prefect API: only build-engine ran on the gpu pool, everything else on cpu.
        names = _flow_names(client)
        runs = client.read_flow_runs(limit=200)
        on_gpu = {names[r.flow_id] for r in runs if r.work_pool_name == "gpu"}
        on_cpu = {names[r.flow_id] for r in runs if r.work_pool_name == "cpu"}
        assert on_gpu == {"build-engine"}, on_gpu
        assert {"convert-model", "watch-bucket"} <= on_cpu and "build-engine" not in on_cpu, on_cpu
        (build,) = [r for r in runs if names[r.flow_id] == "build-engine"]
        assert build.name == "good-fp16", build.name  # int8 was refused on the CPU side (no calibration data)
        assert build.parent_task_run_id is not None  # a child run of convert-model in the UI

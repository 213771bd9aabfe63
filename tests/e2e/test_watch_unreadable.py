"""The watcher under `trtflow up` with things it cannot read in the drop folder (issue 11 item 6).

A dangling symlink and two packages claiming one name sit in models/ from the start; a good model
copied in afterwards is still converted, no watch-bucket poll fails, the clash gets a failed
status record naming both files and no conversion is started for it.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests import models
from tests.doubles import make_trt_python_double
from tests.e2e.conftest import REAL_GPU, free_port, wait_for
from tests.e2e.test_local_drop import _cli

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _flow_runs(api_url: str, flow_name: str):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with SyncPrefectClient(api_url) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


@pytest.mark.skipif(REAL_GPU, reason="watcher robustness needs no GPU; the GPU stage is the test double here")
def test_watcher_skips_what_it_cannot_read_and_converts_the_rest(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "TRTFLOW_BUCKET", "TRTFLOW_GPUS", "TRTFLOW_HOME", "TRTFLOW_S3_ENDPOINT_URL")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1",
               TRT_PYTHON=str(make_trt_python_double(tmp_path / "double")))
    state = tmp_path / "state"
    drop = state / "bucket" / "models"
    drop.mkdir(parents=True)
    (drop / "dangling.onnx").symlink_to(tmp_path / "nowhere.onnx")
    cnn = models.save(models.small_cnn(), tmp_path / "incoming" / "good.onnx")
    shutil.copy(cnn, drop / "twice.onnx")
    (drop / "twice").mkdir()
    shutil.copy(cnn, drop / "twice" / "model.onnx")
    up = _cli(["up", "--state-dir", str(state), "--port", str(free_port()), "--watch-interval", "3",
               "--settle-seconds", "2"], env, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        api = re.search(r"Prefect UI:\s+(\S+)", up.stdout).group(1) + "/api"
        shutil.copy(cnn, drop / "good.onnx")
        latest = drop.parent / "engines" / "good" / "latest.json"
        wait_for(latest.exists, 180, f"{latest} to appear")
        clash = drop.parent / "_trtflow" / "status" / "twice" / "unknown.json"
        record = json.loads(clash.read_text())
        assert record["status"] == "failed" and record["stage"] == "watch"
        assert "models/twice.onnx" in record["error"]["message"]
        assert "models/twice/model.onnx" in record["error"]["message"]
        polls = _flow_runs(api, "watch-bucket")
        # Overlapping polls are cancelled by the deployment's concurrency limit (by design); none may fail.
        broken = [r.state for r in polls if r.state and (r.state.is_failed() or r.state.is_crashed())]
        assert broken == [] and any(r.state and r.state.is_completed() for r in polls)
        converted = [r.parameters["request"]["model_uri"] for r in _flow_runs(api, "convert-model")]
        assert converted and all(uri.endswith("/models/good.onnx") for uri in converted), converted
    finally:
        down = _cli(["down", "--state-dir", str(state)], env, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr

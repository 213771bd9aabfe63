"""`trtflow up` as a user runs it: the CLI in its own process, the embedded local-folder bucket. A
model copied into the folder `up` prints is converted with no other command, and its engine and
latest.json appear beside it; `trtflow down` stops everything.

On this CPU machine the GPU stage is the declared test double. On a GPU machine (issue 5, H100):

    TRTFLOW_E2E_REAL_GPU=1 TRT_PYTHON=/opt/trt/bin/trt-python [TRTFLOW_DROP_MODEL=resnet50.onnx] \
    .venv/bin/python -m pytest -s tests/e2e/test_local_drop.py

prints the time from the copy to latest.json and the GPU time inside it (GPU-slot holds).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import models
from tests.doubles import make_trt_python_double
from tests.e2e.conftest import REAL_GPU, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800 if REAL_GPU else 300)]
ROOT = Path(__file__).resolve().parents[2]


def _cli(args, env, timeout):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _gpu_seconds(api_url: str, flow_run_id: str) -> float:
    """Seconds the run's build-engine child runs held their GPU build slot (from their logs in the Prefect API)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, \
        LogFilterFlowRunId

    def holds():
        with SyncPrefectClient(api_url) as client:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            run_ids = [flow_run_id] + [c.id for c in children]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)), limit=200)
        opened, total, n = {}, 0.0, 0
        for log in sorted(logs, key=lambda lg: lg.timestamp):
            key = (str(log.flow_run_id), str(log.task_run_id))
            if log.message.startswith("Holding GPU slot "):
                opened[key] = log.timestamp.timestamp()
            elif log.message.startswith("Released GPU slot ") and key in opened:
                total += log.timestamp.timestamp() - opened.pop(key)
                n += 1
        return (total,) if n and not opened else None  # logs arrive after the run ends: wait for all

    return wait_for(holds, 60, "the build-engine runs' GPU-slot logs")[0]


def test_a_model_copied_into_the_drop_folder_is_converted(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "TRTFLOW_BUCKET", "TRTFLOW_GPUS", "TRTFLOW_HOME", "TRTFLOW_S3_ENDPOINT_URL")}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="1")
    if not REAL_GPU:
        env["TRT_PYTHON"] = str(make_trt_python_double(tmp_path / "double"))
    state = tmp_path / "state"
    up = _cli(["up", "--state-dir", str(state), "--port", str(free_port()), "--watch-interval", "3",
               "--settle-seconds", "2"], env, timeout=300)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        drop = Path(re.search(r"Drop models into:\s+(\S+)", up.stdout).group(1))
        ui = re.search(r"Prefect UI:\s+(\S+)", up.stdout).group(1)
        assert drop == (state / "bucket" / "models").resolve() and drop.is_dir()
        assert not re.search(r"GPU workers:\s+none", up.stdout), up.stdout

        source = Path(os.environ["TRTFLOW_DROP_MODEL"]) if os.environ.get("TRTFLOW_DROP_MODEL") else \
            models.save(models.small_cnn(), tmp_path / "incoming" / "dropped.onnx")
        name = source.stem
        latest = drop.parent / "engines" / name / "latest.json"
        copied_at = time.time()
        shutil.copy(source, drop / source.name)  # what `cp model.onnx <folder>/` does; nothing else is run
        wait_for(latest.exists, 1500 if REAL_GPU else 180, f"{latest} to appear")
        published_s = latest.stat().st_mtime - copied_at

        record = json.loads(latest.read_text())
        manifest = json.loads((drop.parent / record["manifest"]).read_text())
        assert (drop.parent / record["engine"]).stat().st_size > 0
        gpu_s = _gpu_seconds(f"{ui}/api", record["flow_run_id"])
        print(f"\n[drop] {source.name}: copy -> latest.json {published_s:.1f} s; GPU-slot time {gpu_s:.1f} s; "
              f"published {record['precision']} built in {manifest['build']['seconds']:.1f} s on "
              f"{manifest['target']['gpu']} (TensorRT {manifest['target']['tensorrt']})")
    finally:
        down = _cli(["down", "--state-dir", str(state)], env, timeout=120)
    assert down.returncode == 0 and "server" in down.stdout, down.stdout + down.stderr
    assert not (state / "stack.json").exists()

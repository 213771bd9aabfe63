"""A conversion that is stopped mid-build takes its GPU child with it and frees the GPU at once
(issue 11 item 4): SIGTERM (what a worker sends on cancellation) and SIGKILL of the flow process,
with the GPU test double blocking mid-"build". Real Prefect (the session's test server over HTTP),
a real process tree checked with psutil, the real per-GPU lock of flows/gpu_slot.py.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from flows.gpu_slot import gpu_flock
from tasks.publish import list_statuses
from tasks.storage import LocalStorage
from tests import models
from tests.doubles import make_trt_python_double

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(480)  # generous: a loaded 2-core machine starts Prefect slowly
GONE_WITHIN_S = 5.0


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text()):
        if proc.poll() is not None:
            raise AssertionError(f"the conversion ended before building: {proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no build started within {timeout_s:.0f} s")
        time.sleep(0.1)  # polling a marker file, not timing anything
    return path.read_text()


def _name(tmp_path: Path) -> str:
    return "cnn-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:8]


def _start_conversion(tmp_path: Path, api_url: str, gpu_id: str):
    # Its own package (the name is part of convert-model's per-version lock, which a SIGKILLed run in
    # an earlier test may still hold on the shared server until its lease runs out).
    bucket = tmp_path / "bucket"
    models.save(models.small_cnn(), bucket / "models" / f"{_name(tmp_path)}.onnx")
    marker = tmp_path / "building.pid"
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=gpu_id,
               TRT_PYTHON=str(make_trt_python_double(tmp_path / "double")), TRTFLOW_DOUBLE_BLOCK=str(marker),
               TRTFLOW_GPU_LOCK_DIR=str(tmp_path / "locks"), AWS_SECRET_ACCESS_KEY="kill-test-secret-value")
    env.pop("TRTFLOW_GPU_DEPLOYMENT", None)
    code = ("from flows.convert import convert_model; "
            f"convert_model({{'model_uri': {str(bucket / 'models' / (_name(tmp_path) + '.onnx'))!r}, "
            "'precisions': ['fp32']})")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    child = psutil.Process(int(_wait_for(marker, proc, 150)))
    return proc, child, LocalStorage(bucket)


def _assert_child_gone_and_slot_free(child: psutil.Process, gpu_id: str, monkeypatch, tmp_path: Path) -> float:
    gone, alive = psutil.wait_procs([child], timeout=GONE_WITHIN_S)
    assert not alive, f"GPU child {child.pid} still running {GONE_WITHIN_S} s after its conversion was stopped"
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
                 and "gpu_double" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    monkeypatch.setenv("TRTFLOW_GPU_LOCK_DIR", str(tmp_path / "locks"))
    start = time.monotonic()
    with gpu_flock(gpu_id, timeout_seconds=1.0):  # the next conversion's build: no wait on a dead holder
        waited = time.monotonic() - start
    assert waited < 0.5, waited
    return waited


@pytest.fixture
def api_url(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_sigterm_mid_build_ends_the_gpu_child_frees_the_gpu_and_records_cancelled(api_url, tmp_path, monkeypatch):
    gpu_id = f"double-{uuid.uuid4().hex[:8]}"
    proc, child, storage = _start_conversion(tmp_path, api_url, gpu_id)
    with pytest.raises(psutil.TimeoutExpired):
        child.wait(timeout=0.2)  # really mid-build
    proc.send_signal(signal.SIGTERM)
    _assert_child_gone_and_slot_free(child, gpu_id, monkeypatch, tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    [record] = list_statuses(storage, _name(tmp_path))
    assert record["status"] == "cancelled", (record, out[-3000:])
    assert "termination signal" in record["message"]


def test_sigkill_mid_build_takes_the_gpu_child_along_and_frees_the_gpu(api_url, tmp_path, monkeypatch):
    gpu_id = f"double-{uuid.uuid4().hex[:8]}"
    proc, child, storage = _start_conversion(tmp_path, api_url, gpu_id)
    proc.kill()
    proc.wait(timeout=10)
    _assert_child_gone_and_slot_free(child, gpu_id, monkeypatch, tmp_path)
    # Nothing ran after SIGKILL to write the record; `trtflow status` sees its owner is gone.
    from flows.cli import _status_rows

    [record] = list_statuses(storage, _name(tmp_path))
    assert record["status"] == "running" and record["owner"]["pid"] == proc.pid
    [row] = _status_rows(storage)
    assert row["status"] == "crashed" and f"pid {proc.pid}" in row["reason"]


def test_gpu_child_gets_no_credentials(api_url, tmp_path, monkeypatch):
    """The double dumps the environment it was given; the conversion process had AWS keys."""
    gpu_id = f"double-{uuid.uuid4().hex[:8]}"
    proc, child, storage = _start_conversion(tmp_path, api_url, gpu_id)
    env = child.environ()
    proc.kill()
    proc.wait(timeout=10)
    psutil.wait_procs([child], timeout=GONE_WITHIN_S)
    assert not [k for k in env if k.startswith("AWS_")], sorted(env)
    assert "kill-test-secret-value" not in " ".join(env.values())
    assert env["CUDA_VISIBLE_DEVICES"] == gpu_id and "PATH" in env and "TRTFLOW_GPU_LOCK_DIR" in env


def _serve(tmp_path: Path, api_url: str, gpu_id: str, name: str) -> subprocess.Popen:
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=gpu_id,
               TRT_PYTHON=str(make_trt_python_double(tmp_path / "double")),
               TRTFLOW_DOUBLE_BLOCK=str(tmp_path / "building.pid"), TRTFLOW_GPU_LOCK_DIR=str(tmp_path / "locks"),
               PREFECT_RUNNER_POLL_FREQUENCY="1")
    env.pop("TRTFLOW_GPU_DEPLOYMENT", None)
    code = f"from flows.convert import convert_model; convert_model.serve(name={name!r})"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _deployment_id(client, name: str, runner: subprocess.Popen):
    deadline = time.monotonic() + 180
    while True:
        try:
            return client.read_deployment_by_name(f"convert-model/{name}").id
        except Exception:  # not registered yet
            if runner.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the runner did not register its deployment: " + runner.stdout.read()[-3000:])
            time.sleep(0.5)  # polling the API for the deployment, not timing anything


def test_sigkill_under_a_runner_records_crashed(api_url, tmp_path, monkeypatch):
    """The production path (a worker's runner runs the flow in a subprocess): the runner sees the
    flow process die and runs the on_crashed hook, which writes ``crashed`` over ``running``."""
    from prefect.client.orchestration import get_client

    gpu_id, name = f"double-{uuid.uuid4().hex[:8]}", f"kill-{uuid.uuid4().hex[:8]}"
    bucket = tmp_path / "bucket"
    models.save(models.small_cnn(), bucket / "models" / f"{_name(tmp_path)}.onnx")
    runner = _serve(tmp_path, api_url, gpu_id, name)
    try:
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(
                _deployment_id(client, name, runner),
                parameters={"request": {"model_uri": str(bucket / "models" / f"{_name(tmp_path)}.onnx"),
                                        "precisions": ["fp32"]}})
        child = psutil.Process(int(_wait_for(tmp_path / "building.pid", runner, 150)))
        child.parent().kill()  # the flow run's process, as the OOM killer or `kill -9` would
        _assert_child_gone_and_slot_free(child, gpu_id, monkeypatch, tmp_path)
        storage = LocalStorage(bucket)
        deadline = time.monotonic() + 120
        while (list_statuses(storage, _name(tmp_path)) or [{}])[0].get("status") != "crashed":
            assert time.monotonic() < deadline, (list_statuses(storage, _name(tmp_path)), runner.stdout)
            time.sleep(0.5)  # the runner notices the exit on its own schedule
        [record] = list_statuses(storage, _name(tmp_path))
        assert record["flow_run_id"] == str(run.id) and record["message"].startswith("crashed: ")
    finally:
        os.killpg(runner.pid, signal.SIGTERM)
        try:
            runner.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()

"""trtflow up/down internals: stopping exactly what was started, and the rendered prefect.yaml."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

import psutil

from flows import stack, supervise
from flows.deploy import PREFECT_FILE, DeploySettings, render_prefect_file


def _spawn_sleeper(tmp_path: Path, role: str) -> supervise.Proc:
    # A parent that starts a child and waits: `down` must stop both (flow runs are workers' children).
    code = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']).wait()"
    return supervise.spawn(role, [sys.executable, "-c", code], {}, tmp_path, tmp_path)


def _wait_for_children(proc: supervise.Proc) -> list:
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        kids = supervise.descendants(proc)
        if kids:
            return kids
        time.sleep(0.05)  # waiting for the child to exist
    raise AssertionError("child never started")


def test_down_stops_recorded_processes_and_their_children(tmp_path):
    proc = _spawn_sleeper(tmp_path, "worker-x")
    kids = _wait_for_children(proc)
    info = stack.StackInfo(str(tmp_path), "http://x/api", "http://x", "file:///b", None, [], "", [proc])
    info.save()
    assert stack.status(tmp_path) == {"worker-x": True}
    assert stack.running_stack(tmp_path) == info
    assert stack.down(tmp_path, timeout_s=20) == [f"worker-x (pid {proc.pid})"]
    assert not supervise.is_alive(proc)
    assert all(not k.is_running() or k.status() == psutil.STATUS_ZOMBIE for k in kids)
    assert stack.status(tmp_path) is None and stack.down(tmp_path) == []
    assert stack.running_stack(tmp_path) is None


def test_a_reused_pid_is_never_signalled(tmp_path):
    proc = _spawn_sleeper(tmp_path, "server")
    try:
        impostor = supervise.Proc("server", proc.pid, proc.create_time + 5, proc.cmd, proc.log)  # same PID, other start
        assert supervise.stop_processes([impostor], timeout_s=1) == []
        assert supervise.is_alive(proc)
    finally:
        supervise.stop_processes([proc], timeout_s=20)
    assert not supervise.is_alive(proc)


def test_state_lives_in_trtflow_home_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TRTFLOW_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert stack.trtflow_home() == (tmp_path / "home" / ".trtflow").resolve()
    monkeypatch.setenv("TRTFLOW_HOME", str(tmp_path / "elsewhere"))
    assert stack.trtflow_home() == (tmp_path / "elsewhere").resolve()


def test_stack_info_round_trips(tmp_path):
    info = stack.StackInfo(str(tmp_path), "http://h:1/api", "http://h:1", "s3://b", None, ["0", "1"], "two",
                           [supervise.Proc("server", 1, 2.5, ["prefect"], "log")])
    info.save()
    assert stack.StackInfo.load(tmp_path) == info


def test_render_prefect_file_applies_overrides_and_keeps_the_rest(tmp_path):
    original = yaml.safe_load(PREFECT_FILE.read_text())
    out = render_prefect_file(DeploySettings("s3://b", watch_interval=4, settle_seconds=3, nightly_cron="30 1 * * *"),
                              tmp_path / "prefect.yaml")
    doc = yaml.safe_load(out.read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) == {"watch-bucket", "convert-model", "build-engine", "nightly-rebuild"}
    assert deps["watch-bucket"]["schedules"] == [{"interval": 4.0}]
    assert deps["watch-bucket"]["parameters"]["settle_seconds"] == 3.0
    assert deps["nightly-rebuild"]["schedules"] == [{"cron": "30 1 * * *", "timezone": "UTC"}]
    assert deps["convert-model"]["work_pool"]["name"] == "cpu"
    assert deps["convert-model"]["work_pool"]["job_variables"]["env"]["TRTFLOW_GPU_DEPLOYMENT"] == \
        "build-engine/build-engine"
    assert deps["build-engine"]["work_pool"] == {"name": "gpu"}
    assert deps["build-engine"]["entrypoint"] == "flows/build.py:build_engine"
    assert deps["convert-model"]["entrypoint"] == "flows/convert.py:convert_model"
    assert doc["pull"] == original["pull"]
    # Defaults: the file as written.
    plain = yaml.safe_load(render_prefect_file(DeploySettings("s3://b"), tmp_path / "p2.yaml").read_text())
    assert plain["deployments"] == original["deployments"]
    assert {d["name"]: d["work_pool"]["name"] for d in original["deployments"]} == {
        "watch-bucket": "cpu", "convert-model": "cpu", "build-engine": "gpu", "nightly-rebuild": "cpu"}
    assert {d["name"]: d["schedules"] for d in original["deployments"] if "schedules" in d} == {
        "watch-bucket": [{"interval": 30}], "nightly-rebuild": [{"cron": "0 2 * * *", "timezone": "UTC"}]}


def test_cli_commands_are_registered_and_their_help_renders():
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    for command in ("up", "down", "deploy", "watch"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
    assert "--settle-seconds" in runner.invoke(app, ["up", "--help"]).output


def test_down_without_a_stack_says_so(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["down", "--state-dir", str(tmp_path)])
    assert result.exit_code == 0 and "nothing was running" in result.output


def test_gpu_workers_are_named_only_by_the_indices_nvidia_smi_prints(tmp_path, monkeypatch):
    """A worker's name becomes its bucket key: an nvidia-smi that answers with anything but indices
    (a wrapper's banner, an error line) once named a worker 'gpuFAKE GPU, 0.0, 1 MiB-vm', whose
    start-up then failed on the key."""
    from tests.doubles import make_trt_python_double

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"  # TEST DOUBLE of nvidia-smi
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed, 0.0, 1 MiB'\necho 0\necho 1\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TRT_PYTHON", str(make_trt_python_double(tmp_path / "double")))
    monkeypatch.delenv("TRTFLOW_GPUS", raising=False)
    ids, why = stack.detect_gpus(tmp_path / "work")
    assert ids == ["0", "1"] and why.endswith("(2 GPU(s))")
    smi.write_text("#!/bin/sh\necho 'No devices were found'\n")
    assert stack.detect_gpus(tmp_path / "work")[0] == ["0"]


def test_worker_defaults_fill_in_and_never_override_the_users_settings():
    env = stack.with_worker_defaults({"PREFECT_CLIENT_MAX_RETRIES": "3"})
    assert env == {"PREFECT_CLIENT_MAX_RETRIES": "3", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    assert int(stack.with_worker_defaults({})["PREFECT_CLIENT_MAX_RETRIES"]) > 5  # Prefect's own default
